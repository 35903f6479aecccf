"""``sum demo``: 1-click masks of the foundation model on a few benchmark images.

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

from sum.config import Config
from sum.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def _overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour each mask (K, H, W) over the image, with outlines."""
    import cv2

    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for m in masks:
        colour = rng.integers(40, 255, size=3).astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour.tolist(), 1)
    return out.clip(0, 255).astype(np.uint8)


def demo_dataset(predictor, dataset, max_images: int, max_masks: int):
    """Run 1-click prediction on the first images of one dataset.

    Returns:
        (per-mask records, panel rows): records hold IoU of the predicted-best and oracle outputs.
    """
    from sum.eval.clicker import first_click
    from sum.data.masks import mask_iou

    records, rows = [], []
    for i in range(min(max_images, len(dataset))):
        s = dataset[i]
        if len(s.masks) == 0:
            continue
        order = np.argsort([-m.sum() for m in s.masks])[:max_masks]
        gt_khw = s.masks[order]
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


def save_panel(rows_by_dataset: dict, path: Path) -> None:
    """PNG panel: one row per image, ground truth beside the model's 1-click masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, rs in rows_by_dataset.items() for r in rs]
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.6 * len(rows)), squeeze=False)
    for ax_row, (name, (image, gt, pred, clicks)) in zip(axes, rows):
        ax_row[0].imshow(_overlay(image, gt))
        ax_row[0].set_title(f"{name}: ground truth", fontsize=9)
        ax_row[1].imshow(_overlay(image, pred))
        ax_row[1].scatter(clicks[:, 0], clicks[:, 1], c="lime", s=30, marker="*", edgecolors="black")
        ax_row[1].set_title("1 click (star): predicted mask", fontsize=9)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run_demo(cfg: Config) -> dict:
    """The ``demo`` stage: 1-click masks of ``cfg.model`` on the configured benchmarks.

    Writes ``<eval.demo.out_dir>/panel.png`` and the metrics JSON ``eval.demo.metrics``.
    """
    import torch

    from sum.data.dataset import build_dataset
    from sum.io import S3Options
    from sum.model.checkpoint import load_model
    from sum.model.predictor import SumPredictor

    demo = cfg.eval.demo
    names = list(demo.datasets) or [n for n, d in cfg.data.datasets.items() if d.role == "benchmark"]
    if not names:
        raise ValueError("eval.demo.datasets: no benchmark datasets configured in data.datasets")
    unknown = [n for n in names if n not in cfg.data.datasets]
    if unknown:
        raise ValueError(f"eval.demo.datasets: unknown dataset(s) {unknown}; known: {sorted(cfg.data.datasets)}")

    torch.manual_seed(0)
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    predictor = SumPredictor(model)
    metrics: dict = {"model": cfg.model.name, "clicks": 1, "datasets": {}}
    rows_by_dataset = {}
    for name in names:
        ds = build_dataset(cfg.data.datasets[name])
        records, rows = demo_dataset(predictor, ds, demo.max_images, demo.max_masks)
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
