"""``sumseg demo``: 1-click masks of the foundation model on a few benchmark images.

The first thing a user looks at after ``dvc repro``: for each benchmark, a few images, one click at
the interior-most point of each ground-truth mask (spec §10.3), the model's mask (the output with
the highest predicted IoU, and the oracle of 3 for reference), a PNG panel and a metrics JSON.
Each image is encoded once and all its clicks go through the decoder in one batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from sum.config import Config
from sum.data.dataset import select_datasets
from sum.data.skipped import open_dataset
from sum.eval.clicker import first_click
from sum.data.masks import mask_iou
from sum.eval.panels import save_panel
from sum.io import S3Options, atomic_write_text
from sum.model.checkpoint import load_model
from sum.model.predictor import SumPredictor

log = logging.getLogger(__name__)


def demo_dataset(predictor, dataset, max_images: int, max_masks: int, skip_empty: bool = False):
    """Run 1-click prediction on the first images of one dataset.

    Arguments:
      skip_empty: leave out an empty mask (spec §13 A8) with a warning naming it, instead of
        raising (``data.validate.mode=skip``).

    Returns:
        (per-mask records, panel rows): records hold IoU of the predicted-best and oracle outputs.

    Raises:
        ValueError: naming the image file and annotation of an empty mask, unless ``skip_empty``.
    """
    records, rows = [], []
    for i in range(min(max_images, len(dataset))):
        s = dataset[i]
        masks_khw = s.masks[_non_empty(s, skip_empty)]
        if len(masks_khw) == 0:
            continue
        order = np.argsort([-m.sum() for m in masks_khw])[:max_masks]
        gt_khw = masks_khw[order]
        clicks = [first_click(m) for m in gt_khw]
        coords_k12 = np.array([[[c.x, c.y]] for c in clicks], dtype=np.float32)
        labels_k1 = np.array([[c.label] for c in clicks], dtype=np.int64)
        predictor.set_image(s.image)
        masks_kchw, iou_kc, _ = predictor.predict(
            point_coords=coords_k12, point_labels=labels_k1, multimask_output=True
        )
        best = iou_kc.argmax(axis=1)
        pred_khw = masks_kchw[np.arange(len(best)), best]
        for k in range(len(gt_khw)):
            ious = [mask_iou(masks_kchw[k, c], gt_khw[k]) for c in range(masks_kchw.shape[1])]
            records.append({"image": s.image_id, "iou": float(ious[best[k]]), "oracle_iou": float(max(ious))})
        rows.append((s.image, gt_khw, pred_khw, coords_k12[:, 0]))
    return records, rows


def _non_empty(sample, skip_empty: bool) -> np.ndarray:
    """Indices of the non-empty masks of ``sample``; an empty one raises or is skipped with a warning."""
    keep = []
    for k, m in enumerate(sample.masks):
        if m.any():
            keep.append(k)
            continue
        ann = sample.ann_ids[k] if k < len(sample.ann_ids) else k
        if not skip_empty:
            raise ValueError(f"{sample.path}: annotation {ann}: mask is empty (run `sumseg validate`; data.validate.mode=skip leaves it out)")
        log.warning("%s: annotation %s: mask is empty: skipped", sample.path, ann)
    return np.asarray(keep, dtype=np.int64)


def run_demo(cfg: Config) -> dict:
    """The ``demo`` stage: 1-click masks of ``cfg.model`` on the configured benchmarks.

    Writes ``<eval.demo.out_dir>/panel.png`` and the metrics JSON ``eval.demo.metrics``.
    """
    demo = cfg.eval.demo
    names = list(demo.datasets) or [n for n, d in cfg.data.datasets.items() if d.role == "benchmark"]
    if not names:
        raise ValueError("eval.demo.datasets: no benchmark datasets configured in data.datasets")
    names = select_datasets(cfg.data.datasets, names, "eval.demo.datasets")

    torch.manual_seed(0)
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    predictor = SumPredictor(model)
    metrics: dict = {"model": cfg.model.name, "clicks": 1, "datasets": {}}
    rows_by_dataset = {}
    for name in names:
        ds = open_dataset(cfg.data, name)
        records, rows = demo_dataset(predictor, ds, demo.max_images, demo.max_masks, cfg.data.validate.mode == "skip")
        rows_by_dataset[name] = rows
        metrics["datasets"][name] = {
            "n_images": len(rows),
            "n_masks": len(records),
            "miou": float(np.mean([r["iou"] for r in records])) if records else None,
            "miou_oracle": float(np.mean([r["oracle_iou"] for r in records])) if records else None,
        }
        log.info("%s: 1-click mIoU %.3f over %d masks", name, metrics["datasets"][name]["miou"] or 0, len(records))
    out_dir = Path(demo.out_dir)
    save_panel(rows_by_dataset, out_dir / "panel.png")
    atomic_write_text(demo.metrics, json.dumps(metrics, indent=2))
    log.info("wrote %s and %s", out_dir / "panel.png", demo.metrics)
    return metrics
