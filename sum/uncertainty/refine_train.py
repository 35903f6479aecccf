"""Fine-tuning the refinement module on its training pairs (spec §4.1, A6, A10): the prompts of a
batch, the loss frame, SAM's loss, the mIoU of SAM's and the refined masks on validation pairs,
and the training loop with early stopping on that mIoU.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from sum.config import RefineConfig
from sum.data.masks import mask_iou
from sum.model.losses import sam_loss
from sum.model.lowres import upsample_low_res
from sum.uncertainty.pairs import ImageData, Pair
from sum.uncertainty.refiner import RefinementModule

log = logging.getLogger(__name__)


def _prompts(refiner: RefinementModule, data: ImageData, pairs: Sequence[Pair]):
    transform = ResizeLongestSide(refiner.img_size)
    device = refiner.device
    pts = transform.apply_coords(np.stack([p.point_xy for p in pairs])[:, None], data.original_size)
    boxes = transform.apply_boxes(np.stack([p.box_xyxy for p in pairs]), data.original_size)
    pts_bn2 = torch.as_tensor(pts, dtype=torch.float32, device=device)
    labels_bn = torch.ones(pts_bn2.shape[:2], dtype=torch.int, device=device)
    boxes_b4 = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    s_b1hw = torch.as_tensor(np.stack([p.s for p in pairs]).astype(np.float32), device=device)[:, None]
    return pts_bn2, labels_bn, boxes_b4, s_b1hw


def loss_frame(
    logits_b1hw: torch.Tensor, input_size: Tuple[int, int], img_size: int, loss_size: int
) -> torch.Tensor:
    """Low-res logits at the loss resolution: bilinear to (loss_size, loss_size) when larger than
    the low-res side, then the padding cropped (spec A10 with ``loss_size = img_size``)."""
    if logits_b1hw.shape[-1] != loss_size:
        logits_b1hw = F.interpolate(logits_b1hw, (loss_size, loss_size), mode="bilinear", align_corners=False)
    h = max(1, int(round(input_size[0] * loss_size / img_size)))
    w = max(1, int(round(input_size[1] * loss_size / img_size)))
    return logits_b1hw[..., :h, :w]


def target_frame(gt_khw: np.ndarray, input_size: Tuple[int, int], img_size: int, loss_size: int) -> torch.Tensor:
    """GT masks in the cropped loss frame, (K, 1, h, w) float in {0, 1}: resized (antialiased
    bilinear) to the non-padded part of the loss frame and thresholded at 0.5."""
    h = max(1, int(round(input_size[0] * loss_size / img_size)))
    w = max(1, int(round(input_size[1] * loss_size / img_size)))
    gt = torch.as_tensor(gt_khw, dtype=torch.float32)[:, None]
    if gt.shape[0] == 0:
        return gt.new_zeros((0, 1, h, w))
    return (F.interpolate(gt, (h, w), mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()


def _forward_groups(refiner: RefinementModule, groups: Sequence[Tuple[ImageData, Sequence[Pair]]]):
    """Refined logits and predicted IoUs of pairs of several images, one list entry per image.

    The folded decoder takes one image embedding per prompt, so all pairs go through one call;
    SAM's own decoder repeats one embedding per call, so it gets one call per image.
    """
    if not refiner.folded or len(groups) == 1:
        return [refiner(data.features, *_prompts(refiner, data, pairs)) for data, pairs in groups]
    prompts = [_prompts(refiner, data, pairs) for data, pairs in groups]
    feats_bchw = torch.cat([data.features.expand(len(pairs), -1, -1, -1) for data, pairs in groups])
    r_b1hw, iou_b1 = refiner(feats_bchw, *(torch.cat(parts) for parts in zip(*prompts)))
    sizes = [len(pairs) for _, pairs in groups]
    return list(zip(r_b1hw.split(sizes), iou_b1.split(sizes)))


def _by_image(batch: Sequence[Tuple[ImageData, Pair]]) -> List[Tuple[ImageData, List[Pair]]]:
    groups: Dict[str, Tuple[ImageData, List[Pair]]] = {}
    for data, pair in batch:
        groups.setdefault(data.image_id, (data, []))[1].append(pair)
    return list(groups.values())


def batch_loss(
    refiner: RefinementModule,
    batch: Sequence[Tuple[ImageData, Pair]],
    targets: Dict[str, torch.Tensor],
    loss_size: int,
) -> Dict[str, torch.Tensor]:
    """SAM loss (20 focal + 1 Dice + 1 IoU-MSE, u ≡ 0) of a batch of pairs, mean over pairs.

    Arguments:
      targets: image_id -> (K, 1, h, w) GT in the loss frame (`target_frame`).
    """
    groups = _by_image(batch)
    parts = defaultdict(list)
    for (data, pairs), (r_b1hw, iou_b1) in zip(groups, _forward_groups(refiner, groups)):
        logits = loss_frame(r_b1hw.float(), data.input_size, refiner.img_size, loss_size)
        target = targets[data.image_id][[p.gt_index for p in pairs]]
        out = sam_loss(logits, iou_b1.float(), target)
        for k in ("loss", "focal", "dice", "iou"):
            parts[k].append(out[k])
    return {k: torch.cat(v).mean() for k, v in parts.items()}


@torch.no_grad()
def evaluate_pairs(refiner: RefinementModule, images: Sequence[ImageData], batch_size: int = 16) -> Dict[str, float]:
    """mIoU against the GT, at the original resolution, of SAM's input mask (``s > 0``) and of the
    refined mask (``r > 0``) over every pair of ``images``.

    Returns:
      {"n_pairs", "miou_sam", "miou_refined", "improved_fraction"}.
    """
    was_training = refiner.training
    refiner.eval()
    iou_s, iou_r = [], []
    for data in images:
        for start in range(0, len(data.pairs), batch_size):
            pairs = data.pairs[start : start + batch_size]
            r_b1hw, _ = refiner(data.features, *_prompts(refiner, data, pairs))
            s = np.stack([p.s.astype(np.float32) for p in pairs])
            s_up = upsample_low_res(s, refiner.img_size, data.input_size, data.original_size)
            r_up = upsample_low_res(r_b1hw[:, 0].cpu().numpy(), refiner.img_size, data.input_size, data.original_size)
            for j, p in enumerate(pairs):
                gt = data.gt_khw[p.gt_index]
                iou_s.append(mask_iou(s_up[j] > 0, gt))
                iou_r.append(mask_iou(r_up[j] > 0, gt))
    refiner.train(was_training)
    n = len(iou_s)
    return {
        "n_pairs": n,
        "miou_sam": float(np.mean(iou_s)) if n else float("nan"),
        "miou_refined": float(np.mean(iou_r)) if n else float("nan"),
        "improved_fraction": float(np.mean(np.array(iou_r) > np.array(iou_s))) if n else float("nan"),
    }


def train_refiner(
    refiner: RefinementModule,
    train: Sequence[ImageData],
    cfg: RefineConfig,
    val: Sequence[ImageData] = (),
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Tuple[List[Dict[str, float]], List[Dict[str, float]]]:
    """Fine-tune the prompt encoder and mask decoder of ``refiner`` on the pairs of ``train``
    (AdamW, constant lr, SAM loss at ``cfg.loss_size``; spec §4.1, A6), with early stopping on
    the held-out ``val`` pairs.

    When ``val`` has pairs, the refined mIoU on it (`evaluate_pairs`) is measured before training
    (epoch 0: the foundation weights) and after every epoch; training stops after
    ``cfg.patience`` epochs without a new best (0: never early), and the weights of the best epoch
    are restored, so the module is never worse on val than the copy of SAM it starts from.
    ``cfg.bf16`` runs forward and backward under bf16 autocast (the weights and the optimiser
    stay fp32).

    Returns:
      (per-step records {"step", "epoch", "loss", "focal", "dice", "iou"}, per-epoch records
      {"epoch", "steps", "train_loss", "val_miou_refined"}; the second is empty without val).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    items = [(d, p) for d in train for p in d.pairs]
    if not items:
        raise ValueError(f"refine.datasets={list(cfg.datasets)!r}: no training pair passed the filters (App. D.2)")
    targets = {d.image_id: target_frame(d.gt_khw, d.input_size, refiner.img_size, cfg.loss_size).to(refiner.device) for d in train}
    params = [p for p in refiner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_val = any(d.pairs for d in val)
    curve: List[Dict[str, float]] = []
    best_miou, best_state, best_epoch = -1.0, None, 0
    if use_val:
        best_miou = evaluate_pairs(refiner, val)["miou_refined"]
        best_state = copy.deepcopy(refiner.state_dict())
        curve.append({"epoch": 0, "steps": 0, "train_loss": float("nan"), "val_miou_refined": best_miou})
    refiner.train()
    history, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(items), generator=gen).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = [items[j] for j in order[start : start + cfg.batch_size]]
            with torch.autocast(refiner.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = batch_loss(refiner, batch, targets, cfg.loss_size)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            rec = {"step": step, "epoch": epoch, **{k: float(v.detach()) for k, v in out.items()}}
            history.append(rec)
            if on_step is not None:
                on_step(step, rec)
            step += 1
        if not use_val:
            continue
        miou = evaluate_pairs(refiner, val)["miou_refined"]
        losses = [h["loss"] for h in history if h["epoch"] == epoch]
        curve.append({"epoch": epoch, "steps": step, "train_loss": float(np.mean(losses)), "val_miou_refined": miou})
        log.info("refine epoch %d: train loss %.4f, val mIoU refined %.4f", epoch, curve[-1]["train_loss"], miou)
        if miou > best_miou:
            best_miou, best_state, best_epoch = miou, copy.deepcopy(refiner.state_dict()), epoch
        elif cfg.patience and epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        refiner.load_state_dict(best_state)
    refiner.eval()
    return history, curve
