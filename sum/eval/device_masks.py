"""Interactive evaluation on the model's device (spec §10.2-10.3): an image's targets, selected
masks and clicked pixels kept where the decoder put its masks, scored and clicked there for all
targets at once (`sum.eval.metrics.mask_iou_t`, `boundary_iou_t`, `sum.eval.clicker.next_clicks`),
so that no full-resolution mask travels to the host; `sum.eval.scoring.run_protocol` uses it.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from sum.eval.clicker import Click, next_clicks
from sum.eval.metrics import boundary_iou_t, mask_iou_t

__all__ = ["DeviceMasks"]


class DeviceMasks:
    """`run_protocol`'s targets, selected masks and clicked pixels on the model's device: the
    scores of `sum.eval.metrics` and the clicks of `sum.eval.clicker.next_clicks` computed there,
    for all targets at once; only a round's (K,) scores and clicks come to the host."""

    def __init__(self, gt_khw: np.ndarray, clicks: List[List[Click]], device):
        self.gt = torch.as_tensor(gt_khw, device=device)
        self.pred = torch.zeros_like(self.gt)
        self.clicked = torch.zeros_like(self.gt)
        for i, cs in enumerate(clicks):
            for c in cs:
                self.clicked[i, c.y, c.x] = True

    def score(self, res, r: int, idx: np.ndarray, masks_bchw: torch.Tensor, piou_bc: torch.Tensor, selection: str,
              boundary: bool) -> np.ndarray:
        """Select each prompt's output (oracle: the closest to its target), keep it, and write the
        IoU (and boundary IoU) of the selected outputs into ``res.iou[idx, r]`` (``res.biou``);
        returns the selected output of each prompt, on the host."""
        at = torch.as_tensor(idx, device=self.gt.device)
        ious_bc = mask_iou_t(masks_bchw, self.gt[at][:, None])
        best_b = (piou_bc if selection == "predicted_iou" else ious_bc).argmax(dim=1)
        rows = torch.arange(idx.size, device=self.gt.device)
        self.pred[at] = masks_bchw[rows, best_b]
        out = [ious_bc[rows, best_b], best_b.double()]
        if boundary:
            out.append(boundary_iou_t(self.gt[at], self.pred[at]))
        host = torch.stack(out).cpu().numpy()  # the round's one copy to the host
        res.iou[idx, r] = host[0]
        if boundary:
            res.biou[idx, r] = host[2]
        return host[1].astype(np.int64)

    def next_clicks(self, clicks: List[List[Click]], active: np.ndarray) -> None:
        """`_next_clicks` for the active targets, in one batched call; in place."""
        idx = np.flatnonzero(active)
        if idx.size == 0:
            return
        at = torch.as_tensor(idx, device=self.gt.device)
        xy_k2, label_k, has_k = next_clicks(self.gt[at], self.pred[at], self.clicked[at])
        self.clicked[at[has_k], xy_k2[has_k, 1], xy_k2[has_k, 0]] = True
        host = torch.cat([xy_k2, label_k[:, None], has_k[:, None].long()], dim=1).cpu().numpy()
        for i, (x, y, label, has) in zip(idx, host):
            if has:
                clicks[i].append(Click(int(x), int(y), int(label)))
            else:
                active[i] = False
