"""Prompt sampling for interactive training (spec §6) and the round schedule (spec §7).

Points are ``(x, y)`` = (column, row) pixel indices in the frame of the mask they were drawn
from, as float; no 0.5 is added (SAM's prompt encoder adds it). The spec's frame is the padded
1024² input with u and the error region at that resolution (spec §6.4, A10, A14); the functions
here work at any resolution. Randomness comes only from the ``generator`` argument, which must
live on the tensors' device. Certainty ``c = 1 − u`` weights pixel draws for pseudo labels;
``certainty=None`` (human labels, or sampling without uncertainty) draws uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from sum.data.prompts import PointPrompt, check_certainty, check_k1hw, draw_pixels, fallback_points, sample_first_points

Tensor = torch.Tensor

JITTER_MODES = ("sum_code", "sam_paper")


def masks_to_boxes(masks_k1hw: Tensor) -> Tensor:
    """Tight box ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices) of each mask, the base
    box before jitter (spec §6.1); an empty mask gives ``[0, 0, 0, 0]`` as in SAM's
    ``batched_mask_to_box``.

    Arguments:
      masks_k1hw: binary masks, (K, 1, H, W).
    Returns:
      (K, 4) float boxes.
    """
    check_k1hw("masks", masks_k1hw)
    fg_khw = masks_k1hw[:, 0] > 0
    k, h, w = fg_khw.shape
    cols_kw = fg_khw.any(dim=1)
    rows_kh = fg_khw.any(dim=2)
    xs = torch.arange(w, device=masks_k1hw.device)
    ys = torch.arange(h, device=masks_k1hw.device)
    x_min = torch.where(cols_kw, xs, w).amin(dim=1)
    x_max = torch.where(cols_kw, xs, -1).amax(dim=1)
    y_min = torch.where(rows_kh, ys, h).amin(dim=1)
    y_max = torch.where(rows_kh, ys, -1).amax(dim=1)
    boxes_k4 = torch.stack([x_min, y_min, x_max, y_max], dim=1).to(torch.float32)
    empty_k = ~cols_kw.any(dim=1)
    return torch.where(empty_k[:, None], torch.zeros_like(boxes_k4), boxes_k4)


def add_jitter_to_boxes(
    boxes_xyxy: Tensor,
    image_hw: Tuple[int, int],
    *,
    generator: torch.Generator,
    mode: str = "sum_code",
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> Tensor:
    """Box-prompt jitter (spec §6.1, D2).

    ``mode='sum_code'`` (default, the released ``add_jitter_to_bounding_boxes``): one shift per box,
    ``n_x = clamp(N(0,1)·0.1·w, 0, 20)``, ``n_y = clamp(N(0,1)·0.1·h, 0, 20)``, added to both
    corners, i.e. a non-negative translation (half the draws are exactly 0).
    ``mode='sam_paper'`` (SAM App. A): independent noise per coordinate,
    ``clamp(N(0,1)·0.1·side, −20, 20)`` with side = w for x and h for y; corners that cross are
    swapped back so the box stays ``x_min ≤ x_max``, ``y_min ≤ y_max`` (not specified anywhere).
    In both modes each coordinate is then clamped to ``[0, W]`` / ``[0, H]``. Boxes are never
    uncertainty-weighted.

    Arguments:
      boxes_xyxy: (..., 4) boxes ``[x_min, y_min, x_max, y_max]``, e.g. (B, 1, 4) or (K, 4).
      image_hw: (H, W) of the frame the boxes are in.
      generator: the source of randomness.
      mode: 'sum_code' or 'sam_paper'.
      noise_fraction: std of the noise as a fraction of the box side (0.1).
      max_noise: cap on the noise in pixels (20).
    Returns:
      jittered boxes, same shape and dtype as ``boxes_xyxy``.
    """
    if boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"boxes: expected (..., 4), got shape {tuple(boxes_xyxy.shape)}")
    boxes = boxes_xyxy.to(torch.float32)
    side_wh = torch.stack(
        [boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], dim=-1
    )  # (..., 2)
    if mode == "sum_code":
        std_wh = noise_fraction * side_wh
        noise = torch.randn(std_wh.shape, generator=generator, device=boxes.device) * std_wh
        shift_wh = noise.clamp(0.0, max_noise)
        jittered = boxes + torch.cat([shift_wh, shift_wh], dim=-1)
    elif mode == "sam_paper":
        std_4 = noise_fraction * torch.cat([side_wh, side_wh], dim=-1)
        noise = torch.randn(std_4.shape, generator=generator, device=boxes.device) * std_4
        jittered = boxes + noise.clamp(-max_noise, max_noise)
        lo = torch.minimum(jittered[..., :2], jittered[..., 2:])
        hi = torch.maximum(jittered[..., :2], jittered[..., 2:])
        jittered = torch.cat([lo, hi], dim=-1)
    else:
        raise ValueError(f"mode={mode!r}: expected one of {JITTER_MODES}")
    h, w = image_hw
    upper = torch.tensor([w, h, w, h], dtype=jittered.dtype, device=jittered.device)
    jittered = torch.minimum(jittered.clamp(min=0.0), upper)
    return jittered.to(boxes_xyxy.dtype)


def sample_first_point(
    mask_hw: Tensor, certainty_hw: Optional[Tensor] = None, *, generator: torch.Generator, backup_point: Optional[Tensor] = None
) -> PointPrompt:
    """``sample_first_points`` for one (H, W) mask (spec §6.2).

    Returns:
      ``PointPrompt`` with coords (2,) = (x, y), labels () = 1, is_fallback ().
    """
    if mask_hw.ndim != 2:
        raise ValueError(f"mask: expected (H, W), got shape {tuple(mask_hw.shape)}")
    certainty_k1hw, backup_k2 = _as_one_of_k(certainty_hw, backup_point)
    out = sample_first_points(mask_hw[None, None], certainty_k1hw, generator=generator, backup_points_k2=backup_k2)
    return _the_one(out)


def sample_error_clicks(
    pred_k1hw: Tensor,
    target_k1hw: Tensor,
    certainty_k1hw: Optional[Tensor] = None,
    *,
    generator: torch.Generator,
    backup_points_k2: Optional[Tensor] = None,
    previous_points: Optional[Tuple[Tensor, Tensor]] = None,
) -> PointPrompt:
    """Next click of rounds 2-6 for each of K masks, from the error region (spec §6.3-6.4).

    ``R = {i : pred_i ≠ y_i}`` (false negatives ∪ false positives), one pixel drawn with
    ``P(i) = c_i / Σ_{j∈R} c_j`` (uniform over R when ``certainty_k1hw`` is None); the label is
    ``y`` at that pixel: 1 in a false negative, 0 in a false positive, so FN vs FP is chosen in
    proportion to the (weighted) areas. Fallback where R is empty or its certainty sums to zero:
    ``backup_points_k2`` with **label 1**, even where the error would call for a negative click,
    as released (spec §6.4, D11); without backup points a uniform point inside the target with
    label 1; ``ValueError`` if that target is empty too. On an accelerator the fallback is drawn
    every call and selected on the device (no host sync; no check of empty targets, which the
    trainer drops upstream, A8); on the CPU only when needed, so CPU runs draw as before.

    Arguments:
      pred_k1hw: the previous round's **binarised** prediction (``logits > 0`` at the sampling
        resolution, spec §7, A14), bool or {0, 1}, (K, 1, H, W).
      target_k1hw: binary GT or pseudo label, (K, 1, H, W).
      certainty_k1hw: ``c = 1 − u`` (K, 1, H, W), or None.
      generator: the source of randomness.
      backup_points_k2: (K, 2) fallback (x, y), or None.
      previous_points: ``(coords (K, n, 2), labels (K, n))`` of earlier rounds, or None.
    Returns:
      ``PointPrompt`` with coords (K, n+1, 2) and labels (K, n+1): the previous points with the
      new click appended (n = 0 without ``previous_points``); is_fallback (K,) for the new click.
    """
    check_k1hw("pred", pred_k1hw)
    check_k1hw("target", target_k1hw)
    if pred_k1hw.shape != target_k1hw.shape:
        raise ValueError(
            f"pred {tuple(pred_k1hw.shape)} and target {tuple(target_k1hw.shape)} differ in shape"
        )
    if pred_k1hw.dtype != torch.bool and bool(((pred_k1hw != 0) & (pred_k1hw != 1)).any()):
        raise ValueError("pred: expected a binary mask; binarise logits with `logits > 0` first")
    check_certainty(certainty_k1hw, target_k1hw)
    target_khw = target_k1hw[:, 0] > 0
    error_khw = (pred_k1hw[:, 0] > 0) != target_khw
    weights_khw = None if certainty_k1hw is None else certainty_k1hw[:, 0]
    xy_k2, ok_k = draw_pixels(error_khw, weights_khw, generator)
    k, h, w = target_khw.shape
    col_k = xy_k2[:, 0].long().clamp(0, w - 1)
    row_k = xy_k2[:, 1].long().clamp(0, h - 1)
    labels_k = target_khw[torch.arange(k, device=target_khw.device), row_k, col_k].long()
    if not host_syncs_are_free(target_khw.device):
        # no host sync: the fallback is drawn every round (targets are non-empty upstream, A8)
        backup_k2 = backup_points_k2 if backup_points_k2 is not None else draw_pixels(target_khw, None, generator)[0]
        xy_k2 = torch.where(ok_k[:, None], xy_k2, backup_k2.to(xy_k2))
        labels_k = torch.where(ok_k, labels_k, torch.ones_like(labels_k))
    elif not bool(ok_k.all()):  # free on the CPU, and it keeps the draws of every earlier run
        backup_k2 = fallback_points(~ok_k, target_khw, backup_points_k2, generator, "error click")
        xy_k2 = torch.where(ok_k[:, None], xy_k2, backup_k2.to(xy_k2.device))
        labels_k = torch.where(ok_k, labels_k, torch.ones_like(labels_k))
    coords_kn2, labels_kn = xy_k2[:, None, :], labels_k[:, None]
    if previous_points is not None:
        prev_coords, prev_labels = previous_points
        coords_kn2 = torch.cat([prev_coords.to(coords_kn2), coords_kn2], dim=1)
        labels_kn = torch.cat([prev_labels.to(labels_kn), labels_kn], dim=1)
    return PointPrompt(coords_kn2, labels_kn, ~ok_k)


def host_syncs_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (the CPU) or waits for the
    device's queue (an accelerator): the samplers branch on data only where it is free."""
    return torch.device(device).type == "cpu"


def sample_error_click(
    pred_hw: Tensor, target_hw: Tensor, certainty_hw: Optional[Tensor] = None, *, generator: torch.Generator,
    backup_point: Optional[Tensor] = None,
) -> PointPrompt:
    """``sample_error_clicks`` for one (H, W) mask (spec §6.3-6.4, D11).

    Returns:
      ``PointPrompt`` with coords (2,) = (x, y), labels () in {0, 1}, is_fallback ().
    """
    if pred_hw.ndim != 2 or target_hw.ndim != 2:
        raise ValueError(
            f"pred/target: expected (H, W), got {tuple(pred_hw.shape)} / {tuple(target_hw.shape)}"
        )
    certainty_k1hw, backup_k2 = _as_one_of_k(certainty_hw, backup_point)
    out = sample_error_clicks(
        pred_hw[None, None], target_hw[None, None], certainty_k1hw, generator=generator, backup_points_k2=backup_k2
    )
    return _the_one(out)


def _as_one_of_k(certainty_hw: Optional[Tensor], backup_point: Optional[Tensor]):
    """A single mask's certainty (H, W) and backup point (2,) as the K = 1 batch's, or None."""
    certainty_k1hw = None if certainty_hw is None else certainty_hw[None, None]
    return certainty_k1hw, None if backup_point is None else backup_point.reshape(1, 2)


def _the_one(out: PointPrompt) -> PointPrompt:
    """The prompt of a K = 1 batch's only mask: coords (2,), labels (), is_fallback ()."""
    return PointPrompt(out.coords[0, 0], out.labels[0, 0], out.is_fallback[0])


def sample_first_prompt_is_box(
    k: int, *, generator: torch.Generator, box_probability: float = 0.5, device=None
) -> Tensor:
    """Round-1 prompt type per target mask: box with probability 0.5, else one point (spec §7).

    Returns:
      (K,) bool, True for a (jittered) box, False for a first point.
    """
    return torch.rand(k, generator=generator, device=device) < box_probability


PROMPT_BOX_OR_POINT = "box_or_point"
PROMPT_ERROR_POINT = "error_point"
PROMPT_NONE = "none"


@dataclass(frozen=True)
class RoundSpec:
    """What one interactive round does (spec §7).

    index: 1-based round number.
    new_prompt: 'box_or_point' (round 1, §6.1/6.2), 'error_point' (§6.3) or 'none'.
    n_prompts: prompts in the set after this round (the box counts as one prompt).
    task_prompt_on: feed the task id (else id 0).
    multimask: 3 outputs with min-loss (exactly one prompt, spec A4), else token 0 only.
    mask_input: feed the previous round's low-res logits, detached, of the output with the highest
      predicted IoU (spec §7, A5); else ``no_mask_embed``.
    """

    index: int
    new_prompt: str
    n_prompts: int
    task_prompt_on: bool
    multimask: bool
    mask_input: bool


def round_schedule(
    n_rounds: int = 7,
    *,
    n_refinement_rounds: int = 1,
    use_task_prompt: bool = True,
    continuous_task_prompt: bool = False,
) -> Tuple[RoundSpec, ...]:
    """The interactive training schedule (spec §7): round 1 a box or a point, then one error click
    per round, then ``n_refinement_rounds`` rounds with no new prompt. Default 7 = 1 + 5 + 1.

    The task prompt is on in round 1 only (``continuous_task_prompt=True``: every round, the
    "SUM Continuous TP" ablation; ``use_task_prompt=False``: never, "SUM w/o Task Prompt").
    Multimask output (with min-loss) exactly when the prompt set holds one prompt, i.e. round 1
    (spec A4). Every round from 2 on takes the previous round's logits as mask input (spec A5).
    The loss is computed at every round and summed (spec A4), which is the trainer's job.

    Arguments:
      n_rounds: total rounds (spec: 7).
      n_refinement_rounds: final rounds without a new prompt (spec: 1).
      use_task_prompt, continuous_task_prompt: the ablation switches above.
    Returns:
      one ``RoundSpec`` per round.
    """
    if n_rounds < 1:
        raise ValueError(f"n_rounds={n_rounds}: expected at least 1")
    if not 0 <= n_refinement_rounds < n_rounds:
        raise ValueError(
            f"n_refinement_rounds={n_refinement_rounds}: expected 0..{n_rounds - 1} "
            f"(round 1 always adds a prompt)"
        )
    rounds = []
    n_prompts = 0
    for index in range(1, n_rounds + 1):
        if index == 1:
            new_prompt = PROMPT_BOX_OR_POINT
        elif index <= n_rounds - n_refinement_rounds:
            new_prompt = PROMPT_ERROR_POINT
        else:
            new_prompt = PROMPT_NONE
        n_prompts += new_prompt != PROMPT_NONE
        rounds.append(
            RoundSpec(
                index=index,
                new_prompt=new_prompt,
                n_prompts=n_prompts,
                task_prompt_on=use_task_prompt and (index == 1 or continuous_task_prompt),
                multimask=n_prompts == 1,
                mask_input=index > 1,
            )
        )
    return tuple(rounds)
