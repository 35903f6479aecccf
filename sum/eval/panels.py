"""PNG panels of masks over images: `overlay` colours masks over a picture; `save_panels` draws the
``evaluate`` stage's panels (each model's masks and clicks by round), `save_panel` the ``demo``
stage's (ground truth beside the 1-click masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np

from sum.io import atomic_path


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported here: heavy, and only for drawing panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour each mask (K, H, W) over the image, with outlines."""
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for m in masks:
        colour = rng.integers(40, 255, size=3).astype(np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour.tolist(), 1)
    return out.clip(0, 255).astype(np.uint8)


def save_panels(panels, out_dir: Path) -> List[Path]:
    """One PNG per benchmark. Each image takes two columns: the image and its targets on top,
    then one row per model with its masks after rounds 1 and 3 and the clicks given so far
    (green positive, red negative)."""
    plt = _pyplot()
    by_dataset: Dict[str, list] = {}
    for p in panels:
        by_dataset.setdefault(p.dataset, []).append(p)
    paths = []
    for name, images in by_dataset.items():
        models = list(images[0].masks)
        rounds = sorted(images[0].masks[models[0]]) if models else []
        n_cols = max(2, len(rounds)) * len(images)
        fig, axes = plt.subplots(1 + len(models), n_cols, figsize=(2.4 * n_cols, 2.1 * (1 + len(models))), squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        width = n_cols // len(images)
        for i, p in enumerate(images):
            c0 = i * width
            axes[0, c0].imshow(p.image)
            axes[0, c0].set_title(f"{name} / {p.image_id}", fontsize=7)
            axes[0, c0 + 1].imshow(overlay(p.image, p.gt_khw))
            axes[0, c0 + 1].set_title(f"ground truth ({len(p.gt_khw)} masks)", fontsize=7)
            for row, m in enumerate(models, start=1):
                for j, r in enumerate(rounds):
                    ax = axes[row, c0 + j]
                    ax.imshow(overlay(p.image, p.masks[m][r]))
                    clicks = [c for per_target in p.clicks[m][r] for c in per_target]
                    if clicks:
                        xy = np.array([(c.x, c.y) for c in clicks])
                        colour = ["lime" if c.label == 1 else "red" for c in clicks]
                        ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=12, edgecolors="black", linewidths=0.5)
                    unit = "click" if p.protocol == "point" else "round"
                    ax.set_title(f"{p.protocol}, {r} {unit}{'s' if r > 1 else ''}", fontsize=7)
                    if c0 + j == 0:
                        ax.set_ylabel(m, fontsize=8)
        fig.tight_layout()
        path = out_dir / "panels" / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=60)
        plt.close(fig)
        paths.append(path)
    return paths


def save_panel(rows_by_dataset: dict, path: Path) -> None:
    """PNG panel: one row per image, ground truth beside the model's 1-click masks."""
    plt = _pyplot()
    rows = [(name, r) for name, rs in rows_by_dataset.items() for r in rs]
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.6 * len(rows)), squeeze=False)
    for ax_row, (name, (image, gt, pred, clicks)) in zip(axes, rows):
        ax_row[0].imshow(overlay(image, gt))
        ax_row[0].set_title(f"{name}: ground truth", fontsize=9)
        ax_row[1].imshow(overlay(image, pred))
        ax_row[1].scatter(clicks[:, 0], clicks[:, 1], c="lime", s=30, marker="*", edgecolors="black")
        ax_row[1].set_title("1 click (star): predicted mask", fontsize=9)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
