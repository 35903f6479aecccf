"""Readers and writers of the on-disk formats every dataset arrives in (spec §3).

- images: any PIL-readable file or TIFF, always returned as (H, W, 3) uint8 RGB;
- COCO instance JSON (polygons, compressed or uncompressed RLE) through pycocotools, and the
  JSON reader the other JSON formats share.

Binary mask files, image bytes, writing and listing images are in `sum.data.image_files`; labelme
JSON in `sum.data.labelme`; SA-1B per-image JSON in `sum.data.sa1b_json`.

Every reader fails with one line naming the file. RLE and polygon checks (`rle_problem`,
`polygon_problem`) inspect the encoding without decoding the mask, so validation stays cheap, and
run before any pycocotools decode: pycocotools does not bounds-check a malformed ``counts``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sum.data.coco import check_coco_structure, mask_to_annotation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")
MASK_THRESHOLD = 128  # HQ-SAM loader: foreground is ``gt > 128`` (spec §3.1)
PERCENTILES = (1.0, 99.8)  # low/high percentiles mapped to 0/255 for 16-bit and float images


class ImageReadError(ValueError):
    """An image file is missing or does not decode; the message names it."""


# ---------------------------------------------------------------------------------------------
# images


def normalize_to_uint8(arr: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Map a 16-bit or float array to uint8 by clipping at the given percentiles (over all channels).

    A constant array maps to zeros. NaNs map to 0.
    """
    a = arr.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(a[finite], percentiles)
    if hi <= lo:
        lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray, path: str | os.PathLike = "<array>") -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) array of any dtype -> (H, W, 3) uint8 RGB.

    Grayscale is repeated over three channels, an alpha channel is dropped (not composited),
    bool becomes 0/255, uint8 is kept as is and any other dtype is percentile-normalised.
    """
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageReadError(f"{path}: image array has shape {arr.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.ndim == 3:
        arr = arr[..., :3]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = normalize_to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def pil_array(source) -> np.ndarray:
    """Pixels of a PIL-readable image (a path or a file object): 16-bit and float modes as they
    are, everything else as RGB."""
    with Image.open(source) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(im)
            if arr.dtype.byteorder not in ("=", "|"):
                arr = arr.astype(arr.dtype.newbyteorder("="))
            return arr
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB (see `to_rgb_uint8` for the conversions).

    EXIF orientation is ignored, as pycocotools and COCO annotations ignore it.

    Raises:
        ImageReadError: one line naming the file when it is missing or does not decode.
    """
    path = Path(path)
    return to_rgb_uint8(file_pixels(path, "image", pil_array), path)


def file_pixels(path: Path, what: str, read_pil: Callable[[Path], np.ndarray]) -> np.ndarray:
    """The pixel array of an image or mask file: the first page of a TIFF, else ``read_pil(path)``.

    Raises:
        ImageReadError: one line naming the file and ``what`` it is when it is missing or does
            not decode.
    """
    if not path.is_file():
        raise ImageReadError(f"{path}: {what} file not found")
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile  # TIFF files only

            return tifffile.imread(path, key=0)
        return read_pil(path)
    except Exception as e:  # noqa: BLE001 (PIL and tifffile raise many types)
        raise ImageReadError(f"{path}: cannot decode {what} ({one_line(e)})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile  # TIFF files only

            with tifffile.TiffFile(path) as tf:
                shape = tf.pages[0].shape
                if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
                    return int(shape[1]), int(shape[2])
                return int(shape[0]), int(shape[1])
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:  # noqa: BLE001 (PIL and tifffile raise many types)
        raise ImageReadError(f"{path}: cannot read image header ({one_line(e)})") from None


# ---------------------------------------------------------------------------------------------
# RLE and polygons


def rle_run_lengths(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools ``rleFrString``, vectorised).

    Returns int64 runs, alternating background/foreground starting with background. Raises
    ValueError for characters outside the encoding's alphabet or an unterminated value.
    """
    raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("counts has characters outside the RLE alphabet '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("counts ends inside a value")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits: beyond any image size
        raise ValueError("counts holds a value too large for an image")
    group = np.repeat(np.arange(len(ends)), lengths)
    k = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.bincount(group, weights=((c & 0x1F) << (5 * k)).astype(np.float64)).astype(np.int64)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * lengths[negative])
    # runs from the third on are stored as differences to the run two places back
    runs = x.copy()
    if runs.size > 2:
        runs[2::2] = np.cumsum(x[2::2])
        runs[1::2] = np.cumsum(x[1::2])
    return runs


def rle_problem(rle: Any) -> str | None:
    """None when ``rle`` is a well-formed COCO RLE (compressed or uncompressed), else the reason.

    Checks the ``size`` field and that the runs are non-negative and cover exactly h*w pixels,
    without building the mask.
    """
    if not isinstance(rle, dict):
        return f"segmentation is a {type(rle).__name__}, expected an RLE dict or polygon list"
    size = rle.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return f"RLE size field is {size!r}, expected [height, width]"
    if "counts" not in rle:
        return "RLE has no counts"
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in counts):
            return "uncompressed RLE counts are not all integers"
        runs = np.asarray(counts, np.int64)
    elif isinstance(counts, (str, bytes)):
        try:
            runs = rle_run_lengths(counts)
        except (ValueError, UnicodeEncodeError) as e:
            return f"RLE counts do not decode: {e}"
    else:
        return f"RLE counts is a {type(counts).__name__}, expected str, bytes or list"
    if runs.size and runs.min() < 0:
        return "RLE counts decode to a negative run"
    total = int(runs.sum())
    if total != int(size[0]) * int(size[1]):
        return f"RLE counts cover {total} pixels, size {size[0]}x{size[1]} has {int(size[0]) * int(size[1])}"
    return None


def rle_area(rle: dict) -> int:
    """Foreground pixels of a well-formed RLE (check it with `rle_problem` first)."""
    counts = rle["counts"]
    runs = np.asarray(counts, np.int64) if isinstance(counts, list) else rle_run_lengths(counts)
    return int(runs[1::2].sum())


def polygon_problem(segm: Any) -> str | None:
    """None when ``segm`` is a usable COCO polygon list (flat or nested), else the reason."""
    polys = as_polygon_list(segm)
    if not polys:
        return "segmentation is an empty polygon list"
    for j, p in enumerate(polys):
        if not isinstance(p, (list, tuple)) or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in p
        ):
            return f"polygon {j} is not a list of numbers"
        if len(p) < 6 or len(p) % 2:
            return f"polygon {j} has {len(p)} coordinates, expected an even number >= 6"
        if not np.all(np.isfinite(np.asarray(p, np.float64))):
            return f"polygon {j} has non-finite coordinates"
    return None


def as_polygon_list(segm: list) -> list:
    """COCO polygons are a list of flat coordinate lists; some writers store a single flat list."""
    if segm and not isinstance(segm[0], (list, tuple)):
        return [segm]
    return list(segm)


def segmentation_problem(segm: Any) -> str | None:
    """`polygon_problem` for lists, `rle_problem` otherwise."""
    if isinstance(segm, list):
        return polygon_problem(segm)
    return rle_problem(segm)


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> compressed RLE with
    bytes counts, as pycocotools ``COCO.annToRLE`` does. Check it with `segmentation_problem` first.
    """
    if isinstance(segm, list):
        polys = [[float(v) for v in p] for p in as_polygon_list(segm)]
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, *segm["size"])
    counts = segm["counts"]
    return {"size": list(segm["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def segmentation_to_mask(segm: Any, height: int, width: int, where: str = "<segmentation>") -> np.ndarray:
    """`segmentation_to_rle` decoded to (H, W) bool, after the safety checks.

    Raises:
        ValueError: ``where`` and the reason when the segmentation is malformed.
    """
    problem = segmentation_problem(segm)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return mask_utils.decode(segmentation_to_rle(segm, height, width)).astype(bool)


def segmentation_area(segm: Any, height: int, width: int) -> int:
    """Foreground pixels of a well-formed segmentation, without decoding RLE masks."""
    if isinstance(segm, list):
        return int(mask_utils.area(segmentation_to_rle(segm, height, width)))
    return rle_area(segm)


def masks_to_boxes(masks_khw: np.ndarray) -> np.ndarray:
    """(K, H, W) bool -> (K, 4) float32 xyxy tight boxes with inclusive max pixel indices
    (``torchvision.ops.masks_to_boxes`` and SAM's ``batched_mask_to_box``); empty masks -> zeros.
    """
    k = masks_khw.shape[0]
    boxes = np.zeros((k, 4), np.float32)
    for i in range(k):
        rows = np.flatnonzero(masks_khw[i].any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(masks_khw[i].any(axis=0))
        boxes[i] = (cols[0], rows[0], cols[-1], rows[-1])
    return boxes


def masks_to_coco(
    masks_khw: np.ndarray, image_id: int, first_ann_id: int, category_ids: Sequence[int] | None = None, **extra: Any
) -> list[dict]:
    """COCO annotations (RLE, area, bbox) for K masks, ids ``first_ann_id ...`` in order."""
    cats = list(category_ids) if category_ids is not None else [1] * len(masks_khw)
    return [
        mask_to_annotation(m, first_ann_id + i, image_id, category_id=cats[i], **extra) for i, m in enumerate(masks_khw)
    ]


# ---------------------------------------------------------------------------------------------
# COCO JSON


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; one line naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSON file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None


def load_coco(path: str | os.PathLike):
    """A pycocotools ``COCO`` for a COCO instance JSON, its prints silenced.

    Raises:
        FileNotFoundError / ValueError: one line naming the file (missing, not JSON, missing keys).
    """
    from pycocotools.coco import COCO  # only where a COCO JSON is read (optional, as in the style guide)

    doc = read_json(path)
    check_coco_structure(doc, path)
    doc.setdefault("categories", [])
    for ann in doc["annotations"]:
        ann.setdefault("category_id", 1)
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
