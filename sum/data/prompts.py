"""Positive first-click sampling from binary masks (spec §6.2, §6.4), shared by interactive
training (`sum.train.sampling`) and the refinement module's training pairs (`sum.uncertainty`).

Points are ``(x, y)`` = (column, row) pixel indices in the frame of the mask they were drawn
from, as float; no 0.5 is added (SAM's prompt encoder adds it). Randomness comes only from the
``generator`` argument, which must live on the tensors' device. Certainty ``c = 1 − u`` weights
pixel draws; ``certainty=None`` draws uniformly.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor


class PointPrompt(NamedTuple):
    """Sampled point prompts.

    coords: (x, y) float; labels: 1 positive / 0 negative (long); is_fallback: True where the
    point is a fallback instead of a draw from the region (spec §6.4).
    """

    coords: Tensor
    labels: Tensor
    is_fallback: Tensor


def check_k1hw(name: str, t: Tensor) -> None:
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected (K, 1, H, W), got shape {tuple(t.shape)}")


def check_certainty(certainty: Optional[Tensor], like: Tensor) -> None:
    if certainty is None:
        return
    if certainty.shape != like.shape:
        raise ValueError(
            f"certainty: expected the mask's shape {tuple(like.shape)}, "
            f"got {tuple(certainty.shape)}"
        )
    if bool((certainty < 0).any()):
        raise ValueError("certainty: expected c = 1 - u >= 0 everywhere, found negative values")


def draw_pixels(
    region_khw: Tensor, weights_khw: Optional[Tensor], generator: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """One pixel per row, ``P(i) = w_i / Σ_{j∈R} w_j`` over the region R (spec §6.2-6.3).

    Returns ``(xy_k2, ok_k)``; ``ok`` is False where the region is empty or its weights sum to
    zero, and ``xy`` is then meaningless.
    """
    k, h, w = region_khw.shape
    weights_kp = region_khw.reshape(k, -1).to(torch.float32)
    if weights_khw is not None:
        weights_kp = weights_kp * weights_khw.reshape(k, -1).to(torch.float32)
    ok_k = weights_kp.sum(dim=1) > 0
    # multinomial rejects all-zero rows; give them dummy weights and discard their draw.
    weights_kp = torch.where(ok_k[:, None], weights_kp, torch.ones_like(weights_kp))
    index_k = torch.multinomial(weights_kp, 1, generator=generator)[:, 0]
    xy_k2 = torch.stack([index_k % w, index_k // w], dim=1).to(torch.float32)
    return xy_k2, ok_k


def fallback_points(
    need_k: Tensor,
    target_khw: Tensor,
    backup_points_k2: Optional[Tensor],
    generator: torch.Generator,
    what: str,
) -> Tensor:
    """Fallback (x, y) for rows in ``need_k`` (spec §6.4): the given backup point, else a uniform
    point inside the target mask (the spec's backup for GT masks, [INFERRED])."""
    k = target_khw.shape[0]
    if backup_points_k2 is not None:
        if tuple(backup_points_k2.shape) != (k, 2):
            raise ValueError(
                f"backup_points: expected shape ({k}, 2), got {tuple(backup_points_k2.shape)}"
            )
        return backup_points_k2.to(torch.float32)
    inside_khw = target_khw > 0
    empty_k = need_k & ~inside_khw.flatten(1).any(dim=1)
    if bool(empty_k.any()):
        bad = empty_k.nonzero()[:, 0].tolist()
        raise ValueError(
            f"{what}: masks {bad} are empty and no backup_points were given; "
            "drop empty masks upstream (spec A8) or pass backup_points"
        )
    xy_k2, _ = draw_pixels(inside_khw, None, generator)
    return xy_k2


def sample_first_points(
    masks_k1hw: Tensor,
    certainty_k1hw: Optional[Tensor] = None,
    *,
    generator: torch.Generator,
    backup_points_k2: Optional[Tensor] = None,
) -> PointPrompt:
    """First-round positive point for each of K target masks (spec §6.2).

    One pixel of ``R = {i : y_i = 1}`` with ``P(i) = c_i / Σ_{j∈R} c_j`` (certainty-weighted
    multinomial) or uniformly over R when ``certainty_k1hw`` is None; label 1. Fallback (spec
    §6.4): where R is empty or its certainty sums to zero, ``backup_points_k2`` (e.g. the AMG grid
    point of the pseudo label) if given, else a uniform point inside the mask (so a mask whose
    certainty is all zero still gets a positive click), else ``ValueError`` for an empty mask.

    Arguments:
      masks_k1hw: binary target masks (GT or pseudo label), (K, 1, H, W).
      certainty_k1hw: ``c = 1 − u`` (K, 1, H, W), or None.
      generator: the source of randomness.
      backup_points_k2: (K, 2) fallback (x, y), or None.
    Returns:
      ``PointPrompt`` with coords (K, 1, 2), labels (K, 1) all ones, is_fallback (K,).
    """
    check_k1hw("masks", masks_k1hw)
    check_certainty(certainty_k1hw, masks_k1hw)
    target_khw = masks_k1hw[:, 0]
    weights_khw = None if certainty_k1hw is None else certainty_k1hw[:, 0]
    xy_k2, ok_k = draw_pixels(target_khw > 0, weights_khw, generator)
    if not bool(ok_k.all()):
        backup_k2 = fallback_points(~ok_k, target_khw, backup_points_k2, generator, "first point")
        xy_k2 = torch.where(ok_k[:, None], xy_k2, backup_k2.to(xy_k2.device))
    labels_k1 = torch.ones(xy_k2.shape[0], 1, dtype=torch.long, device=xy_k2.device)
    return PointPrompt(xy_k2[:, None, :], labels_k1, ~ok_k)
