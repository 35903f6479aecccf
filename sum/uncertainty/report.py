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
3. **Per-mask AUROC** of u (at the original resolution, `sum.model.lowres.upsample_low_res`)
   separating error from correct pixels in the region, exactly from ranks (`sum.uncertainty.scoring.auroc`), over the
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

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sum.data.hidden_gt import hidden_gt_masks, hidden_gt_paths, load_hidden_gt
from sum.io import atomic_write_text, remove_temporaries
from sum.tracking import stage_run
from sum.pseudo.coverage import coverage_metrics, coverage_records, pseudo_label_masks
from sum.pseudo.store import list_shards, read_shard
from sum.uncertainty.maps import read_uncertainty_shard
from sum.uncertainty.stage import stage_datasets
from sum.uncertainty.panel import write_panel
from sum.uncertainty.refiner import load_refiner
from sum.uncertainty.scoring import report_metrics, score_image

log = logging.getLogger(__name__)


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
    hidden = load_hidden_gt(hidden_gt_paths)
    records, images, cover_gt, cover_labels = [], [], [], []
    for shard in list_shards(pseudo_dir, dataset):
        doc, logits = read_shard(pseudo_dir, dataset, shard)
        udoc, u, r = read_uncertainty_shard(uncertainty_dir, dataset, shard)
        if udoc.get("pseudo_config_hash") != doc.get("config_hash"):
            raise ValueError(f"{Path(uncertainty_dir) / dataset}: shard {shard} was made from other pseudo labels (config_hash differs); rerun `sumseg uncertainty`")
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
    for path in (cfg.metrics, cfg.panel):
        if path:
            remove_temporaries(path)  # of a killed run
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


def maps_source(uncertainty_dir: str | os.PathLike, datasets: Sequence[str]) -> str:
    """"oracle" when the shards of some dataset of ``datasets`` under ``uncertainty_dir`` were
    written by `sum.uncertainty.oracle` (its json says ``"oracle"``), else "refiner". One command
    writes a dataset's folder, so its first readable shard speaks for it."""
    for name in datasets:
        for path in sorted((Path(uncertainty_dir) / name).glob("shard-*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):  # the report names a broken shard when it reads it
                continue
            if "oracle" in doc:
                return "oracle"
            break
    return "refiner"


def run_uncertainty_report(cfg) -> dict:
    """The ``uncertainty-report`` stage: `uncertainty_report` over the datasets with uncertainty
    shards, with the refiner checkpoint's validation metrics."""
    ucfg = cfg.uncertainty
    names = stage_datasets(cfg)
    # maps of `sum.uncertainty.oracle` come from no refiner: none of its metrics is theirs
    meta = None if maps_source(ucfg.out_dir, names) == "oracle" else load_refiner(cfg.refine.out)[1]
    datasets = {n: cfg.data.datasets[n].images for n in names}
    with stage_run(cfg.tracking, "uncertainty-report", params={"uncertainty": ucfg}) as tracker:
        report = uncertainty_report(cfg.pseudo.out_dir, ucfg.out_dir, datasets, ucfg, meta)
        tracker.log_json_metrics(ucfg.metrics)
        for path in (ucfg.metrics, ucfg.panel):
            if Path(path).is_file():
                tracker.log_artifact(path, artifact_path="uncertainty")
    return report
