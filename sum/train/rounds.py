"""The interactive rounds of one training step (spec §5-§7), and their prompts.

- `first_prompts`: round 1's box (jittered, §6.1) or certainty-weighted point (§6.2), p = 0.5 each;
- `prompt_round`: one prompt-encoder + mask-decoder call on the shared image embedding, with the
  task prompt (§2.2) and the previous round's logits as mask input (§7, A5);
- `interactive_rounds`: the 7-round schedule of §7 for all masks of one image, the loss of §5 at
  every round, summed (A4), the error click of §6.3 between rounds;
- `forward_backward`: one rank's share of a step, back-propagated one round at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sum.data.prompts import sample_first_points
from sum.model.decoder import decode
from sum.model.losses import combined_loss
from sum.train.data import TrainItem
from sum.train.sampling import (
    PROMPT_ERROR_POINT,
    RoundSpec,
    add_jitter_to_boxes,
    sample_error_clicks,
    sample_first_prompt_is_box,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class RoundOptions:
    """What the interactive rounds need besides the model and the data (spec §5-§7)."""

    loss_size: int  # side of the padded loss frame (spec A10: the input size)
    box_probability: float = 0.5  # round 1: box with p, else one point (spec §7)
    jitter: str = "sum_code"  # box jitter mode (spec §6.1, D2)
    dice_threshold: float = 0.6  # θ of the uncertainty-aware Dice (spec §5.4)
    use_uncertainty_loss: bool = True  # c = 1 − u weights the losses of pseudo labels (§5.3-5.4)
    use_uncertainty_sampling: bool = True  # c weights the clicks on pseudo labels (§6.2-6.3)


@dataclass
class Prompts:
    """The prompts of K masks, the box-prompted ones first (spec §6.1-6.3).

    Box-prompted masks (the first ``n_box``) carry their jittered box and the clicks of later
    rounds; point-prompted ones their first point and later clicks. SAM's prompt encoder pads a
    point-only prompt with one empty token, so both kinds have the same token count every round
    and go through one decoder call.
    """

    n_box: int
    boxes_b4: Optional[Tensor]  # (Kb, 4) xyxy, input frame
    box_clicks: Optional[Tuple[Tensor, Tensor]]  # coords (Kb, n, 2), labels (Kb, n)
    points: Optional[Tuple[Tensor, Tensor]]  # coords (Kp, n + 1, 2), labels (Kp, n + 1)

    def add_click(self, coords_k12: Tensor, labels_k1: Tensor) -> "Prompts":
        """Append one click per mask to every mask's prompt set (spec §6.3: points accumulate)."""
        kb = self.n_box

        def cat(prev, c, l):
            return (c, l) if prev is None else (torch.cat([prev[0], c], 1), torch.cat([prev[1], l], 1))

        box_clicks = cat(self.box_clicks, coords_k12[:kb], labels_k1[:kb]) if kb else None
        points = cat(self.points, coords_k12[kb:], labels_k1[kb:]) if coords_k12.shape[0] > kb else None
        return Prompts(kb, self.boxes_b4, box_clicks, points)


def to_input_frame(xy: Tensor, scale: float) -> Tensor:
    """Loss-frame pixel indices -> input-frame coordinates at the pixel centre (spec §6.4: ×4 + 1.5
    for 256² -> 1024²; the prompt encoder adds the last 0.5)."""
    return xy * scale + (scale - 1.0) / 2.0


def first_prompts(
    item: TrainItem, generator: torch.Generator, opts: RoundOptions, certainty_k1hw: Optional[Tensor]
) -> Tuple[Tensor, Prompts]:
    """Round 1's prompt per mask: a jittered box (§6.1) or one point (§6.2), p = 0.5 each (§7).

    Arguments:
      item: the image and its K targets (loss frame), boxes (input frame).
      generator: the image's generator.
      opts: box probability, jitter mode.
      certainty_k1hw: c for certainty-weighted points (pseudo labels with uncertainty sampling),
        or None for uniform points.
    Returns:
      ``(order_k, prompts)``: the permutation putting box-prompted masks first, and their prompts.
    """
    device = item.masks_k1hw.device
    is_box_k = sample_first_prompt_is_box(
        item.n_masks, generator=generator, box_probability=opts.box_probability, device=device
    )
    order_k = torch.cat([is_box_k.nonzero()[:, 0], (~is_box_k).nonzero()[:, 0]])
    kb = int(is_box_k.sum())
    boxes = None
    if kb:
        boxes = add_jitter_to_boxes(item.boxes_k4[order_k[:kb]], item.input_hw, generator=generator, mode=opts.jitter)
    points = None
    if kb < item.n_masks:
        rest = order_k[kb:]
        first = sample_first_points(
            item.masks_k1hw[rest], None if certainty_k1hw is None else certainty_k1hw[rest], generator=generator
        )
        points = (to_input_frame(first.coords, item.frame_scale), first.labels)
    return order_k, Prompts(kb, boxes, None, points)


def prompt_round(
    sam: nn.Module,
    features_1chw: Tensor,
    prompts: Prompts,
    mask_input_k1hw: Optional[Tensor],
    task_prompt: int,
    multimask: bool,
) -> Tuple[Tensor, Tensor]:
    """One round's forward for K masks of one image, sharing its embedding (spec §2.2, §7, §14.2).

    Calls ``prompt_encoder(points, boxes, masks, task_prompt)`` for the box-prompted and the
    point-prompted masks, then the mask decoder once on both (not ``Sam.forward``: it is no_grad
    and has no task prompt), `sum.model.decoder.decode`.

    Arguments:
      sam: the SUM model.
      features_1chw: the image embedding (1, C, He, We).
      prompts: the prompt sets, box-prompted masks first.
      mask_input_k1hw: previous low-res logits (K, 1, 4He, 4We), detached, or None (no_mask_embed).
      task_prompt: task id for every mask of the round (0 = none).
      multimask: 3 outputs (single-prompt round) or token 0 only.
    Returns:
      low-res logits (K, M, 4He, 4We) and predicted IoUs (K, M), M = 3 or 1.
    """
    kb = prompts.n_box
    sparse, dense = [], []
    groups = [(slice(0, kb), prompts.box_clicks, prompts.boxes_b4), (slice(kb, None), prompts.points, None)]
    for rows, points, boxes in groups:
        if points is None and boxes is None:
            continue
        masks = None if mask_input_k1hw is None else mask_input_k1hw[rows]
        s, d = sam.prompt_encoder(points=points, boxes=boxes, masks=masks, task_prompt=task_prompt)
        sparse.append(s)
        dense.append(d)
    # folded: each mask has its own dense prompt from round 2 on, so SAM's decoder would project K
    # copies of the image tokens
    pe = sam.prompt_encoder.get_dense_pe()
    return decode(sam.mask_decoder, features_1chw, pe, torch.cat(sparse), torch.cat(dense), multimask)


def to_loss_frame(low_res_kmhw: Tensor, loss_size: int, valid_hw: Tuple[int, int]) -> Tensor:
    """Low-res logits -> the loss frame: bilinear to ``loss_size²`` (as ``postprocess_masks``), then
    the padding cropped off (spec A10), fp32."""
    x = low_res_kmhw.float()
    if x.shape[-1] != loss_size:
        x = F.interpolate(x, (loss_size, loss_size), mode="bilinear", align_corners=False)
    return x[..., : valid_hw[0], : valid_hw[1]]


def _pick(x_kmhw: Tensor, index_k: Tensor) -> Tensor:
    return x_kmhw[torch.arange(x_kmhw.shape[0], device=x_kmhw.device), index_k][:, None]


def interactive_rounds(
    sam: nn.Module,
    features_1chw: Tensor,
    item: TrainItem,
    generator: torch.Generator,
    schedule: Sequence[RoundSpec],
    opts: RoundOptions,
    backward: Optional[Callable[[Tensor], None]] = None,
) -> Dict[str, Tensor]:
    """The interactive schedule of spec §7 for all K masks of one image, one shared embedding.

    Round 1: box or point (`first_prompts`), the image's task prompt (labeled: its dataset's id;
    pseudo labels: 0), 3 outputs with min-loss. Rounds 2-6: one click from the error region of
    the previous prediction (§6.3, certainty-weighted for pseudo labels with uncertainty sampling),
    appended to the prompts; task prompt 0. Round 7: no new prompt. From round 2 on, the previous
    round's low-res logits of the output with the highest predicted IoU are the mask input,
    detached (A5); the error region is that output binarised in the loss frame (A14). The loss of
    §5 (`combined_loss`: uncertainty-aware for pseudo labels when on, plain for labeled data; mean
    over the image's masks) is computed at every round and summed (A4).

    Rounds depend on each other only through detached inputs (mask input, clicks) and the shared
    embedding, so ``backward``, when given, is called on each round's loss as soon as it exists:
    the gradient is that of the sum, and memory holds one round's graph instead of seven.

    Returns:
      ``loss`` (scalar, summed over rounds; detached when ``backward`` is given) and detached
      ``loss_first``, ``loss_last`` (rounds 1 and last) and ``iou_last`` (mean IoU of the last
      round's masks with their targets).
    """
    pseudo = item.is_pseudo
    c = item.certainty_k1hw
    c_loss = c if (pseudo and opts.use_uncertainty_loss) else None
    c_click = c if (pseudo and opts.use_uncertainty_sampling) else None
    order_k, prompts = first_prompts(item, generator, opts, c_click)
    target_k1hw = item.masks_k1hw[order_k].float()
    c_loss = None if c_loss is None else c_loss[order_k]
    c_click = None if c_click is None else c_click[order_k]
    valid_hw = tuple(target_k1hw.shape[-2:])
    total, losses = 0.0, []
    mask_input_k1hw = pred_k1hw = None
    for spec in schedule:
        if spec.new_prompt == PROMPT_ERROR_POINT:
            click = sample_error_clicks(pred_k1hw, target_k1hw, c_click, generator=generator)
            prompts = prompts.add_click(to_input_frame(click.coords, item.frame_scale), click.labels)
        task = item.task_id if spec.task_prompt_on else 0
        low_res_kmhw, iou_km = prompt_round(
            sam, features_1chw, prompts, mask_input_k1hw if spec.mask_input else None, task, spec.multimask
        )
        logits_kmhw = to_loss_frame(low_res_kmhw, opts.loss_size, valid_hw)
        loss = combined_loss(logits_kmhw, iou_km.float(), target_k1hw, c_loss, threshold=opts.dice_threshold)["loss"]
        if backward is not None:
            backward(loss)
            loss = loss.detach()
        total = total + loss
        losses.append(loss.detach())
        best_k = iou_km.detach().argmax(dim=1)
        mask_input_k1hw = _pick(low_res_kmhw.detach(), best_k)
        pred_k1hw = _pick(logits_kmhw.detach(), best_k) > 0
    inter = (pred_k1hw & (target_k1hw > 0)).flatten(1).sum(1)
    union = (pred_k1hw | (target_k1hw > 0)).flatten(1).sum(1)
    iou_last = (inter / union.clamp(min=1)).mean()
    return {"loss": total, "loss_first": losses[0], "loss_last": losses[-1], "iou_last": iou_last}


def encode(sam: nn.Module, items: Sequence[TrainItem]) -> Tensor:
    """Full mode: the image encoder on this rank's images, with grad (spec §8.1)."""
    device = sam.pixel_mean.device
    x = torch.cat([sam.preprocess(it.image_3hw[None].to(device, torch.float32, non_blocking=True)) for it in items])
    return sam.image_encoder(x)


def forward_backward(
    sam: nn.Module,
    batch: Sequence[Tuple[TrainItem, torch.Generator]],
    features_nchw: Optional[Tensor],
    schedule: Sequence[RoundSpec],
    opts: RoundOptions,
    loss_scale: float,
    autocast,
) -> Dict[str, Tensor]:
    """Forward and backward of this rank's images, one round at a time (spec §7, A4).

    Each image's round losses are summed (A4) and scaled by ``loss_scale`` (= W / global batch
    size), so that the gradient averaged over ranks is that of the mean over the global batch.
    Backward runs after every round (`interactive_rounds`), which keeps one round's graph in
    memory. In full mode the encoder runs once on the rank's images and its output enters the
    rounds as a leaf: the rounds accumulate the embedding's gradient there, and the encoder's
    backward runs once at the end.

    Arguments:
      sam: the SUM model.
      batch: (item, generator) per image.
      features_nchw: cached embeddings (decoder mode), or None to run the encoder (full mode).
      schedule, opts: the rounds and their options.
      loss_scale: W / global batch size.
      autocast: the forward's autocast context (bf16 on CUDA); backward runs outside it.
    Returns:
      detached sums over the images: ``loss_sum``, ``loss_first``, ``loss_last``, ``iou_last``,
      ``images``, ``masks``.
    """
    encoded = None
    if features_nchw is None:
        with autocast:
            encoded = encode(sam, [it for it, _ in batch])
        features_nchw = encoded.detach().requires_grad_()
    device = features_nchw.device
    no_autocast = torch.autocast(device.type, enabled=False)

    def backward(loss: Tensor) -> None:
        with no_autocast:
            (loss * loss_scale).backward()

    sums = {k: torch.zeros((), device=device) for k in ("loss_sum", "loss_first", "loss_last", "iou_last", "images", "masks")}
    for i, (item, generator) in enumerate(batch):
        if item.n_masks == 0:
            continue
        with autocast:
            out = interactive_rounds(sam, features_nchw[i : i + 1], item, generator, schedule, opts, backward=backward)
        sums["loss_sum"] += out["loss"]
        for k in ("loss_first", "loss_last", "iou_last"):
            sums[k] += out[k]
        sums["images"] += 1
        sums["masks"] += item.n_masks
    if encoded is not None and features_nchw.grad is not None:
        with no_autocast:
            encoded.backward(features_nchw.grad)
    return sums
