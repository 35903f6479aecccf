"""Image and mask files beyond reading one image (`sum.data.formats.read_image`): decoding
encoded bytes, writing an image, listing a folder's images, and the binary mask files of the
HQSeg-44K folders (foreground ``> 128``, spec §3.1).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sum.data.formats import (
    IMAGE_EXTENSIONS,
    MASK_THRESHOLD,
    ImageReadError,
    file_pixels,
    one_line,
    pil_array,
    to_rgb_uint8,
)
from sum.io import atomic_path


def decode_image(data: bytes, name: str = "<bytes>", formats: Sequence[str] = ("PNG", "JPEG")) -> np.ndarray:
    """Decode encoded image bytes (PNG or JPEG by default) to (H, W, 3) uint8 RGB, as `read_image`.

    Raises:
        ImageReadError: one line naming ``name`` when the bytes are not an image of ``formats``.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
        if kind not in formats:
            raise ImageReadError(f"{name}: a {kind} image, expected {' or '.join(formats)}")
        arr = pil_array(io.BytesIO(data))
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 (PIL raises many types)
        raise ImageReadError(f"{name}: cannot decode image ({one_line(e)})") from None
    return to_rgb_uint8(arr, name)


def write_image(path: str | os.PathLike, image_hw3: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image atomically; the format follows the suffix (PNG is lossless)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image_hw3).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def find_images(folder: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name."""
    exts = {e.lower() for e in extensions}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def read_binary_mask(path: str | os.PathLike, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """A mask image -> (H, W) bool, foreground ``> threshold`` (first channel if it has several).

    16-bit masks are compared against ``threshold`` scaled to 16 bits.
    """
    arr = file_pixels(Path(path), "mask", _pil_mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype == np.bool_:
        return arr.copy()
    if arr.dtype == np.uint16:
        return arr > threshold * 257
    return arr > threshold


def _pil_mask(path: Path) -> np.ndarray:
    """Pixels of a PIL-readable mask: palette images as their gray levels, the rest as they are."""
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L") if im.mode == "P" else im)
