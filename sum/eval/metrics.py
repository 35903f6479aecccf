"""Mask IoU, boundary IoU, NoC, NoF and the benchmark aggregation of spec §10.2.

All functions are pure and work on numpy arrays (metrics) or plain dicts/lists (aggregation);
`mask_iou_t` and `boundary_iou_t` compute the same scores for batches of torch masks on their
device (evaluation on an accelerator, no mask copied to the host).
Masks are binary: any non-zero value counts as foreground. Scores are fractions in [0, 1];
turning them into the paper's percentages is left to reports.

Conventions fixed here (spec §10.2 and §13 A8 leave them open):

- **Empty masks.** IoU and boundary IoU are 0.0 whenever the union is empty, i.e. when both masks
  are empty. This matches pycocotools' ``maskUtils.iou`` and spec §10.2's "[REC] count an empty
  prediction as IoU 0"; it never inflates a score. The protocol skips empty ground-truth masks
  before scoring (spec §10.2, §13 A8), so the case only arises when a caller forgets to.
- **Aggregation.** Per dataset: mean over masks. Per task: mean of the dataset means. Overall:
  mean of all dataset means, *not* the mean of the task means (spec §10.2). Datasets named as
  examples (benchmarks of too few images) keep their own mean but enter no task and no overall.
- **NoC / NoF** follow RITM (Sofiiuk et al., ``isegm.inference.utils.compute_noc_metric``): NoC
  is the first click whose IoU reaches the threshold (``>=``), the click budget (20) when none
  does; NoF counts the objects that do not reach it within the budget (f-BRS / RITM). RITM's code
  counts the objects whose NoC equals the budget, which also takes in an object that reaches the
  threshold exactly at the last click; here that object is not a failure, as the definition says.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from sum.data.masks import binary_pair, mask_iou

__all__ = [
    "mask_iou_batch",
    "boundary_dilation",
    "mask_to_boundary",
    "boundary_iou",
    "mask_iou_t",
    "boundary_iou_t",
    "noc",
    "nof",
    "dataset_mean",
    "task_means",
    "overall_mean",
    "aggregate",
    "aggregate_counts",
]


def mask_iou_batch(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of many mask pairs at once (spec §10.2), e.g. the 3 outputs of one prompt against one
    ground truth for the oracle-of-3 selection (spec §10.3).

    Arguments:
      preds: (..., H, W) binary masks.
      gts: (..., H, W) binary masks, broadcastable against ``preds`` (a single (H, W) ground truth
        is fine).

    Returns:
      float64 array of the broadcast leading shape, e.g. (N,); 0.0 where both masks are empty.
    """
    preds, gts = np.asarray(preds).astype(bool), np.asarray(gts).astype(bool)
    if preds.ndim < 2 or gts.ndim < 2 or preds.shape[-2:] != gts.shape[-2:]:
        raise ValueError(f"masks have shapes {preds.shape} and {gts.shape}: expected (..., H, W) with the same H, W")
    inter = np.count_nonzero(preds & gts, axis=(-2, -1))
    union = np.count_nonzero(preds | gts, axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float64)


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Width d in pixels of the boundary band: ``max(1, round(ratio · sqrt(H² + W²)))`` (spec §10.2).

    Python's ``round`` (half to even) as in the boundary-iou-api reference.
    """
    return max(1, int(round(dilation_ratio * math.sqrt(height * height + width * width))))


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Boundary band of a binary mask, as in Boundary IoU (Cheng et al. 2021; spec §10.2).

    ``B(M) = M − erode(pad(M, 1, zeros), ones(3, 3), iterations=d)[1:-1, 1:-1]`` with d from
    `boundary_dilation` on the mask's own H, W. Equivalently: the mask pixels whose Chebyshev
    distance to a pixel outside the mask is at most d, where everything beyond the image border
    counts as outside. So a mask truncated by the image border has a boundary along that border.

    Arguments:
      mask: (H, W) binary mask; non-zero = foreground.
      dilation_ratio: d as a fraction of the image diagonal (0.02 in the released code).

    Returns:
      (H, W) bool boundary band; empty exactly when the mask is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask has shape {mask.shape}: expected (H, W)")
    m = mask.astype(bool)
    h, w = m.shape
    d = boundary_dilation(h, w, dilation_ratio)
    # The zero ring makes the image border count as the mask's edge; cv2's own default border
    # (outside = foreground) would not.
    padded = np.pad(m.astype(np.uint8), 1, mode="constant", constant_values=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1].astype(bool)
    return m & ~eroded


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU: the IoU of the boundary bands of ``gt`` and ``pred`` (spec §10.2).

    ``|B(gt) ∧ B(pred)| / |B(gt) ∨ B(pred)|`` with `mask_to_boundary`; d comes from the (shared)
    H, W of the two masks, i.e. the ground-truth image. Symmetric in its arguments.

    Returns:
      Boundary IoU in [0, 1]; 0.0 when both masks are empty.
    """
    pred, gt = binary_pair(pred, gt)
    return mask_iou(mask_to_boundary(pred, dilation_ratio), mask_to_boundary(gt, dilation_ratio))


def mask_iou_t(preds: torch.Tensor, gts: torch.Tensor) -> torch.Tensor:
    """`mask_iou_batch` on torch masks where they live: (..., H, W) broadcastable pairs ->
    float64 IoUs of the leading shape, the same values (integer counts, one float64 division)."""
    preds, gts = preds != 0, gts != 0
    if preds.ndim < 2 or gts.ndim < 2 or preds.shape[-2:] != gts.shape[-2:]:
        raise ValueError(f"masks have shapes {tuple(preds.shape)} and {tuple(gts.shape)}: expected (..., H, W) with the same H, W")
    inter = (preds & gts).sum(dim=(-2, -1))
    union = (preds | gts).sum(dim=(-2, -1))
    return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), 0.0)


def boundary_bands_t(mask_khw: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """`mask_to_boundary` of K torch masks at once: the erosion by ``(2d + 1)²`` squares (what d
    iterations of cv2's 3x3 erosion are) as a max-pool of the complement, padded with one ring
    of outside pixels; beyond it the pool's own padding counts as foreground, as cv2's border."""
    m = mask_khw != 0
    h, w = m.shape[-2:]
    d = boundary_dilation(h, w, dilation_ratio)
    outside = F.pad((~m).float()[:, None], (1, 1, 1, 1), value=1.0)
    near_outside = F.max_pool2d(outside, 2 * d + 1, stride=1, padding=d)[:, 0, 1:-1, 1:-1] > 0
    return m & near_outside


def boundary_iou_t(gt_khw: torch.Tensor, pred_khw: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """`boundary_iou` of K pairs of torch masks on their device: (K,) float64."""
    if gt_khw.shape != pred_khw.shape or gt_khw.ndim != 3:
        raise ValueError(f"masks have shapes {tuple(gt_khw.shape)} and {tuple(pred_khw.shape)}: expected the same (K, H, W)")
    return mask_iou_t(boundary_bands_t(pred_khw, dilation_ratio), boundary_bands_t(gt_khw, dilation_ratio))


def noc(ious_per_round: Sequence[float], threshold: float, max_clicks: int | None = None) -> int:
    """Number of Clicks (NoC@85, NoC@90) to reach an IoU threshold (spec §10.3; RITM convention).

    Arguments:
      ious_per_round: IoU after each round, ``ious_per_round[i]`` after ``i + 1`` prompts.
      threshold: IoU as a fraction, 0.85 for NoC@85, 0.90 for NoC@90. Reached means ``>=``.
      max_clicks: click budget; rounds after it are ignored. Defaults to ``len(ious_per_round)``.

    Returns:
      The 1-based number of the first round whose IoU is >= threshold; ``max_clicks`` when it is
      never reached within the budget (the max-click convention of RITM / Xu et al. 2016, which
      under-counts the cost of failures; report failures separately if they matter).
    """
    reached, budget = _reached(ious_per_round, threshold, max_clicks, "NoC", 0.85)
    return int(np.argmax(reached)) + 1 if reached.any() else budget


def nof(ious_per_round: Sequence[float], threshold: float, max_clicks: int | None = None) -> int:
    """Number of Failures of one object (NoF@95 when summed; RITM): 1 when no round within the
    budget reaches ``threshold`` (IoU ``>=``), else 0. Arguments as `noc`."""
    reached, _ = _reached(ious_per_round, threshold, max_clicks, "NoF", 0.95)
    return int(not reached.any())


def _reached(ious_per_round: Sequence[float], threshold: float, max_clicks: int | None, metric: str,
             example: float) -> tuple[np.ndarray, int]:
    """(whether each round within the budget reaches ``threshold``, the budget), the inputs of
    `noc` and `nof` checked (``metric`` and ``example`` word their errors)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"{metric} threshold {threshold}: expected an IoU fraction in (0, 1], e.g. {example}")
    ious = np.asarray(ious_per_round, dtype=np.float64).reshape(-1)
    if ious.size == 0:
        raise ValueError(f"{metric} of an empty IoU sequence: expected one IoU per round")
    budget = ious.size if max_clicks is None else int(max_clicks)
    if budget < 1:
        raise ValueError(f"max_clicks {max_clicks}: expected >= 1")
    return ious[:budget] >= threshold, budget


def dataset_mean(per_mask: Sequence[float]) -> float:
    """Score of one benchmark: the mean over all its evaluated masks (spec §10.2)."""
    values = np.asarray(per_mask, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("dataset mean of no masks: expected at least one evaluated mask")
    return float(values.mean())


def task_means(dataset_means: Mapping[str, float], dataset_task: Mapping[str, str]) -> dict[str, float]:
    """Score of each task type (salient / entity / part): the mean of its dataset means (spec §10.2).

    Arguments:
      dataset_means: benchmark name -> its mean over masks (`dataset_mean`).
      dataset_task: benchmark name -> task name; must cover every benchmark of ``dataset_means``.

    Returns:
      task name -> mean of its benchmarks' means, tasks in order of first appearance.
    """
    groups: dict[str, list[float]] = {}
    for name, value in dataset_means.items():
        if name not in dataset_task:
            raise ValueError(f"dataset {name!r} has no task in dataset_task (known: {sorted(dataset_task)})")
        groups.setdefault(dataset_task[name], []).append(float(value))
    return {task: float(np.mean(values)) for task, values in groups.items()}


def overall_mean(dataset_means: Mapping[str, float]) -> float:
    """The "Overall / All average": the mean of all dataset means, not of the task means (spec §10.2)."""
    if not dataset_means:
        raise ValueError("overall mean of no datasets: expected at least one dataset mean")
    return float(np.mean([float(v) for v in dataset_means.values()]))


def aggregate(
    per_mask: Mapping[str, Sequence[float]], dataset_task: Mapping[str, str], examples: Collection[str] = ()
) -> dict:
    """Per-dataset, per-task and overall means of a per-mask metric (spec §10.2).

    Arguments:
      per_mask: benchmark name -> per-mask scores (IoU, boundary IoU or NoC) of that benchmark.
      dataset_task: benchmark name -> task name.
      examples: benchmarks that keep their own mean but enter no task and no overall mean.

    Returns:
      ``{"datasets": {name: mean}, "tasks": {task: mean of dataset means},
      "overall": mean of dataset means}``; ``datasets`` holds the examples too.
    """
    datasets = {}
    for name, values in per_mask.items():
        if len(values) == 0:
            raise ValueError(f"dataset {name!r}: no evaluated masks")
        datasets[name] = dataset_mean(values)
    pooled = {n: v for n, v in datasets.items() if n not in set(examples)}
    return {"datasets": datasets, "tasks": task_means(pooled, dataset_task), "overall": overall_mean(pooled)}


def aggregate_counts(
    per_mask: Mapping[str, Sequence[int]], dataset_task: Mapping[str, str], examples: Collection[str] = ()
) -> dict:
    """Per-dataset, per-task and overall sums of a per-mask count (NoF: 1 per failed object).

    Arguments as `aggregate`; a count adds up over masks, so tasks and overall are sums over the
    masks of their (non-example) benchmarks, not means.

    Returns:
      ``{"datasets": {name: sum}, "tasks": {task: sum}, "overall": sum}``.
    """
    datasets = {name: int(np.sum(values, dtype=np.int64)) for name, values in per_mask.items()}
    tasks: dict[str, int] = {}
    for name, value in datasets.items():
        if name in set(examples):
            continue
        if name not in dataset_task:
            raise ValueError(f"dataset {name!r} has no task in dataset_task (known: {sorted(dataset_task)})")
        tasks[dataset_task[name]] = tasks.get(dataset_task[name], 0) + value
    return {"datasets": datasets, "tasks": tasks, "overall": sum(tasks.values())}
