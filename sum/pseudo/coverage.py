"""Coverage of pseudo labels: which hidden ground-truth masks (`sum.data.hidden_gt`) some
pseudo label of their image matches, per granularity and band of area, and which granularity
each pseudo label describes (spec App. I.1). Read by the uncertainty report and the oracle pools.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from sum.data.coco import decode_rle
from sum.data.masks import AREA_BANDS, area_band, band_labels, mask_iou_matrix


def pseudo_label_masks(anns: Sequence[dict], hw: Tuple[int, int]) -> np.ndarray:
    """(M, H, W) bool: an image's pseudo labels (shard annotations) decoded, in annotation order;
    (0, H, W) when it has none."""
    if not anns:
        return np.zeros((0, *hw), bool)
    return np.stack([decode_rle(a["segmentation"]) for a in anns]).astype(bool)


def coverage_records(pseudo_mhw: np.ndarray, gt_nhw: np.ndarray, granularity: Sequence[str]) -> Tuple[List[dict], List[dict]]:
    """What one image's pseudo labels cover (module docstring).

    Arguments:
      pseudo_mhw: (M, H, W) bool pseudo labels.
      gt_nhw: (N, H, W) bool hidden GT masks; ``granularity``: the granularity of each.
    Returns:
      (per GT mask: ``granularity``, ``area_fraction``, ``best_iou`` over the pseudo labels;
      per pseudo label: ``granularity`` and ``iou`` of its best GT, the first in file order on ties).
    """
    m, n = len(pseudo_mhw), len(gt_nhw)
    iou_mn = mask_iou_matrix(pseudo_mhw, gt_nhw) if m and n else np.zeros((m, n))
    hw = float(gt_nhw.shape[1] * gt_nhw.shape[2]) if n else 1.0
    gts = [
        {"granularity": granularity[j], "area_fraction": float(gt_nhw[j].sum()) / hw, "best_iou": float(iou_mn[:, j].max()) if m else 0.0}
        for j in range(n)
    ]
    labels = [
        {"granularity": granularity[int(iou_mn[i].argmax())] if n else "", "iou": float(iou_mn[i].max()) if n else 0.0}
        for i in range(m)
    ]
    return gts, labels


def coverage_metrics(gts: Sequence[dict], labels: Sequence[dict], min_match_iou: float, bands: Sequence[float] = AREA_BANDS) -> dict:
    """``gt_coverage``: per granularity ``n``, ``recall`` (best IoU >= ``min_match_iou``) and the same
    per area band ``[lo, hi)``; ``pseudo_labels``: counts by the granularity of their best GT, or
    ``unmatched``."""
    out: Dict[str, dict] = {}
    for g in sorted({r["granularity"] for r in gts}):
        rows = [r for r in gts if r["granularity"] == g]
        by_area = {}
        for label in band_labels(bands):
            band = [r for r in rows if area_band(r["area_fraction"], bands) == label]
            by_area[label] = {
                "n": len(band),
                "recall": float(np.mean([r["best_iou"] >= min_match_iou for r in band])) if band else None,
            }
        out[g] = {"n": len(rows), "recall": float(np.mean([r["best_iou"] >= min_match_iou for r in rows])), "by_area": by_area}
    counts: Dict[str, int] = {}
    for r in labels:
        key = r["granularity"] if r["iou"] >= min_match_iou else "unmatched"
        counts[key] = counts.get(key, 0) + 1
    return {"by_granularity": out, "pseudo_labels": dict(sorted(counts.items()))}
