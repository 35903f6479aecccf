"""Deterministic click simulation for interactive evaluation (spec §10.3).

A click is placed at the *interior-most* point of a region: the argmax of its Euclidean distance
transform, computed with ``cv2.distanceTransform(..., cv2.DIST_L2, cv2.DIST_MASK_PRECISE)``, which
is the exact Euclidean distance transform (Felzenszwalb & Huttenlocher), not the 3x3/5x5 chamfer
approximation. The region is padded with one ring of zeros first, so the image border counts as
the region's edge (the RITM convention, and spec §10.3's ``edt(pad(·, 1))[1:-1, 1:-1]``): a mask
cut by the border is clicked in its middle, not against the border.

Conventions (spec §10.3, resolved where it is silent):

- **Which error to correct.** The false-negative set ``gt ∧ ¬pred`` and the false-positive set
  ``pred ∧ ¬gt`` are compared by the maximum of their distance transforms, i.e. by how deep their
  deepest point is, over the whole error set of each type; neither by area nor by largest
  connected component. ``max_fn >= max_fp`` gives a positive click in the false negatives,
  otherwise a negative click in the false positives. A tie goes to the positive click (spec's
  ``>=``; RITM's strict ``>`` would send it to the negative).
- **Ties inside a region.** Among pixels at the maximal distance the first in row-major order
  (smallest y, then smallest x) wins (``np.argmax``).
- **No error.** When the prediction equals the ground truth there is nothing to correct and
  `next_click` returns None; the caller decides (usually: keep the last score for later rounds).
- **On the device.** `interior_distance_sq` and `next_clicks` do the same for a batch of torch masks
  where they live (exact squared distances in integers, one call for all targets), for runs on an
  accelerator. On the CPU the per-mask cv2 transform stays the default: it is faster there and its
  clicks are those of every earlier run.
- **Coordinates.** ``Click.x`` is the column, ``Click.y`` the row, in pixels of the mask given;
  ``(x, y)`` is SAM's ``point_coords`` order. ``label`` is SAM's ``point_labels``: 1 positive,
  0 negative.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import cv2
import numpy as np
import torch

from sum.data.formats import masks_to_boxes

__all__ = [
    "Click",
    "interior_distance",
    "interior_distance_sq",
    "next_clicks",
    "first_click",
    "next_click",
    "boundary_click",
    "click_arrays",
    "first_prompts",
]


class Click(NamedTuple):
    """One simulated click: column ``x``, row ``y`` (pixels) and label (1 positive, 0 negative)."""

    x: int
    y: int
    label: int


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} has shape {mask.shape}: expected (H, W)")
    return mask.astype(bool)


def interior_distance(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each mask pixel to the nearest pixel outside it (spec §10.3).

    The image border counts as outside (one ring of zero padding), so a pixel on the border of the
    image has distance 1, as does a pixel next to the background.

    Arguments:
      mask: (H, W) binary mask; non-zero = region.

    Returns:
      (H, W) float32 distances; 0 outside the mask.
    """
    m = _as_mask(mask, "mask")
    padded = np.pad(m.astype(np.uint8), 1, mode="constant", constant_values=0)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def _exclude(dist_hw: np.ndarray, clicked: Iterable[Click]) -> np.ndarray:
    # Like RITM's not-clicked map: never click a pixel twice.
    dist_hw = dist_hw.copy()
    for c in clicked:
        dist_hw[c.y, c.x] = 0.0
    return dist_hw


def first_click(gt: np.ndarray) -> Click:
    """First click: positive, at the interior-most point of the ground truth (spec §10.3).

    "The one farthest from the object's boundary" (SAM's centre-point protocol): the argmax of
    `interior_distance` of the ground truth, first in row-major order on ties. Identical for all
    models, and equal to ``next_click(gt, zeros)``.

    Arguments:
      gt: (H, W) ground-truth mask.

    Returns:
      `Click` with label 1.

    Raises:
      ValueError: when the ground truth is empty (spec §10.2 skips such masks).
    """
    gt = _as_mask(gt, "ground truth")
    if not gt.any():
        raise ValueError(f"ground truth of shape {gt.shape} is empty: no first click (skip empty masks, spec §10.2)")
    y, x = np.unravel_index(int(np.argmax(interior_distance(gt))), gt.shape)
    return Click(int(x), int(y), 1)


def next_click(gt: np.ndarray, pred: np.ndarray, clicked: Iterable[Click] = ()) -> Click | None:
    """Next corrective click from the error between ground truth and prediction (spec §10.3).

    ``fn = gt ∧ ¬pred``, ``fp = pred ∧ ¬gt``; with ``dfn, dfp`` their `interior_distance`:
    if ``max(dfn) >= max(dfp)`` a positive click at ``argmax(dfn)``, else a negative click at
    ``argmax(dfp)``. The error types are compared by the depth of their deepest pixel over the
    whole error set (not area, not largest component); ties go positive; ties of position go to the
    first pixel in row-major order.

    Arguments:
      gt: (H, W) ground-truth mask.
      pred: (H, W) binarised prediction of the previous round, at the resolution of ``gt``.
      clicked: earlier clicks; their pixels are not clicked again (distance set to 0 there, as
        RITM's not-clicked map). The default, none, is spec §10.3's plain rule.

    Returns:
      `Click` (label 1 in a false negative, 0 in a false positive), or None when there is no
      clickable error (prediction equal to the ground truth, or only clicked pixels left).
    """
    gt, pred = _as_mask(gt, "ground truth"), _as_mask(pred, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"prediction is {pred.shape[0]}x{pred.shape[1]}, ground truth is {gt.shape[0]}x{gt.shape[1]}")
    clicked = list(clicked)
    dfn = _exclude(interior_distance(gt & ~pred), clicked)
    dfp = _exclude(interior_distance(pred & ~gt), clicked)
    max_fn, max_fp = float(dfn.max()), float(dfp.max())
    if max_fn == 0.0 and max_fp == 0.0:
        return None
    positive = max_fn >= max_fp
    y, x = np.unravel_index(int(np.argmax(dfn if positive else dfp)), gt.shape)
    return Click(int(x), int(y), 1 if positive else 0)


def boundary_click(gt: np.ndarray, width: int = 10, border_is_edge: bool = False) -> Click:
    """The harder first click of Tab. 5 / Fig. 13: the 'median' boundary point (spec §10.3 [REC]).

    Boundary points are the mask pixels within ``width`` px of its edge, found morphologically:
    ``band = gt ∧ ¬erode(gt, ones(3, 3), iterations=width)``. The click is the middle element of
    the band's pixels listed in row-major order, ``argwhere(band)[len // 2]``: a pixel inside the
    mask, near its edge, roughly halfway down the object, usually on its left side.

    Arguments:
      gt: (H, W) ground-truth mask.
      width: band width in pixels (10 in the paper).
      border_is_edge: whether the image border counts as the mask's edge. Default False: spec's
        plain ``erode`` (cv2's default border, outside = foreground), so a mask cut by the image
        border has no boundary points along it. True pads with zeros as Boundary IoU does.

    Returns:
      `Click` with label 1. When the band is empty (a mask covering the whole image with
      ``border_is_edge=False``) the median is taken over all mask pixels instead.

    Raises:
      ValueError: when the ground truth is empty, or ``width < 1``.
    """
    gt = _as_mask(gt, "ground truth")
    if not gt.any():
        raise ValueError(f"ground truth of shape {gt.shape} is empty: no boundary click (skip it, spec §10.2)")
    if width < 1:
        raise ValueError(f"boundary width {width}: expected >= 1 pixel")
    kernel = np.ones((3, 3), np.uint8)
    m = gt.astype(np.uint8)
    if border_is_edge:
        eroded = cv2.erode(np.pad(m, 1, mode="constant", constant_values=0), kernel, iterations=width)[1:-1, 1:-1]
    else:
        eroded = cv2.erode(m, kernel, iterations=width)
    band = gt & ~eroded.astype(bool)
    points_yx = np.argwhere(band if band.any() else gt)
    y, x = points_yx[len(points_yx) // 2]
    return Click(int(x), int(y), 1)


def interior_distance_sq(mask_bhw: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """`interior_distance` squared, exactly, for a batch of masks on their device (spec §10.3).

    Separable: the distance to the nearest outside pixel of the same column (the border counts as
    outside), then ``D²(y, x) = min_x' g(y, x')² + (x − x')²`` with the border columns at
    ``x' = −1`` and ``W``, by brute force over ``x'`` in chunks of about ``chunk_elems`` elements:
    integer arithmetic, so the result is exact and has no ties that rounding could flip.

    Arguments:
      mask_bhw: (B, H, W) masks; non-zero = region.
      chunk_elems: elements per chunk of the brute-force pass (memory, not result).

    Returns:
      (B, H, W) int32 squared distances; 0 outside the masks.
    """
    if mask_bhw.ndim != 3:
        raise ValueError(f"masks have shape {tuple(mask_bhw.shape)}: expected (B, H, W)")
    m = mask_bhw != 0
    b, h, w = m.shape
    dev = m.device
    ys = torch.arange(h, device=dev, dtype=torch.int32)[None, :, None]
    above = torch.where(m, torch.full_like(ys, -1), ys).cummax(dim=1).values  # last outside row at or above
    below = torch.where(m, torch.full_like(ys, h), ys).flip(1).cummin(dim=1).values.flip(1)
    g = torch.minimum(ys - above, below - ys)  # (B, H, W) column distance
    g2 = (g * g).reshape(b * h, 1, w)
    xs = torch.arange(w, device=dev, dtype=torch.int32)
    border = torch.minimum(xs + 1, w - xs) ** 2  # the zero columns at -1 and W
    out = torch.empty((b * h, w), dtype=torch.int32, device=dev)
    step = max(1, chunk_elems // max(1, b * h * w))
    for x0 in range(0, w, step):
        xc = xs[x0 : x0 + step]
        dx2 = (xc[:, None] - xs[None, :]) ** 2  # (c, W)
        out[:, x0 : x0 + step] = torch.minimum((g2 + dx2[None]).amin(dim=2), border[x0 : x0 + step])
    return torch.where(m, out.reshape(b, h, w), 0)


def next_clicks(
    gt_khw: torch.Tensor, pred_khw: torch.Tensor, clicked_khw: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`next_click` for K targets at once, on their device, with no host sync (spec §10.3).

    The same rule: the deeper of the false-negative and false-positive sets by `interior_distance`
    (ties positive), the first pixel in row-major order at that depth, clicked pixels excluded.

    Arguments:
      gt_khw, pred_khw: (K, H, W) ground truths and binarised predictions.
      clicked_khw: (K, H, W) bool, True at pixels clicked before, or None.

    Returns:
      ``(xy_k2, label_k, has_k)``: (x, y) int64, label int64 (1 positive, 0 negative) and bool,
      False where there is no clickable error (`next_click` returns None there; xy and label are
      then meaningless).
    """
    if gt_khw.shape != pred_khw.shape or gt_khw.ndim != 3:
        raise ValueError(f"ground truths {tuple(gt_khw.shape)} and predictions {tuple(pred_khw.shape)}: expected the same (K, H, W)")
    gt, pred = gt_khw != 0, pred_khw != 0
    k, h, w = gt.shape
    d2 = interior_distance_sq(torch.cat([gt & ~pred, pred & ~gt]))  # (2K, H, W): FN then FP
    if clicked_khw is not None:
        d2 = d2.masked_fill(clicked_khw.repeat(2, 1, 1), 0)
    flat = d2.reshape(2 * k, -1)
    where = flat.argmax(dim=1)  # the first maximal index: row-major order
    best = flat.gather(1, where[:, None])[:, 0]
    positive = best[:k] >= best[k:]
    index = torch.where(positive, where[:k], where[k:])
    xy_k2 = torch.stack([index % w, index // w], dim=1)
    return xy_k2, positive.long(), (best[:k] > 0) | (best[k:] > 0)


def click_arrays(clicks: Iterable[Click]) -> tuple[np.ndarray, np.ndarray]:
    """Accumulated clicks as SAM prompt arrays (spec §10.3: prompts accumulate across rounds).

    Returns:
      ``point_coords`` (N, 2) float32 as (x, y) and ``point_labels`` (N,) int64.
    """
    clicks = list(clicks)
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([c.label for c in clicks], dtype=np.int64)
    return coords, labels


def first_prompts(gt_khw: np.ndarray, protocol: str, boundary_width: int):
    """Round 1's prompts of spec §10.3: the tight boxes (no jitter) and no click, or one click per
    target (interior-most point, or the boundary's 'median' point)."""
    if protocol == "box":
        return masks_to_boxes(gt_khw), [[] for _ in gt_khw]
    if protocol == "point":
        return None, [[first_click(g)] for g in gt_khw]
    return None, [[boundary_click(g, width=boundary_width)] for g in gt_khw]
