"""COCO instance JSON with RLE masks: the one on-disk format every set is written in (spec §3).

Masks are stored as compressed RLE through pycocotools, so a mask written and read back is
bit-identical. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils

from sum.io import atomic_write_text


def encode_rle(mask_hw: np.ndarray) -> dict:
    """Binary mask (H, W) -> COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    if mask_hw.ndim != 2:
        raise ValueError(f"mask has shape {mask_hw.shape}: expected (H, W)")
    rle = mask_utils.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) -> bool mask (H, W)."""
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        rle = mask_utils.frPyObjects(rle, h, w)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def mask_to_annotation(mask_hw: np.ndarray, ann_id: int, image_id: int, category_id: int = 1, **extra: Any) -> dict:
    """A COCO annotation dict for one binary mask: RLE, area, xywh bbox, iscrowd=0."""
    rle = encode_rle(mask_hw)
    ann = {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": rle,
        "area": float(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")})),
        "bbox": [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})],
        "iscrowd": 0,
    }
    ann.update(extra)
    return ann


def write_coco(
    path: str | os.PathLike,
    images: Iterable[dict],
    annotations: Iterable[dict],
    categories: Iterable[dict] | None = None,
    info: dict | None = None,
    licenses: Iterable[dict] | None = None,
) -> Path:
    """Write a COCO instance JSON atomically.

    Arguments:
      images: dicts with at least ``id``, ``file_name`` (relative to the image folder), ``height``,
        ``width``; may carry ``license`` and ``provenance``.
      annotations: dicts as `mask_to_annotation` makes.
      categories: defaults to one category ``{"id": 1, "name": "object"}``.
      info: free-form dataset description; by convention holds ``task`` and provenance.
    """
    doc = {
        "info": info or {},
        "licenses": list(licenses or []),
        "images": list(images),
        "annotations": list(annotations),
        "categories": list(categories or [{"id": 1, "name": "object", "supercategory": "object"}]),
    }
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    return Path(path)


def check_coco_structure(doc: Any, path: str | os.PathLike) -> None:
    """Raise one ValueError line naming ``path`` unless ``doc`` has COCO's required keys."""
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: COCO JSON is a {type(doc).__name__}, expected an object")  # noqa: TRY004
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise ValueError(f"{path}: COCO JSON has no list {key!r}")  # noqa: TRY004
    for i, img in enumerate(doc["images"]):
        for key in ("id", "file_name", "height", "width"):
            if not isinstance(img, dict) or key not in img:
                raise ValueError(f"{path}: images[{i}] has no {key!r}")
    for i, ann in enumerate(doc["annotations"]):
        for key in ("id", "image_id"):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"{path}: annotations[{i}] has no {key!r}")
