"""Real photos without masks for the unlabeled pool (spec §3.3; assets doc "Real photos without masks").

scikit-image's wheel ships a few real photographs; the `acquire` stage extracts them (pinned archive,
sha256-checked members) and this module writes them as a COCO set with no annotations, so the
pseudo-labeling stage reads them through the same path as the procedural unlabeled pool.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sum.data.coco import write_coco
from sum.data.formats import read_image
from sum.data.image_files import write_image
from sum.io import remove_stale_dirs

log = logging.getLogger(__name__)

# skimage/data/<name>: what it shows and its terms as the scikit-image documentation gives them.
PHOTOS: dict[str, str] = {
    "astronaut.png": "Eileen Collins, NASA; public domain",
    "coffee.png": "coffee cup, Rachel Michetti; CC0",
    "chelsea.png": "Chelsea the cat, Stefan van der Walt; CC0",
    "rocket.jpg": "Falcon 9 launch, SpaceX; CC0",
    "motorcycle_left.png": "Middlebury stereo dataset 2014 (Scharstein et al.); research use",
    "hubble_deep_field.jpg": "Hubble eXtreme Deep Field, NASA; public domain",
    "retina.jpg": "human retina, Mikael Häggström; CC0",
    "coins.png": "Greek coins, Brooklyn Museum via Wikimedia; public domain",
    "camera.png": "cameraman, Lav Varshney; CC0",
    "ihc.png": "immunohistochemistry (IHC) staining, Yale Rosen; CC BY-SA 2.0",
}


def build_photo_pool(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, package: str = "scikit-image") -> Path:
    """Convert the acquired photos under ``raw_dir`` into ``out_dir/{images/, annotations.json}``.

    The COCO json has every image (with provenance and licence) and no annotations; ``info.role``
    is ``unlabeled``. The folder appears complete or not at all (built beside it, then renamed).

    Raises:
        FileNotFoundError: naming the first photo missing under ``raw_dir``.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    missing = [n for n in PHOTOS if not (raw_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{raw_dir / missing[0]}: photo not acquired (run `sumseg acquire`)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(out_dir.parent, f"{glob.escape(out_dir.name)}.tmp-*")  # half-built by a killed run
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        images = []
        for i, (name, licence) in enumerate(PHOTOS.items(), start=1):
            rgb = read_image(raw_dir / name)
            file_name = f"{Path(name).stem}.png"
            write_image(tmp / "images" / file_name, rgb)
            images.append(
                {
                    "id": i,
                    "file_name": file_name,
                    "height": int(rgb.shape[0]),
                    "width": int(rgb.shape[1]),
                    "license": licence,
                    "provenance": {"package": package, "member": f"skimage/data/{name}", "licence": licence},
                }
            )
        write_coco(
            tmp / "annotations.json",
            images,
            [],
            info={"task": "unspecified", "role": "unlabeled", "source": package, "description": "real photos, no masks"},
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %d photos to %s", len(PHOTOS), out_dir)
    return out_dir
