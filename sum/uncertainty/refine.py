"""The mask-refinement module (spec §4.1; NOT RELEASED by the authors: built from the paper's
description, with the choices below).

Architecture (paper §3.2.3, App. B.2): a *separate copy* of SAM's prompt encoder and mask decoder,
initialised from the foundation weights and fine-tuned; the image encoder is frozen and not even
run here: the module reads cached image embeddings (shared with SAM's, spec §4.1). Inputs are the
three prompts together, in one forward (App. D: isolated box or point prompts hurt):

1. mask prompt = SAM's low-res logits of the pseudo label (the dense mask input, 256x256);
2. box prompt = the box of that mask;
3. point prompt = the point that produced it (the AMG grid point; for training, the GT point).

Output = the single-output token (index 0, ``multimask_output=False``; spec §4.1 [INFERRED]).

Training pairs (App. D.2, `select_pairs`): for each GT mask of the human-annotated set, SAM is
prompted with one point drawn uniformly from the GT (``points_per_mask`` draws, seeded), the output
with the highest IoU to the GT is taken, and the pair is kept when that IoU >= 0.7 and it passes
SAM's AMG quality filters (predicted IoU >= 0.88, stability score >= 0.95, computed as the AMG does:
IoU of the masks thresholded at ±1 logit, on logits upsampled to the image). Target = the GT mask.

Choices where the paper is silent (spec §4.1 [REC], §13 A6, A10):

- loss: SAM's ``20·focal + 1·Dice + 1·IoU-MSE`` (`sum.train.losses.sam_loss`, u ≡ 0);
- optimiser: AdamW, lr in [1e-5, 1e-4] per A6 (default 1e-4, as A6 allows when tuning a
  pretrained decoder), weight decay 0.1 (A2), constant lr;
- loss resolution: A10 recommends upsampling the 256² logits to 1024² and cropping the padding.
  On the 2-core CPU budget the default computes the loss at ``loss_size=256``, the decoder's own
  resolution (the GT downsampled with antialiasing, the padding cropped), which skips a 16x
  larger upsample per mask; ``loss_size=1024`` is A10 exactly. Validation always scores at the
  original image resolution;
- schedule: A6's 12 epochs x batch 32 is HQSeg-44K on 8 A100s; the embedded default trains for
  ``epochs`` over the few hundred hq_train pairs, sized to ~2-3 min on the CPU (`RefineConfig`);
- validation: ``val_fraction`` of the images (seeded) are held out; val pairs are built and
  filtered the same way, and the mIoU of SAM's input mask and of the refined mask against the GT
  is reported (before and after training).

The checkpoint (`save_refiner`) holds the prompt encoder and mask decoder state, the model
architecture config, the `RefineConfig` and the metrics; written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from sum.io import atomic_torch_save

log = logging.getLogger(__name__)

REFINER_FORMAT = "sum-refiner"
REFINER_VERSION = 1


from sum.config import RefineConfig  # noqa: E402,F401  (re-exported for callers)


class RefinementModule(nn.Module):
    """SAM's prompt encoder + mask decoder, a separate copy, driven by mask + box + point prompts
    together, single output (spec §4.1).

    Arguments:
      prompt_encoder: a ``PromptEncoder`` (or `TaskPromptEncoder`, used with task prompt 0).
      mask_decoder: a ``MaskDecoder``.
      img_size: the padded input side the prompts' coordinates refer to (1024 for SAM).
      folded: compute the decoder with `sum.model.folded_decoder.folded_decode` (same function,
        ~2x faster; used when the decoder's upscaling is SAM's), else SAM's ``MaskDecoder``.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, img_size: int, folded: bool = True) -> None:
        super().__init__()
        from sum.model.folded_decoder import upscaling_is_sam

        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(img_size)
        self.folded = bool(folded) and upscaling_is_sam(mask_decoder)

    @classmethod
    def from_sam(cls, sam: nn.Module) -> "RefinementModule":
        """A copy of ``sam``'s prompt encoder and mask decoder (the foundation weights)."""
        return cls(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder), sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def low_res_size(self) -> int:
        return 4 * int(self.prompt_encoder.image_embedding_size[0])

    def forward(
        self,
        features_1chw: torch.Tensor,
        points_bn2: torch.Tensor,
        labels_bn: torch.Tensor,
        boxes_b4: torch.Tensor,
        mask_logits_b1hw: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Refined logits for B pseudo labels of one image.

        Arguments:
          features_1chw: the image embedding, (1, C, He, We).
          points_bn2: (B, N, 2) points (x, y) in the ``ResizeLongestSide`` input frame.
          labels_bn: (B, N) point labels (1 positive).
          boxes_b4: (B, 4) xyxy boxes in the input frame.
          mask_logits_b1hw: (B, 1, 4He, 4We) SAM low-res logits ``s`` (the mask prompt).
        Returns:
          (refined logits r (B, 1, 4He, 4We), predicted IoU (B, 1)).
        """
        from sum.model.folded_decoder import folded_decode

        pe = self.prompt_encoder
        kwargs = {"task_prompt": 0} if hasattr(pe, "task_prompt_embedding") else {}
        sparse_bnc, dense_bchw = pe(points=(points_bn2, labels_bn), boxes=boxes_b4, masks=mask_logits_b1hw, **kwargs)
        if self.folded:
            return folded_decode(self.mask_decoder, features_1chw, pe.get_dense_pe(), sparse_bnc, dense_bchw)
        return self.mask_decoder(
            image_embeddings=features_1chw,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse_bnc,
            dense_prompt_embeddings=dense_bchw,
            multimask_output=False,
        )


# ---- training pairs (App. D.2) ---------------------------------------------------------------


@dataclass
class Pair:
    """One training pair: SAM's output for a single GT point, and the GT it should become.

    Coordinates are in the original image frame; ``s`` is SAM's low-res logits (h, w) float16.
    """

    image_id: str
    gt_index: int
    point_xy: np.ndarray  # (2,)
    box_xyxy: np.ndarray  # (4,) box of SAM's mask
    s: np.ndarray  # (h, w) float16
    iou_to_gt: float
    predicted_iou: float
    stability: float


def pair_filter(
    iou_to_gt: torch.Tensor,
    predicted_iou: torch.Tensor,
    stability: torch.Tensor,
    iou_filter: float = 0.7,
    pred_iou_thresh: float = 0.88,
    stability_thresh: float = 0.95,
) -> torch.Tensor:
    """Which candidate pairs are kept (App. D.2): ``IoU(SAM, GT) >= iou_filter`` and SAM's AMG
    filters, ``predicted IoU >= pred_iou_thresh`` and ``stability >= stability_thresh``.

    The AMG keeps ``predicted IoU > thresh`` (strict) and ``stability >= thresh``; the paper
    states the pair rule as "IoU < 0.7 excluded", so equality keeps a pair on all three here.

    Returns:
      bool tensor of the inputs' shape.
    """
    return (iou_to_gt >= iou_filter) & (predicted_iou >= pred_iou_thresh) & (stability >= stability_thresh)


class PointPredictor:
    """SAM's three outputs for single positive points on one image, what
    ``SumPredictor.predict_torch(points, labels, multimask_output=True, return_logits=True)``
    returns, with the prompt-independent decoder work done once per image
    (`sum.pseudo.amg.PointBatchDecoder`; logits agree with SAM's decoder to float rounding).

    Arguments:
      predictor: a `SumPredictor` with the image's embedding set.
    """

    def __init__(self, predictor) -> None:
        from sum.pseudo.amg import PointBatchDecoder

        self.model = predictor.model
        self.transform = predictor.transform
        self.original_size = tuple(predictor.original_size)
        self.input_size = tuple(predictor.input_size)
        self.device = predictor.device
        self.decoder = PointBatchDecoder(predictor.model, predictor.features)

    @torch.no_grad()
    def predict_torch(self, point_coords, point_labels, multimask_output=True, return_logits=True):
        """(logits (B, 3, H, W) at the original size, predicted IoU (B, 3), low-res logits
        (B, 3, h, w)) for points (B, 1, 2) in the input frame, all labelled positive."""
        if not (multimask_output and return_logits) or point_coords.shape[1] != 1 or not bool((point_labels == 1).all()):
            raise ValueError("PointPredictor: one positive point per prompt, multimask logits only")
        iou_b3, _, low_k_hw = self.decoder(point_coords[:, 0], 0.0)  # threshold 0: all 3 outputs
        b = point_coords.shape[0]
        low_b3hw = low_k_hw.view(b, 3, *low_k_hw.shape[-2:])
        logits_b3hw = self.model.postprocess_masks(low_b3hw, self.input_size, self.original_size)
        return logits_b3hw, iou_b3, low_b3hw


def _iou_nm(pred_nmhw: torch.Tensor, gt_n1hw: torch.Tensor) -> torch.Tensor:
    inter = (pred_nmhw & gt_n1hw).flatten(2).sum(-1).float()
    union = (pred_nmhw | gt_n1hw).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


@torch.no_grad()
def select_pairs(
    predictor,
    image_id: str,
    gt_khw: np.ndarray,
    cfg: RefineConfig,
    generator: torch.Generator,
) -> Tuple[List[Pair], Dict[str, int]]:
    """Candidate pairs of one image and the ones kept (App. D.2).

    Arguments:
      predictor: a `SumPredictor` of the foundation SAM with this image's embedding set.
      image_id: the image.
      gt_khw: (K, H, W) bool GT masks.
      cfg: ``points_per_mask`` and the filter thresholds.
      generator: CPU generator the points are drawn with.
    Returns:
      (kept pairs, counts {"candidates", "kept", "low_iou", "low_quality"}).
    """
    from sum.train.sampling import sample_first_points

    gt = torch.as_tensor(gt_khw)
    keep_gt = gt.flatten(1).any(1)
    gt = gt[keep_gt]
    gt_index = torch.nonzero(keep_gt)[:, 0]
    counts = {"candidates": 0, "kept": 0, "low_iou": 0, "low_quality": 0}
    if gt.shape[0] == 0:
        return [], counts
    points = [sample_first_points(gt[:, None], generator=generator).coords[:, 0] for _ in range(cfg.points_per_mask)]
    pts_b2 = torch.cat(points).to(torch.float32)  # (P*K, 2): point-major
    gt_b = gt.repeat(cfg.points_per_mask, 1, 1)
    idx_b = gt_index.repeat(cfg.points_per_mask)
    coords = predictor.transform.apply_coords_torch(pts_b2[:, None], predictor.original_size).to(predictor.device)
    labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
    logits_b3hw, iou_pred_b3, low_res_b3hw = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    logits_b3hw, iou_pred_b3, low_res_b3hw = logits_b3hw.cpu(), iou_pred_b3.cpu(), low_res_b3hw.cpu()
    iou_b3 = _iou_nm(logits_b3hw > 0, gt_b[:, None])
    best_b = iou_b3.argmax(1)
    pick = torch.arange(len(best_b))
    best_logits = logits_b3hw[pick, best_b]
    stability_b = calculate_stability_score(best_logits, 0.0, cfg.stability_offset)
    iou_b, pred_b = iou_b3[pick, best_b], iou_pred_b3[pick, best_b]
    keep_b = pair_filter(iou_b, pred_b, stability_b, cfg.iou_filter, cfg.pred_iou_thresh, cfg.stability_thresh)
    boxes_b4 = batched_mask_to_box(best_logits > 0)
    counts["candidates"] = len(best_b)
    counts["kept"] = int(keep_b.sum())
    counts["low_iou"] = int((iou_b < cfg.iou_filter).sum())
    counts["low_quality"] = int(((iou_b >= cfg.iou_filter) & ~keep_b).sum())
    pairs = [
        Pair(
            image_id=str(image_id),
            gt_index=int(idx_b[j]),
            point_xy=pts_b2[j].numpy().astype(np.float64),
            box_xyxy=boxes_b4[j].numpy().astype(np.float64),
            s=low_res_b3hw[j, best_b[j]].numpy().astype(np.float16),
            iou_to_gt=float(iou_b[j]),
            predicted_iou=float(pred_b[j]),
            stability=float(stability_b[j]),
        )
        for j in torch.nonzero(keep_b)[:, 0].tolist()
    ]
    return pairs, counts


# ---- one image's data for training and validation --------------------------------------------


@dataclass
class ImageData:
    """An image's embedding, sizes, GT masks, and its kept pairs."""

    image_id: str
    features: torch.Tensor  # (1, C, He, We)
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    gt_khw: np.ndarray
    pairs: List[Pair] = field(default_factory=list)


def split_images(image_ids: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """(train ids, val ids): a seeded random ``val_fraction`` of the images is held out (at least
    one when ``val_fraction > 0`` and there are two or more images)."""
    ids = list(image_ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[j] for j in order[:n_val]}
    return [i for i in ids if i not in val], [i for i in ids if i in val]


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
    from sum.train.losses import sam_loss

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
    from sum.eval.metrics import mask_iou
    from sum.uncertainty.maps import uncertainty_at

    was_training = refiner.training
    refiner.eval()
    iou_s, iou_r = [], []
    for data in images:
        for start in range(0, len(data.pairs), batch_size):
            pairs = data.pairs[start : start + batch_size]
            r_b1hw, _ = refiner(data.features, *_prompts(refiner, data, pairs))
            s = np.stack([p.s.astype(np.float32) for p in pairs])
            s_up = uncertainty_at(s, refiner.img_size, data.input_size, data.original_size)
            r_up = uncertainty_at(r_b1hw[:, 0].cpu().numpy(), refiner.img_size, data.input_size, data.original_size)
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
        raise ValueError(f"refine.dataset={cfg.dataset!r}: no training pair passed the filters (App. D.2)")
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


# ---- checkpoint --------------------------------------------------------------------------------


def save_refiner(
    refiner: RefinementModule,
    path: str | os.PathLike,
    model_config,
    refine_config: Optional[RefineConfig] = None,
    metrics: Optional[dict] = None,
) -> Path:
    """Write the module (prompt encoder + mask decoder state only), the architecture config, the
    `RefineConfig` and the metrics; atomically.

    Returns:
      ``path``.
    """
    from sum.model.checkpoint import _check_plain, config_to_dict

    stored = config_to_dict(model_config)
    stored.update(checkpoint=None, checkpoint_sha256=None)
    # wall times are logged, not stored: the checkpoint's bytes (its DVC hash) must not depend on load
    kept = {k: v for k, v in (metrics or {}).items() if not k.startswith("seconds")}
    meta = {"metrics": kept, "refine_config": dataclasses.asdict(refine_config) if refine_config else {}}
    _check_plain(meta, "meta")
    _check_plain(stored, "model_config")
    obj = {
        "format": REFINER_FORMAT,
        "version": REFINER_VERSION,
        "model_config": stored,
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in refiner.state_dict().items()),
        "meta": meta,
    }
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def build_refinement_module(model_config) -> RefinementModule:
    """An (untrained) module of the architecture of ``model_config``, built by
    `sum.model.build.build_sum_model` so that sizes stay in one place."""
    from sum.model.build import build_sum_model

    sam = build_sum_model(model_config)
    return RefinementModule(sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.img_size)


def load_refiner(path: str | os.PathLike, device: torch.device | str = "cpu") -> Tuple[RefinementModule, dict]:
    """The module of a `save_refiner` file, in eval mode, and its meta (metrics, refine config).

    Raises:
      FileNotFoundError, ValueError: one line naming the file.
    """
    from sum.model.checkpoint import CheckpointError, apply_state_dict, config_from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: refinement-module checkpoint not found (run `sum refine`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types on bad bytes)
        raise ValueError(f"{path}: not a readable refinement-module checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != REFINER_FORMAT:
        raise ValueError(f"{path}: not a refinement-module checkpoint (expected format {REFINER_FORMAT!r})")
    if obj.get("version") != REFINER_VERSION:
        raise ValueError(f"{path}: refiner version {obj.get('version')!r}, this code reads {REFINER_VERSION}")
    for key in ("model_config", "state_dict"):
        if key not in obj:
            raise ValueError(f"{path}: refinement-module checkpoint without {key!r}")
    try:
        cfg = config_from_dict(obj["model_config"], str(path))
        refiner = build_refinement_module(cfg)
        apply_state_dict(refiner, obj["state_dict"], str(path))
    except (CheckpointError, TypeError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    return refiner.to(device).eval(), dict(obj.get("meta") or {})


# ---- the stage ---------------------------------------------------------------------------------


def prepare_images(
    model,
    dataset,
    cfg: RefineConfig,
    embedding_of: Optional[Callable[[str], object]] = None,
) -> Tuple[List[ImageData], Dict[str, int]]:
    """Embeddings (cached or computed once per image, in memory), GT and kept pairs of every image
    of the human-annotated ``dataset``.

    Returns:
      (images with at least one GT mask, pair counts summed over images).
    """
    from sum.model.predictor import SumPredictor

    predictor = SumPredictor(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    counts: Dict[str, int] = defaultdict(int)
    images = []
    n = len(dataset) if cfg.max_images <= 0 else min(cfg.max_images, len(dataset))
    for i in range(n):
        sample = dataset[i]
        if sample.masks.shape[0] == 0:
            continue
        if embedding_of is not None:
            predictor.set_embedding(embedding_of(sample.image_id))
        else:
            predictor.set_image(sample.image)
        pairs, c = select_pairs(PointPredictor(predictor), sample.image_id, sample.masks, cfg, gen)
        for k, v in c.items():
            counts[k] += v
        images.append(
            ImageData(
                image_id=sample.image_id,
                features=predictor.features.detach().clone(),
                original_size=tuple(predictor.original_size),
                input_size=tuple(predictor.input_size),
                gt_khw=sample.masks,
                pairs=pairs,
            )
        )
    return images, dict(counts)


def fit_refiner(model, dataset, cfg: RefineConfig, embedding_of=None) -> Tuple[RefinementModule, dict]:
    """Pairs, split, training and validation of the refinement module (spec §4.1).

    Arguments:
      model: the foundation SAM (weights loaded).
      dataset: the human-annotated `SegDataset`.
      cfg: `RefineConfig`.
      embedding_of: image_id -> `ImageEmbedding` (the ``embed`` cache), or None to encode.
    Returns:
      (trained module, metrics dict).
    """
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images, counts = prepare_images(model, dataset, cfg, embedding_of)
    t_pairs = time.perf_counter() - t0
    train_ids, val_ids = split_images([d.image_id for d in images], cfg.val_fraction, cfg.seed)
    train = [d for d in images if d.image_id in set(train_ids)]
    val = [d for d in images if d.image_id in set(val_ids)]
    refiner = RefinementModule.from_sam(model).to(model.device)
    for p in refiner.parameters():
        p.requires_grad_(True)
    pe = refiner.prompt_encoder
    if getattr(pe, "zero_token_no_grad", False) and hasattr(pe, "task_prompt_embedding"):
        pe.task_prompt_embedding[0].weight.requires_grad_(False)  # task id 0 stays SAM (spec §2.2)
    sam_val = evaluate_pairs(refiner, val)  # the untrained copy of SAM (epoch 0)
    t1 = time.perf_counter()
    history, curve = train_refiner(refiner, train, cfg, val)
    t_train = time.perf_counter() - t1
    after = evaluate_pairs(refiner, val)
    n_train = sum(len(d.pairs) for d in train)
    first = history[: max(1, len(history) // 10)]
    last = history[-max(1, len(history) // 10) :]
    best = max(curve, key=lambda c: c["val_miou_refined"]) if curve else {"epoch": len({h["epoch"] for h in history})}
    metrics = {
        "pairs_candidates": counts.get("candidates", 0),
        "pairs_kept": counts.get("kept", 0),
        "pairs_low_iou": counts.get("low_iou", 0),
        "pairs_low_quality": counts.get("low_quality", 0),
        "train_images": len(train),
        "train_pairs": n_train,
        "val_images": len(val),
        "val_pairs": after["n_pairs"],
        "steps": len(history),
        "epochs_run": int(history[-1]["epoch"]),
        "best_epoch": int(best["epoch"]),
        "train_loss_first": float(np.mean([h["loss"] for h in first])),
        "train_loss_last": float(np.mean([h["loss"] for h in last])),
        "val_miou_sam": after["miou_sam"],
        "val_miou_refined_init": sam_val["miou_refined"],
        "val_miou_refined": after["miou_refined"],
        "val_improved_fraction": after["improved_fraction"],
        # the choice of the epoch (and, across runs, of lr) on val: SAM's masks vs refined
        "val_miou_refined_by_epoch": {str(c["epoch"]): c["val_miou_refined"] for c in curve},
        "seconds_pairs": round(t_pairs, 2),
        "seconds_train": round(t_train, 2),
    }
    log.info(
        "refine: %d train pairs, %d steps in %.0f s; val mIoU SAM %.4f -> refined %.4f (untrained %.4f, best epoch %d)",
        n_train, len(history), t_train, metrics["val_miou_sam"], metrics["val_miou_refined"],
        metrics["val_miou_refined_init"], metrics["best_epoch"],
    )
    return refiner, metrics


def run_refine(cfg) -> dict:
    """The ``refine`` stage: train the refinement module on ``cfg.refine.dataset`` with the
    foundation model of ``cfg.model`` and save it to ``cfg.refine.out``.

    Raises:
      ValueError: naming ``refine.dataset`` when it is not a configured dataset.
    """
    from sum.data.dataset import build_dataset
    from sum.io import S3Options
    from sum.model.checkpoint import load_model
    from sum.tracking import json_metrics, stage_run

    rcfg = cfg.refine
    if rcfg.dataset not in cfg.data.datasets:
        raise ValueError(f"refine.dataset={rcfg.dataset!r}: not in data.datasets ({sorted(cfg.data.datasets)})")
    torch.manual_seed(0)
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    for p in model.parameters():
        p.requires_grad_(False)
    dataset = build_dataset(cfg.data.datasets[rcfg.dataset], rcfg.dataset)
    embedding_of = None
    embed_dir = getattr(getattr(cfg, "embed", None), "out_dir", None)
    if embed_dir is not None and (Path(embed_dir) / rcfg.dataset / "index.json").is_file():
        from sum.model.embeddings import EmbeddingCache
        from sum.model.predictor import encoder_fingerprint

        cache = EmbeddingCache(embed_dir, fingerprint=encoder_fingerprint(model))
        embedding_of = lambda image_id: cache.load(rcfg.dataset, image_id)  # noqa: E731
    with stage_run(cfg.tracking, "refine", params={"refine": rcfg}) as tracker:
        refiner, metrics = fit_refiner(model, dataset, rcfg, embedding_of)
        save_refiner(refiner, rcfg.out, cfg.model, rcfg, metrics)
        tracker.log_metrics(json_metrics(metrics), step=0)
    return metrics
