"""labelme annotation files (spec §3): the image a JSON names, its size and shapes, and a shape
(polygon, rectangle, circle) as a flat COCO polygon.
"""

from __future__ import annotations

import os

import numpy as np

from sum.data.formats import read_json


def read_labelme_json(path: str | os.PathLike) -> tuple[str, int, int, list[dict]]:
    """(imagePath, imageHeight, imageWidth, shapes) of a labelme annotation file."""
    doc = read_json(path)
    for key in ("imagePath", "imageHeight", "imageWidth", "shapes"):
        if not isinstance(doc, dict) or key not in doc:
            raise ValueError(f"{path}: labelme JSON has no {key!r}")
    return str(doc["imagePath"]), int(doc["imageHeight"]), int(doc["imageWidth"]), list(doc["shapes"])


def labelme_shape_to_polygon(shape: dict, where: str = "<shape>") -> list[float]:
    """A labelme shape (polygon, rectangle, circle) -> flat COCO polygon [x0, y0, x1, y1, ...]."""
    kind = shape.get("shape_type") or "polygon"
    pts = np.asarray(shape.get("points", []), np.float64).reshape(-1, 2)
    if kind == "polygon" and len(pts) >= 3:
        poly = pts
    elif kind == "rectangle" and len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif kind == "circle" and len(pts) == 2:
        r = float(np.hypot(*(pts[1] - pts[0])))
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        poly = pts[0] + r * np.stack([np.cos(t), np.sin(t)], axis=1)
    else:
        raise ValueError(f"{where}: labelme shape_type {kind!r} with {len(pts)} points is not an area")
    return [float(v) for v in poly.reshape(-1)]
