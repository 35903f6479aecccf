"""Scoring one image's uncertainty maps against hidden ground truth, and the metrics of many
(the rule is in `sum.uncertainty.report`'s docstring): exact AUROC from ranks, the scoring region
around a pseudo label and its matched GT, per-mask records and their summaries.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from segment_anything.utils.transforms import ResizeLongestSide

from sum.data.masks import mask_iou, mask_iou_matrix
from sum.model.lowres import upsample_low_res
from sum.pseudo.coverage import pseudo_label_masks

PERCENTILES = (10, 25, 50, 75, 90)
MATCH_IOU_BANDS = (0.0, 0.25, 0.5, 0.7, 0.85, 0.95, 1.0)
SCORING_RULE = (
    "per pseudo label: best-IoU hidden GT over all granularities, matched if IoU >= min_match_iou; "
    "error pixels = pseudo label != matched GT inside the union of both boxes grown by "
    "max(region_min_px, region_margin*side); AUROC of u (error vs correct) averaged over matched "
    "masks with both sets non-empty"
)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + 1 + ends) / 2.0  # mean of the ranks start+1 .. end
    ranks = np.empty(len(xs), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U):
    ``(Σ ranks of positives − n₁(n₁+1)/2) / (n₁ n₀)``, ties counted one half.

    Returns:
      AUROC in [0, 1]; NaN when one class is absent.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"auroc: {scores.shape[0]} scores but {labels.shape[0]} labels")
    n1 = int(labels.sum())
    n0 = labels.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def scoring_region(
    bbox_xywh: Sequence[float], size: Tuple[int, int], margin: float, min_px: int, gt_hw: Optional[np.ndarray] = None
) -> Tuple[slice, slice]:
    """(rows, cols) slices of the pseudo label's box, joined with the box of ``gt_hw`` when given
    (so that every error pixel lies inside), grown by ``max(min_px, margin·side)`` and clipped."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    x0, y0, x1, y1 = x, y, x + w, y + h
    if gt_hw is not None and gt_hw.any():
        ys, xs = np.flatnonzero(gt_hw.any(1)), np.flatnonzero(gt_hw.any(0))
        x0, y0, x1, y1 = min(x0, xs[0]), min(y0, ys[0]), max(x1, xs[-1]), max(y1, ys[-1])
    dx, dy = max(min_px, margin * (x1 - x0)), max(min_px, margin * (y1 - y0))
    r0, c0 = max(0, int(np.floor(y0 - dy))), max(0, int(np.floor(x0 - dx)))
    r1, c1 = min(size[0], int(np.ceil(y1 + 1 + dy))), min(size[1], int(np.ceil(x1 + 1 + dx)))
    return slice(r0, r1), slice(c0, c1)


def score_image(
    img: dict,
    s_mhw: np.ndarray,
    u_mhw: np.ndarray,
    r_mhw: Optional[np.ndarray],
    gt_nhw: np.ndarray,
    img_size: int,
    threshold: float,
    margin: float,
    min_px: int,
) -> List[dict]:
    """Per-mask scores of one image (module docstring). ``s``, ``u``, ``r``: low-res maps of the
    image's annotations, in annotation order.

    Returns:
      one dict per pseudo label: id, gt_iou_pseudo, gt_iou_refined, auroc, auroc_confidence,
      n_region, n_error, pixel counts for the certain/uncertain accuracy, the sums of ``u`` on
      error and correct pixels, and the mean certainty ``c = 1 - u`` on each (nan when empty).
    """

    size = (int(img["height"]), int(img["width"]))
    input_size = ResizeLongestSide.get_preprocess_shape(size[0], size[1], img_size)
    anns = img["annotations"]
    if not anns:
        return []
    u_up = np.clip(upsample_low_res(u_mhw, img_size, input_size, size), 0.0, 1.0)
    s_up = upsample_low_res(s_mhw, img_size, input_size, size)
    r_up = upsample_low_res(r_mhw, img_size, input_size, size) if r_mhw is not None else None
    pseudo_mhw = pseudo_label_masks(anns, size)
    iou_mn = mask_iou_matrix(pseudo_mhw, gt_nhw) if len(gt_nhw) else np.zeros((len(anns), 0))
    out = []
    for k, a in enumerate(anns):
        pseudo, ious = pseudo_mhw[k], iou_mn[k]
        rec = {"id": a["id"], "image_id": img["image_id"]}
        if len(ious) == 0:
            out.append(rec)
            continue
        j = int(np.argmax(ious))
        gt = gt_nhw[j]
        rec["gt_iou_pseudo"] = float(ious[j])
        if r_up is not None:
            rec["gt_iou_refined"] = mask_iou(r_up[k] > 0, gt)
        rows, cols = scoring_region(a["bbox"], size, margin, min_px, gt)
        err = (pseudo[rows, cols] != gt[rows, cols]).ravel()
        u = u_up[k][rows, cols].ravel()
        p = 1.0 / (1.0 + np.exp(-np.clip(s_up[k][rows, cols].ravel(), -30, 30)))
        certain = (1.0 - u) > threshold
        rec.update(
            n_region=int(err.size),
            n_error=int(err.sum()),
            auroc=auroc(u, err),
            auroc_confidence=auroc(1.0 - np.abs(2 * p - 1), err),
            n_certain=int(certain.sum()),
            correct_certain=int((~err & certain).sum()),
            n_uncertain=int((~certain).sum()),
            correct_uncertain=int((~err & ~certain).sum()),
            u_sum_error=float(u[err].sum()),
            u_sum_correct=float(u[~err].sum()),
            c_mean_error=float(1.0 - u[err].mean()) if err.any() else float("nan"),
            c_mean_correct=float(1.0 - u[~err].mean()) if (~err).any() else float("nan"),
        )
        out.append(rec)
    return out


def summarize(records: Sequence[dict]) -> dict:
    """The metrics of a list of per-mask records (`score_image`)."""
    au = np.array([r["auroc"] for r in records if "auroc" in r and np.isfinite(r["auroc"])])
    au_c = np.array([r["auroc_confidence"] for r in records if "auroc" in r and np.isfinite(r["auroc_confidence"])])
    matched = [r for r in records if "gt_iou_pseudo" in r]
    refined = [r for r in matched if "gt_iou_refined" in r]
    n_err = sum(r.get("n_error", 0) for r in records)
    n_ok = sum(r.get("n_region", 0) - r.get("n_error", 0) for r in records)
    n_no_error = sum(1 for r in records if "n_error" in r and r["n_error"] == 0)
    out = {
        "n_masks_total": len(records),
        "n_masks_matched": len(matched),
        "n_masks": int(au.size),
        "n_masks_no_error": n_no_error,
        "auroc_mean": float(au.mean()) if au.size else float("nan"),
        **{f"auroc_p{q}": float(np.percentile(au, q)) if au.size else float("nan") for q in PERCENTILES},
        "auroc_confidence_mean": float(au_c.mean()) if au_c.size else float("nan"),
        "miou_pseudo": float(np.mean([r["gt_iou_pseudo"] for r in refined or matched])) if matched else float("nan"),
        "miou_refined": float(np.mean([r["gt_iou_refined"] for r in refined])) if refined else float("nan"),
        "refined_better_fraction": float(np.mean([r["gt_iou_refined"] > r["gt_iou_pseudo"] for r in refined])) if refined else float("nan"),
        "u_mean_error": sum(r.get("u_sum_error", 0.0) for r in records) / n_err if n_err else float("nan"),
        "u_mean_correct": sum(r.get("u_sum_correct", 0.0) for r in records) / n_ok if n_ok else float("nan"),
    }
    n_c = sum(r.get("n_certain", 0) for r in records)
    n_u = sum(r.get("n_uncertain", 0) for r in records)
    out["acc_certain"] = sum(r.get("correct_certain", 0) for r in records) / n_c if n_c else float("nan")
    out["acc_uncertain"] = sum(r.get("correct_uncertain", 0) for r in records) / n_u if n_u else float("nan")
    out["uncertain_pixel_fraction"] = n_u / (n_c + n_u) if (n_c + n_u) else float("nan")
    out.update(loss_weight_removed(records))
    return out


def loss_weight_removed(records: Sequence[dict]) -> dict:
    """How much of the loss the certainty ``c = 1 - u`` takes off error and off correct pixels
    (spec §5.3, §5.4), the test of whether ``u`` acts and not only ranks:

    - ``c_mean_error_per_mask`` / ``c_mean_correct_per_mask``: the mean over pseudo labels of
      their mean ``c`` on error / correct pixels;
    - ``focal_weight_removed_error`` / ``_correct``: the share of the focal loss weight removed,
      ``sum(u) / n`` over all error / correct pixels (the UA focal loss weighs pixel i by ``c_i``);
    - ``dice_removed_error`` / ``_correct``: the share of error / correct pixels the UA Dice mask
      ``1[c > theta]`` drops.
    """

    def mean_of(key: str) -> float:
        v = [r[key] for r in records if key in r and np.isfinite(r[key])]
        return float(np.mean(v)) if v else float("nan")

    n_err = sum(r.get("n_error", 0) for r in records)
    n_ok = sum(r.get("n_region", 0) - r.get("n_error", 0) for r in records)
    uncertain_err = sum(r.get("n_uncertain", 0) - r.get("correct_uncertain", 0) for r in records)
    uncertain_ok = sum(r.get("correct_uncertain", 0) for r in records)
    return {
        "c_mean_error_per_mask": mean_of("c_mean_error"),
        "c_mean_correct_per_mask": mean_of("c_mean_correct"),
        "focal_weight_removed_error": sum(r.get("u_sum_error", 0.0) for r in records) / n_err if n_err else float("nan"),
        "focal_weight_removed_correct": sum(r.get("u_sum_correct", 0.0) for r in records) / n_ok if n_ok else float("nan"),
        "dice_removed_error": uncertain_err / n_err if n_err else float("nan"),
        "dice_removed_correct": uncertain_ok / n_ok if n_ok else float("nan"),
    }


def auroc_by_match_iou(records: Sequence[dict], bands: Sequence[float] = MATCH_IOU_BANDS) -> Dict[str, dict]:
    """Mean AUROC and count of scored masks per band ``[lo, hi)`` of the IoU of each pseudo label
    with its best GT (the last band includes 1), over every record: how the score depends on the
    matching threshold."""
    out = {}
    for lo, hi in zip(bands[:-1], bands[1:]):
        au = [
            r["auroc"]
            for r in records
            if "auroc" in r and np.isfinite(r["auroc"]) and lo <= r["gt_iou_pseudo"] and (r["gt_iou_pseudo"] < hi or hi >= 1.0)
        ]
        out[f"{lo:.2f}-{hi:.2f}"] = {"n": len(au), "auroc_mean": float(np.mean(au)) if au else None}
    return out


def report_metrics(records: Sequence[dict], min_match_iou: float) -> dict:
    """The metrics of the module docstring: `summarize` over the pseudo labels matched at
    ``min_match_iou``, the same over all (suffix ``_all``), AUROC per match-IoU band, the rule."""
    matched = [r for r in records if r.get("gt_iou_pseudo", 0.0) >= min_match_iou]
    out = finite_or_none(summarize(matched))
    out["n_masks_total"] = len(records)  # every pseudo label; n_masks_matched of them have a counterpart
    out["n_masks_unmatched"] = len(records) - len(matched)
    out.update({f"{k}_all": v for k, v in finite_or_none(summarize(records)).items()})
    out["auroc_mean_by_match_iou"] = auroc_by_match_iou(records)
    out["min_match_iou"] = min_match_iou
    out["scoring_rule"] = SCORING_RULE
    return out


def finite_or_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}
