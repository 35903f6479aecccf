"""The PNG panel of the uncertainty report: for a few images, the largest pseudo label, its
refined mask, its uncertainty map and the matched hidden ground truth with the label's error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from segment_anything.utils.transforms import ResizeLongestSide

from sum.data.coco import decode_rle
from sum.data.formats import read_image
from sum.data.masks import mask_iou_matrix
from sum.io import atomic_path
from sum.model.lowres import upsample_low_res


def iou_1n(mask_hw: np.ndarray, gts_nhw: np.ndarray) -> np.ndarray:
    return mask_iou_matrix(mask_hw[None], gts_nhw)[0] if len(gts_nhw) else np.zeros((0,))


def write_panel(path: str | os.PathLike, images_dir: str | os.PathLike, images: Sequence[dict], n: int) -> Optional[Path]:
    """A PNG of ``n`` images, one row each, for the largest pseudo label of the image: image,
    pseudo label, refined mask, u, and the matched hidden GT with the pseudo label's error."""
    import matplotlib  # heavy, and its backend is chosen before pyplot loads: only the panel draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        u = np.clip(upsample_low_res(im["u"][k : k + 1], im["img_size"], input_size, size)[0], 0, 1)
        refined = upsample_low_res(im["r"][k : k + 1], im["img_size"], input_size, size)[0] > 0 if im["r"] is not None else None
        ious = iou_1n(pseudo, im["gt"])
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
