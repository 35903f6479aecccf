"""SUM's losses (spec §5): uncertainty-aware focal and Dice, IoU head, SAM's 20:1:1 mix.

Every mask tensor is 4-D, ``(N, 1, H, W)``, as the released reductions over dims (1, 2, 3)
require (spec D4); a multimask prediction is ``(N, M, H, W)`` with M = 3 outputs. The certainty
is ``c = 1 - u`` where ``u`` is the uncertainty map of a pseudo label (spec §4.2). Human labels
have ``u ≡ 0``: pass ``certainty=None`` (or all ones) and each loss reduces to SAM's plain one
(spec §5.5). Losses are returned per sample, shape ``(N,)``, so the caller decides how to average
(``combined_loss`` implements the spec's recommendation, §5.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossWeights:
    """SAM's loss weighting, kept by SUM: 20 focal : 1 Dice : 1 IoU-MSE (spec §5.5, §5.7)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0


def _check_masks(
    logits: Tensor, target: Tensor, certainty: Optional[Tensor], single_output: bool = True
) -> None:
    if logits.ndim != 4 or (single_output and logits.shape[1] != 1):
        expected = "(N, 1, H, W)" if single_output else "(N, M, H, W)"
        raise ValueError(
            f"prediction: expected {expected}, got shape {tuple(logits.shape)} (spec D4)"
        )
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, 1, h, w):
        raise ValueError(
            f"target: expected shape {(n, 1, h, w)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if certainty is not None and certainty.shape != target.shape:
        raise ValueError(
            f"certainty: expected the target's shape {tuple(target.shape)}, "
            f"got {tuple(certainty.shape)}"
        )


def sigmoid_focal_loss_per_pixel(
    logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Per-pixel focal loss, torchvision's ``sigmoid_focal_loss(reduction='none')`` (spec §5.2).

    ``l = α_t · BCE(x, y) · (1 − p_t)^γ`` with ``p_t = p·y + (1−p)(1−y)`` and
    ``α_t = α·y + (1−α)(1−y)``; a negative ``alpha`` disables the α_t factor, as in torchvision.

    Arguments:
      logits: predicted logits ``x``, any shape broadcastable with ``target``.
      target: binary label ``y`` (GT or pseudo label), float or bool.
    Returns:
      the broadcast shape of ``logits`` and ``target``, one loss per pixel.
    """
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    # BCE with logits written out so that a (N,1,H,W) target broadcasts over M outputs.
    ce = F.softplus(logits) - logits * target
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


def _focal_nm(logits_nmhw, target_n1hw, certainty_n1hw, alpha, gamma) -> Tensor:
    loss_nmhw = sigmoid_focal_loss_per_pixel(logits_nmhw, target_n1hw, alpha, gamma)
    if certainty_n1hw is not None:
        loss_nmhw = loss_nmhw * certainty_n1hw.to(loss_nmhw.dtype)
    return loss_nmhw.mean(dim=(2, 3))  # (N, M): mean over all m pixels, not over Σc


def _dice_nm(logits_nmhw, target_n1hw, certainty_n1hw, threshold, smooth) -> Tensor:
    p_nmhw = torch.sigmoid(logits_nmhw)
    y_n1hw = target_n1hw.to(p_nmhw.dtype)
    if certainty_n1hw is not None:
        keep_n1hw = (certainty_n1hw > threshold).to(p_nmhw.dtype)  # M_i = 1[c_i > θ]
        y_n1hw = y_n1hw * keep_n1hw
        p_nmhw = p_nmhw * keep_n1hw
    intersection_nm = (p_nmhw * y_n1hw).sum(dim=(2, 3))
    total_nm = p_nmhw.sum(dim=(2, 3)) + y_n1hw.sum(dim=(2, 3))
    return 1 - (2 * intersection_nm + smooth) / (total_nm + smooth)


def _iou_target_nm(probs_nmhw: Tensor, target_n1hw: Tensor) -> Tensor:
    with torch.no_grad():
        pred_nmhw = (probs_nmhw >= 0.5).to(probs_nmhw.dtype)
        y_n1hw = target_n1hw.to(probs_nmhw.dtype)
        intersection_nm = (pred_nmhw * y_n1hw).sum(dim=(2, 3))
        union_nm = pred_nmhw.sum(dim=(2, 3)) + y_n1hw.sum(dim=(2, 3)) - intersection_nm
        return intersection_nm / (union_nm + 1e-7)


def calc_iou(probs_n1hw: Tensor, target_n1hw: Tensor) -> Tensor:
    """IoU target of the IoU-prediction head, without gradient (spec §5.6).

    ``IoU = |1[p ≥ 0.5] ∩ y| / (|1[p ≥ 0.5]| + |y| − |1[p ≥ 0.5] ∩ y| + 1e-7)``. For a pseudo
    label the target is the binary pseudo label itself, with no uncertainty masking (spec A4).

    Arguments:
      probs_n1hw: probabilities ``σ(logits)``, (N, 1, H, W); **not** logits, the threshold is 0.5.
      target_n1hw: binary GT or pseudo label, (N, 1, H, W).
    Returns:
      (N,) IoU per sample (the released code returns (N, 1); squeeze is the only difference).
    """
    _check_masks(probs_n1hw, target_n1hw, None)
    return _iou_target_nm(probs_n1hw, target_n1hw)[:, 0]


def uncertainty_aware_focal_loss(
    logits_n1hw: Tensor, target_n1hw: Tensor, certainty_n1hw: Optional[Tensor] = None, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Uncertainty-aware focal loss, paper Eq. 1 (spec §5.3).

    ``L_UAfocal = (1/m) Σ_i c_i · l_focal(i)``: the mean over **all** m = H·W pixels, not
    normalised by Σc. With ``certainty_n1hw=None`` (human label, u ≡ 0) it is SAM's focal loss.

    Arguments:
      logits_n1hw: predicted logits, (N, 1, H, W).
      target_n1hw: binary GT or pseudo label, (N, 1, H, W).
      certainty_n1hw: ``c = 1 − u`` in [0, 1], (N, 1, H, W), or None for ``c ≡ 1``.
      alpha, gamma: focal parameters (spec: 0.25, 2).
    Returns:
      (N,) loss per sample.
    """
    _check_masks(logits_n1hw, target_n1hw, certainty_n1hw)
    return _focal_nm(logits_n1hw, target_n1hw, certainty_n1hw, alpha, gamma)[:, 0]


def uncertainty_aware_dice_loss(
    logits_n1hw: Tensor, target_n1hw: Tensor, certainty_n1hw: Optional[Tensor] = None, threshold: float = 0.6, smooth: float = 1.0
) -> Tensor:
    """Uncertainty-aware Dice loss, paper Eq. 2 (spec §5.4).

    With ``M_i = 1[c_i > θ]``, ``p = σ(x)``: ``1 − (2 Σ y·p·M + ε) / (Σ (y + p)·M + ε)``, so pixels
    with ``c ≤ θ`` are left out entirely. θ = 0.6 is the paper's value (the released default 0.5,
    which the HQ-SAM-arch recipe uses, must be passed explicitly; spec D3). With
    ``certainty_n1hw=None`` every pixel counts and this is SAM's Dice loss with ε = 1.

    Arguments:
      logits_n1hw: predicted logits, (N, 1, H, W); the sigmoid is applied here.
      target_n1hw: binary GT or pseudo label, (N, 1, H, W).
      certainty_n1hw: ``c = 1 − u``, (N, 1, H, W), or None for ``c ≡ 1``.
      threshold: θ; a pixel is kept when ``c > θ`` (strict).
      smooth: ε.
    Returns:
      (N,) loss per sample.
    """
    _check_masks(logits_n1hw, target_n1hw, certainty_n1hw)
    return _dice_nm(logits_n1hw, target_n1hw, certainty_n1hw, threshold, smooth)[:, 0]


def iou_prediction_loss(iou_pred_nm: Tensor, iou_target_nm: Tensor) -> Tensor:
    """MSE of the IoU-prediction head against ``calc_iou`` targets (spec §5.6, A4).

    Arguments:
      iou_pred_nm: predicted IoU per output, (N, M) (M = 1 or 3).
      iou_target_nm: IoU target per output, (N, M); treated as a constant.
    Returns:
      (N,) squared error averaged over the M outputs; its mean over N is ``F.mse_loss``.
    """
    if iou_pred_nm.shape != iou_target_nm.shape:
        raise ValueError(
            f"iou_pred {tuple(iou_pred_nm.shape)} and iou_target {tuple(iou_target_nm.shape)} "
            "must have the same (N, M) shape"
        )
    return ((iou_pred_nm - iou_target_nm.detach()) ** 2).mean(dim=1)


def multimask_min_loss(loss_nm: Tensor) -> Tuple[Tensor, Tensor]:
    """SAM's min-over-outputs loss for single-prompt rounds (spec §5.7, A4).

    Only the output with the lowest mask loss (``20·focal + Dice``) is back-propagated, per sample.

    Arguments:
      loss_nm: mask loss of each of the M outputs, (N, M).
    Returns:
      ``(loss_n, best_n)``: the minimum (N,), differentiable through the chosen output only, and
      the index (N,) of that output.
    """
    if loss_nm.ndim != 2:
        raise ValueError(f"loss_nm: expected (N, M), got shape {tuple(loss_nm.shape)}")
    best_n = loss_nm.detach().argmin(dim=1)
    return loss_nm.gather(1, best_n[:, None])[:, 0], best_n


def sam_loss(
    logits_nmhw: Tensor,
    iou_pred_nm: Tensor,
    target_n1hw: Tensor,
    certainty_n1hw: Optional[Tensor] = None,
    *,
    threshold: float = 0.6,
    alpha: float = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
    weights: LossWeights = LossWeights(),
) -> Dict[str, Tensor]:
    """The loss of one round for N target masks, per sample (spec §5.7, §5.9, A4).

    ``L = 20·L_(UA)focal + 1·L_(UA)Dice + 1·L_iou``. With M = 3 outputs (single-prompt round) the
    mask part is the per-sample minimum over outputs (``multimask_min_loss``) and the IoU-MSE
    covers all three outputs, each against its own mask's IoU; with M = 1 it is the plain sum.
    Labeled and pseudo-labeled samples go through the same formulas: a labeled row has
    certainty None or all ones (u ≡ 0), which makes it SAM's loss (spec §5.5).

    Arguments:
      logits_nmhw: mask logits at the loss resolution, (N, M, H, W), M = 1 or 3.
      iou_pred_nm: predicted IoUs, (N, M).
      target_n1hw: binary GT or pseudo label, (N, 1, H, W).
      certainty_n1hw: ``c = 1 − u``, (N, 1, H, W), or None for all-labeled input.
      threshold: Dice θ (spec §5.4: 0.6). alpha, gamma: focal (0.25, 2). smooth: Dice ε (1).
      weights: focal : Dice : IoU (20 : 1 : 1).
    Returns:
      dict of (N,) tensors: ``loss`` (total), ``mask`` (weighted focal + Dice of the chosen
      output), ``focal`` and ``dice`` (unweighted, chosen output), ``iou`` (IoU-MSE over all
      outputs), ``best`` (index of the chosen output, long).
    """
    _check_masks(logits_nmhw, target_n1hw, certainty_n1hw, single_output=False)
    n, m = logits_nmhw.shape[:2]
    if tuple(iou_pred_nm.shape) != (n, m):
        raise ValueError(f"iou_pred: expected shape {(n, m)}, got {tuple(iou_pred_nm.shape)}")
    focal_nm = _focal_nm(logits_nmhw, target_n1hw, certainty_n1hw, alpha, gamma)
    dice_nm = _dice_nm(logits_nmhw, target_n1hw, certainty_n1hw, threshold, smooth)
    mask_nm = weights.focal * focal_nm + weights.dice * dice_nm
    mask_n, best_n = multimask_min_loss(mask_nm)
    iou_target_nm = _iou_target_nm(torch.sigmoid(logits_nmhw.detach()), target_n1hw)
    iou_n = iou_prediction_loss(iou_pred_nm, iou_target_nm)
    pick = best_n[:, None]
    return {
        "loss": mask_n + weights.iou * iou_n,
        "mask": mask_n,
        "focal": focal_nm.gather(1, pick)[:, 0],
        "dice": dice_nm.gather(1, pick)[:, 0],
        "iou": iou_n,
        "best": best_n,
    }


def _per_image_weights(image_ids_n: Optional[Tensor], n: int, device) -> Tensor:
    """Weights (N,) that average over the masks of each image, then over images (spec §5.7)."""
    if image_ids_n is None:
        return torch.full((n,), 1.0 / n, device=device)
    if tuple(image_ids_n.shape) != (n,):
        raise ValueError(f"image_ids: expected shape ({n},), got {tuple(image_ids_n.shape)}")
    _, inverse_n, counts_i = torch.unique(image_ids_n, return_inverse=True, return_counts=True)
    return 1.0 / (counts_i[inverse_n].to(torch.float32) * counts_i.numel())


def combined_loss(
    logits_nmhw: Tensor,
    iou_pred_nm: Tensor,
    target_n1hw: Tensor,
    certainty_n1hw: Optional[Tensor] = None,
    *,
    is_pseudo_n: Optional[Tensor] = None,
    image_ids_n: Optional[Tensor] = None,
    **options,
) -> Dict[str, Tensor]:
    """Scalar loss of one round over a batch mixing labeled and pseudo-labeled masks (spec §5.5,
    §5.7, A4).

    Both kinds use the same 20:1:1 weights and the same per-pixel normalisation (focal: mean over
    all pixels; Dice: over kept pixels); a labeled mask is a pseudo label with u ≡ 0, so no extra
    labeled/unlabeled weight exists (the 1:1 mix is set by the batch composition, spec §8.1).
    Rows with ``is_pseudo_n`` False get ``c ≡ 1`` whatever ``certainty_n1hw`` holds there.
    Averaging (spec §5.7 [REC]): mean over the masks of an image, then over the images, so each
    image weighs the same whatever its mask count; without ``image_ids_n`` all N masks are taken
    to be from one image (plain mean). Summation over rounds is the caller's (spec A4).

    Arguments:
      logits_nmhw, iou_pred_nm, target_n1hw, certainty_n1hw: as in ``sam_loss``; certainty None
        means every row is treated as labeled (also the Vanilla baseline, spec §9).
      is_pseudo_n: (N,) bool, True for pseudo-labeled rows; None trusts ``certainty_n1hw``.
      image_ids_n: (N,) int, the image each mask comes from.
      options: ``threshold``, ``alpha``, ``gamma``, ``smooth``, ``weights``, passed to ``sam_loss``
        (same defaults).
    Returns:
      dict of scalars ``loss``, ``mask``, ``focal``, ``dice``, ``iou`` (same meaning as in
      ``sam_loss``, averaged as above).
    """
    n = logits_nmhw.shape[0]
    if certainty_n1hw is not None and is_pseudo_n is not None:
        if tuple(is_pseudo_n.shape) != (n,):
            raise ValueError(f"is_pseudo: expected shape ({n},), got {tuple(is_pseudo_n.shape)}")
        certainty_n1hw = torch.where(
            is_pseudo_n.to(torch.bool)[:, None, None, None],
            certainty_n1hw,
            torch.ones_like(certainty_n1hw),
        )
    per_sample = sam_loss(logits_nmhw, iou_pred_nm, target_n1hw, certainty_n1hw, **options)
    w_n = _per_image_weights(image_ids_n, n, logits_nmhw.device).to(per_sample["loss"].dtype)
    return {k: (w_n * per_sample[k]).sum() for k in ("loss", "mask", "focal", "dice", "iou")}
