"""Overlap of binary masks: IoU of two masks, of every pair of two sets, and bands of a mask's
area. Shared by evaluation (`sum.eval.metrics`), the uncertainty room and pseudo-label coverage.

Masks are binary: any non-zero value counts as foreground. IoU is 0.0 whenever the union is empty
(the convention of `sum.eval.metrics`, spec §10.2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

AREA_BANDS = (0.0, 3e-4, 1e-3, 3e-3, 1e-2, 1.0)
"""Bands of a mask's area as a fraction of its image, ``[lo, hi)`` (the last one closed): on a
512x512 image 79, 262, 786 and 2,621 px. Reports split scores by them to show where a model
gains or loses (small parts against whole objects)."""


def band_labels(bands: Sequence[float] = AREA_BANDS) -> list[str]:
    """The labels ``"lo-hi"`` of the bands, in order."""
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(bands[:-1], bands[1:])]


def area_band(fraction: float, bands: Sequence[float] = AREA_BANDS) -> str:
    """The label (`band_labels`) of the band of ``bands`` holding ``fraction`` (clipped into range)."""
    labels = band_labels(bands)
    for label, hi in zip(labels, bands[1:]):
        if fraction < hi:
            return label
    return labels[-1]



def binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"masks have shapes {pred.shape} and {gt.shape}: expected two (H, W) masks")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction is {pred.shape[0]}x{pred.shape[1]}, ground truth is {gt.shape[0]}x{gt.shape[1]}")
    return pred.astype(bool), gt.astype(bool)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two binary masks, ``|pred ∧ gt| / |pred ∨ gt|`` (spec §10.2).

    Arguments:
      pred: (H, W) predicted mask, already at the ground-truth resolution; non-zero = foreground.
      gt: (H, W) ground-truth mask.

    Returns:
      IoU in [0, 1]; 0.0 when both masks are empty (see the module docstring).
    """
    pred, gt = binary_pair(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 0.0
    return int(np.count_nonzero(pred & gt)) / union



def mask_iou_matrix(a_mhw: np.ndarray, b_nhw: np.ndarray) -> np.ndarray:
    """IoU of every mask of ``a`` with every mask of ``b``, (M, N): the intersections as one
    float32 matrix product of the flattened masks (exact: counts stay below 2^24 for images
    under 16 megapixels), unions from the areas. 0.0 where both masks are empty."""
    a = np.asarray(a_mhw).reshape(len(a_mhw), -1) != 0
    b = np.asarray(b_nhw).reshape(len(b_nhw), -1) != 0
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"masks of {a.shape[1]} and {b.shape[1]} pixels cannot be compared")
    if a.shape[1] >= 2**24:
        raise ValueError(f"masks of {a.shape[1]} pixels: float32 intersection counts would not be exact")
    inter = a.astype(np.float32) @ b.astype(np.float32).T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)
