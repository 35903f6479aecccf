"""How good are the uncertainty maps? Scoring against the hidden ground truth of the embedded
world (never used for training), a DVC metrics JSON and a PNG panel (spec §4.1-4.2, App. D.3).

The question (spec §4.2): does ``u`` separate the pixels where a pseudo label is wrong from those
where it is right? "Wrong" needs the GT object the pseudo label is meant to be. The rule, per
pseudo label ``ŷ = 1[s > 0]`` (spec §3.3, the RLE the generator stored):

1. **Match.** Its counterpart is the hidden GT mask of highest IoU over every granularity the world
   annotates (salient, entity incl. stuff, part; ``hidden_gt/annotations_*.json``): a pseudo label
   is a mask at *some* granularity (App. I.1). The match counts when that IoU is >= ``min_match_iou``
   = 0.5, the segment-matching criterion of panoptic quality (Kirillov et al. 2019; above 0.5 a
   match is unique among non-overlapping segments). Below it no GT is the object the pseudo label
   is meant to be: in the embedded world these are mostly fragments finer than any annotated
   granularity (a texture blob, a cloud, a tile inside a ground/sky/part GT many times larger), for
   which "error pixels" would be the whole of an unrelated GT. They are counted
   (``n_masks_unmatched``) and the same metrics over all pseudo labels, each against its best GT
   whatever the IoU, are reported with the suffix ``_all``.
2. **Error pixels** are where ŷ disagrees with the matched GT. They are scored inside the
   **scoring region**: the union of the pseudo label's box and the matched GT's box, grown on each
   side by ``max(region_min_px, region_margin · side)`` and clipped to the image. Every error pixel
   lies in it (errors are in ŷ ∪ GT); the correct pixels are the neighbourhood of the two masks,
   since the far background, where ŷ and the GT agree trivially and u ≈ 0, would only inflate
   the score.
3. **Per-mask AUROC** of u (at the original resolution, `sum.uncertainty.maps.uncertainty_at`)
   separating error from correct pixels in the region, exactly from ranks (`auroc`), over the
   masks whose error set and correct set are both non-empty (``n_masks``; a perfect pseudo label
   has nothing to separate: ``n_masks_no_error``). Reported: mean and percentiles
   (``auroc_p10`` ... ``auroc_p90``), and the mean per band of match IoU
   (``auroc_mean_by_match_iou``, over all pseudo labels).
4. **Refinement.** IoU with the matched GT of the raw pseudo label and of the refined mask
   ``1[r > 0]`` (``miou_pseudo``, ``miou_refined``), over the same matched pseudo labels.

**Coverage** (``gt_coverage``): which of the world's objects the pseudo labels describe at all. Per
granularity, the fraction of hidden GT masks that some pseudo label of their image matches
(IoU >= ``min_match_iou``), overall and per band of GT area as a fraction of the image
(``AREA_BANDS``); and the pseudo labels counted by the granularity of their best GT (``unmatched``
below the threshold). The paper's pool is about half part masks (App. I.1); a pool whose pseudo
labels miss a granularity cannot anchor it during fine-tuning.

For context the same AUROC is reported for SAM's own confidence ``1 − |2σ(s) − 1|`` (the
paper's "Confidence-Uncer" baseline, spec §4.2), and pixel accuracy of ŷ in certain
(``c > θ``) and uncertain regions (App. D.3 reports 98% vs 28.5% on HRSOD).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sum.eval.metrics import AREA_BANDS, area_band, band_labels, mask_iou, mask_iou_matrix
from sum.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

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


def _iou_1n(mask_hw: np.ndarray, gts_nhw: np.ndarray) -> np.ndarray:
    return mask_iou_matrix(mask_hw[None], gts_nhw)[0] if len(gts_nhw) else np.zeros((0,))


def granularity_of(path: str | os.PathLike) -> str:
    """The granularity a hidden-GT file annotates: its stem without ``annotations_``."""
    stem, prefix = Path(path).stem, "annotations_"
    return stem[len(prefix):] if stem.startswith(prefix) and len(stem) > len(prefix) else stem


def load_hidden_gt(paths: Sequence[str | os.PathLike]) -> Dict[str, Tuple[Tuple[int, int], List[dict]]]:
    """file_name -> ((H, W), annotations) over every hidden-GT COCO file (all granularities); each
    annotation carries its file's granularity (`granularity_of`) under ``_granularity``."""
    out: Dict[str, Tuple[Tuple[int, int], List[dict]]] = {}
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable COCO file ({type(e).__name__})") from None
        by_id = {img["id"]: img for img in doc.get("images", [])}
        for img in by_id.values():
            out.setdefault(img["file_name"], ((int(img["height"]), int(img["width"])), []))
        for ann in doc.get("annotations", []):
            img = by_id.get(ann["image_id"])
            if img is None:
                raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
            out[img["file_name"]][1].append({**ann, "_granularity": granularity_of(path)})
    return out


def pseudo_label_masks(anns: Sequence[dict], hw: Tuple[int, int]) -> np.ndarray:
    """(M, H, W) bool: an image's pseudo labels (shard annotations) decoded, in annotation order;
    (0, H, W) when it has none."""
    from sum.data.coco import decode_rle

    if not anns:
        return np.zeros((0, *hw), bool)
    return np.stack([decode_rle(a["segmentation"]) for a in anns]).astype(bool)


def hidden_gt_masks(entry, where: str) -> Tuple[np.ndarray, List[str]]:
    """The non-empty GT masks of one hidden-GT entry, (N, H, W) bool, and their granularities."""
    from sum.data import formats

    (h, w), anns = entry
    masks = [
        (formats.segmentation_to_mask(a["segmentation"], h, w, where=f"{where}: annotation {a['id']}"), a.get("_granularity", ""))
        for a in anns
    ]
    masks = [(m, g) for m, g in masks if m.any()]
    if not masks:
        return np.zeros((0, h, w), bool), []
    return np.stack([m for m, _ in masks]).astype(bool), [g for _, g in masks]


def coverage_records(pseudo_mhw: np.ndarray, gt_nhw: np.ndarray, granularity: Sequence[str]) -> Tuple[List[dict], List[dict]]:
    """What one image's pseudo labels cover (module docstring, "Coverage").

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
      n_region, n_error, and pixel counts for the certain/uncertain accuracy.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    from sum.uncertainty.maps import uncertainty_at

    size = (int(img["height"]), int(img["width"]))
    input_size = ResizeLongestSide.get_preprocess_shape(size[0], size[1], img_size)
    anns = img["annotations"]
    if not anns:
        return []
    u_up = np.clip(uncertainty_at(u_mhw, img_size, input_size, size), 0.0, 1.0)
    s_up = uncertainty_at(s_mhw, img_size, input_size, size)
    r_up = uncertainty_at(r_mhw, img_size, input_size, size) if r_mhw is not None else None
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
    return out


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
    out = _finite(summarize(matched))
    out["n_masks_total"] = len(records)  # every pseudo label; n_masks_matched of them have a counterpart
    out["n_masks_unmatched"] = len(records) - len(matched)
    out.update({f"{k}_all": v for k, v in _finite(summarize(records)).items()})
    out["auroc_mean_by_match_iou"] = auroc_by_match_iou(records)
    out["min_match_iou"] = min_match_iou
    out["scoring_rule"] = SCORING_RULE
    return out


def score_dataset(
    pseudo_dir: str | os.PathLike,
    uncertainty_dir: str | os.PathLike,
    dataset: str,
    hidden_gt_paths: Sequence[str | os.PathLike],
    cfg,
) -> Tuple[List[dict], List[dict], Tuple[List[dict], List[dict]]]:
    """Per-mask records of every scored image of ``dataset``, the images (for the panel) and the
    coverage records (`coverage_records`, concatenated over the images).

    Arguments:
      cfg: `UncertaintyConfig` (certainty_threshold, region_margin, region_min_px,
        max_report_images).
    Returns:
      (records, images: dicts with image record, annotations, s, u, r, gt masks,
      (GT coverage rows, pseudo-label rows)).
    """
    from sum.pseudo.store import list_shards, read_shard
    from sum.uncertainty.maps import read_uncertainty_shard

    hidden = load_hidden_gt(hidden_gt_paths)
    records, images, cover_gt, cover_labels = [], [], [], []
    for shard in list_shards(pseudo_dir, dataset):
        doc, logits = read_shard(pseudo_dir, dataset, shard)
        udoc, u, r = read_uncertainty_shard(uncertainty_dir, dataset, shard)
        if udoc.get("pseudo_config_hash") != doc.get("config_hash"):
            raise ValueError(f"{Path(uncertainty_dir) / dataset}: shard {shard} was made from other pseudo labels (config_hash differs); rerun `sum uncertainty`")
        img_size = int(doc.get("img_size", 1024))
        for img in doc["images"]:
            if cfg.max_report_images and len(images) >= cfg.max_report_images:
                break
            entry = hidden.get(img["file_name"])
            if entry is None:
                continue
            rows = [a["logit_index"] for a in img["annotations"]]
            gt, granularity = hidden_gt_masks(entry, f"hidden GT of {img['file_name']}")
            s_i, u_i = logits[rows].astype(np.float32), u[rows]
            r_i = r[rows] if r is not None else None
            records += score_image(img, s_i, u_i, r_i, gt, img_size, cfg.certainty_threshold, cfg.region_margin, cfg.region_min_px)
            images.append({"img": img, "s": s_i, "u": u_i, "r": r_i, "gt": gt, "img_size": img_size})
            g_rows, l_rows = coverage_records(pseudo_label_masks(img["annotations"], gt.shape[1:]), gt, granularity)
            cover_gt += g_rows
            cover_labels += l_rows
    return records, images, (cover_gt, cover_labels)


def write_panel(path: str | os.PathLike, images_dir: str | os.PathLike, images: Sequence[dict], n: int) -> Optional[Path]:
    """A PNG of ``n`` images, one row each, for the largest pseudo label of the image: image,
    pseudo label, refined mask, u, and the matched hidden GT with the pseudo label's error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from segment_anything.utils.transforms import ResizeLongestSide

    from sum.data.coco import decode_rle
    from sum.data.formats import read_image
    from sum.uncertainty.maps import uncertainty_at

    rows = [im for im in images if im["img"]["annotations"]][:n]
    if not rows:
        return None
    cols = ["image", "pseudo label", "refined (r > 0)", "uncertainty u", "hidden GT, error (red)"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3 * len(cols), 2.4 * len(rows)), squeeze=False)
    for i, im in enumerate(rows):
        img = im["img"]
        size = (int(img["height"]), int(img["width"]))
        input_size = ResizeLongestSide.get_preprocess_shape(size[0], size[1], im["img_size"])
        k = int(np.argmax([a["area"] for a in img["annotations"]]))
        a = img["annotations"][k]
        rgb = read_image(Path(images_dir) / img["file_name"])
        pseudo = decode_rle(a["segmentation"])
        u = np.clip(uncertainty_at(im["u"][k : k + 1], im["img_size"], input_size, size)[0], 0, 1)
        refined = uncertainty_at(im["r"][k : k + 1], im["img_size"], input_size, size)[0] > 0 if im["r"] is not None else None
        ious = _iou_1n(pseudo, im["gt"])
        gt = im["gt"][int(np.argmax(ious))] if len(ious) else np.zeros(size, bool)
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_ylabel(f"{img['file_name']}\nmask {a['id']}", fontsize=7)
        for col, mask in ((1, pseudo), (2, refined)):
            axes[i, col].imshow(rgb)
            if mask is not None:
                axes[i, col].imshow(np.ma.masked_where(~mask, mask), alpha=0.5, cmap="autumn")
        axes[i, 3].imshow(u, cmap="magma", vmin=0, vmax=1)
        axes[i, 4].imshow(gt, cmap="gray", vmin=0, vmax=1)
        err = pseudo != gt
        axes[i, 4].imshow(np.ma.masked_where(~err, err), cmap="autumn_r", alpha=0.9, vmin=0, vmax=1)
        axes[i, 4].set_xlabel(f"IoU {ious.max() if len(ious) else 0:.3f}", fontsize=7)
    for j, title in enumerate(cols):
        axes[0, j].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def hidden_gt_paths(images_dir: str | os.PathLike, pattern: str) -> List[str]:
    """The hidden-GT files of a dataset: ``pattern`` relative to the parent of its image folder."""
    return sorted(glob.glob(str(Path(images_dir).parent / pattern)))


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def uncertainty_report(
    pseudo_dir: str | os.PathLike,
    uncertainty_dir: str | os.PathLike,
    datasets: Dict[str, str],
    cfg,
    refiner_meta: Optional[dict] = None,
) -> dict:
    """Score every dataset that has hidden GT, write the metrics JSON and the panel.

    Arguments:
      datasets: name -> image folder.
      cfg: `UncertaintyConfig`.
      refiner_meta: the refiner checkpoint's meta; its metrics are copied as ``refine_val_*``.
    Returns:
      the metrics dict (also written to ``cfg.metrics``).
    """
    all_records: List[dict] = []
    all_gt: List[dict] = []
    all_labels: List[dict] = []
    per_dataset: Dict[str, dict] = {}
    panel_done = False
    for name, images_dir in datasets.items():
        paths = hidden_gt_paths(images_dir, cfg.hidden_gt)
        if not paths:
            log.info("uncertainty report: %s has no hidden GT (%s), not scored", name, cfg.hidden_gt)
            continue
        records, images, (cover_gt, cover_labels) = score_dataset(pseudo_dir, uncertainty_dir, name, paths, cfg)
        per_dataset[name] = report_metrics(records, cfg.min_match_iou)
        per_dataset[name]["gt_coverage"] = coverage_metrics(cover_gt, cover_labels, cfg.min_match_iou)
        all_records += records
        all_gt += cover_gt
        all_labels += cover_labels
        if not panel_done and cfg.panel and cfg.n_panel_images > 0:
            panel_done = write_panel(cfg.panel, images_dir, images, cfg.n_panel_images) is not None
    metrics = report_metrics(all_records, cfg.min_match_iou)
    metrics["gt_coverage"] = coverage_metrics(all_gt, all_labels, cfg.min_match_iou)
    for k, v in ((refiner_meta or {}).get("metrics") or {}).items():
        if k.startswith("val_") or k in ("pairs_kept", "train_pairs", "steps", "epochs_run", "best_epoch"):
            metrics[f"refine_{k}"] = v
    metrics["datasets"] = per_dataset
    atomic_write_text(cfg.metrics, json.dumps(metrics, indent=1) + "\n")
    return metrics


def run_uncertainty_report(cfg) -> dict:
    """The ``uncertainty-report`` stage: `uncertainty_report` over the datasets with uncertainty
    shards, with the refiner checkpoint's validation metrics."""
    from sum.tracking import stage_run
    from sum.uncertainty.maps import pseudo_datasets
    from sum.uncertainty.refine import load_refiner

    ucfg = cfg.uncertainty
    names = list(ucfg.datasets) or pseudo_datasets(cfg.pseudo.out_dir)
    unknown = [n for n in names if n not in cfg.data.datasets]
    if unknown:
        raise ValueError(f"uncertainty.datasets: unknown dataset(s) {unknown}; known: {sorted(cfg.data.datasets)}")
    _, meta = load_refiner(cfg.refine.out)
    datasets = {n: cfg.data.datasets[n].images for n in names}
    with stage_run(cfg.tracking, "uncertainty-report", params={"uncertainty": ucfg}) as tracker:
        report = uncertainty_report(cfg.pseudo.out_dir, ucfg.out_dir, datasets, ucfg, meta)
        tracker.log_json_metrics(ucfg.metrics)
        for path in (ucfg.metrics, ucfg.panel):
            if Path(path).is_file():
                tracker.log_artifact(path, artifact_path="uncertainty")
    return report
