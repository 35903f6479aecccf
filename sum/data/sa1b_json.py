"""SA-1B per-image JSON (spec §3): ``{"image": {...}, "annotations": [...]}``, one file per
image, each annotation a compressed RLE with its box, area, SAM scores, point and crop box.

`sum.data.sa1b.Sa1bDataset` reads these files; writes are atomic, reads fail with one line naming
the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from sum.data.coco import encode_rle
from sum.data.formats import read_json
from sum.io import atomic_write_text


def sa1b_annotation(
    mask_hw: np.ndarray,
    ann_id: int,
    predicted_iou: float = 1.0,
    stability_score: float = 1.0,
    point_coords: Sequence[Sequence[float]] | None = None,
    crop_box: Sequence[float] | None = None,
) -> dict:
    """One SA-1B annotation for a binary mask: RLE, xywh bbox, area, scores, point and crop box."""
    rle = encode_rle(mask_hw)
    rle_b = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    h, w = mask_hw.shape
    return {
        "id": int(ann_id),
        "segmentation": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(rle_b)],
        "area": int(mask_utils.area(rle_b)),
        "predicted_iou": float(predicted_iou),
        "stability_score": float(stability_score),
        "point_coords": [list(map(float, p)) for p in (point_coords or [])],
        "crop_box": [float(v) for v in (crop_box if crop_box is not None else (0, 0, w, h))],
    }


def write_sa1b_json(path: str | os.PathLike, image_info: dict, annotations: Iterable[dict]) -> Path:
    """Write an SA-1B per-image JSON atomically.

    Arguments:
      image_info: ``{"image_id", "file_name", "height", "width"}`` (others kept).
      annotations: dicts as `sa1b_annotation` makes.
    """
    for key in ("height", "width"):
        if key not in image_info:
            raise ValueError(f"{path}: image info has no {key!r}")
    doc = {"image": dict(image_info), "annotations": list(annotations)}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    return Path(path)


def read_sa1b_json(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(image info, annotations) of an SA-1B per-image JSON; one line naming the file if malformed."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), dict):
        raise ValueError(f"{path}: SA-1B JSON has no 'image' object")  # noqa: TRY004
    anns = doc.get("annotations")
    if not isinstance(anns, list):
        raise ValueError(f"{path}: SA-1B JSON has no list 'annotations'")  # noqa: TRY004
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "segmentation" not in ann:
            raise ValueError(f"{path}: annotations[{i}] has no 'segmentation'")
    return doc["image"], anns
