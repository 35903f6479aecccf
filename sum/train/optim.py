"""What trains and how fast: AdamW parameter groups with layer-wise lr decay, the lr schedule
(spec §8.1, §13 A2).

Two modes (``TrainConfig.mode``):

- ``full`` (the paper's default, "fine-tuning the whole SAM"): every parameter trains, the image
  encoder with layer-wise lr decay in the standard BEiT/MAE form of spec §8.1: with L encoder
  blocks, block ``b`` (0-indexed) gets ``lr · d^(L − b)``, the patch embedding and absolute
  position embedding ``lr · d^(L + 1)``, and the neck, prompt encoder, mask decoder and task
  prompts ``lr``. For MobileSAM's TinyViT, L is the total block count ``sum(depths)`` (12), a
  stage's down-sampling belongs to its last block (as TinyViT's own ``set_layer_lr_decay`` has it)
  and the unused classifier head to the last block.
- ``decoder``: the image encoder is frozen (``requires_grad=False``, never run: embeddings come
  from the cache); the prompt encoder, mask decoder and task prompts train at ``lr``.

The task prompt of id 0 stays frozen at zero (``zero_token_no_grad``, spec §2.2 D1) in both modes;
that flag lives on the parameter itself, so nothing here touches it. Weight decay (spec A2: 0.1)
is not applied to 1-D parameters (biases, norms) nor to position embeddings, the usual MAE rule.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

MODES = ("full", "decoder")


def encoder_depth(encoder: nn.Module) -> int:
    """L, the number of transformer blocks the layer decay counts (spec §8.1)."""
    if hasattr(encoder, "blocks"):  # segment_anything ImageEncoderViT
        return len(encoder.blocks)
    if hasattr(encoder, "layers"):  # MobileSAM TinyViT: stages of blocks
        return sum(len(layer.blocks) for layer in encoder.layers)
    raise ValueError(f"{type(encoder).__name__}: unknown image encoder, expected ImageEncoderViT or TinyViT")


def encoder_layer_id(name: str, encoder: nn.Module) -> int:
    """Layer id of an encoder parameter: 0 for the patch/position embedding, ``b + 1`` for block
    ``b``, ``L + 1`` for the neck (and anything after the blocks)."""
    depth = encoder_depth(encoder)
    if name.startswith(("patch_embed", "pos_embed")):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:  # ImageEncoderViT
        return int(m.group(1)) + 1
    m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)\.|downsample\.)", name)
    if m:  # TinyViT: blocks numbered across stages; downsample with the stage's last block
        stage = int(m.group(1))
        before = sum(len(encoder.layers[s].blocks) for s in range(stage))
        if m.group(3) is not None:
            return before + int(m.group(3)) + 1
        return before + len(encoder.layers[stage].blocks)
    if name.startswith(("head", "norm_head")):  # TinyViT's classifier: unused by SAM
        return depth
    return depth + 1  # neck


def layer_scale(layer_id: int, depth: int, decay: float) -> float:
    """``decay^(L + 1 − layer_id)``: 1 for the neck, ``d^(L − b)`` for block b, ``d^(L + 1)`` for the
    patch embedding (spec §8.1)."""
    return float(decay) ** (depth + 1 - layer_id)


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "rel_pos" in name or "attention_biases" in name


def _is_task_prompt(name: str) -> bool:
    return name.startswith("prompt_encoder.task_prompt")


def set_trainable(sam: nn.Module, mode: str) -> None:
    """Freeze what ``mode`` does not train (spec §8.1): the encoder in ``decoder`` mode.

    Prompt encoder and decoder parameters keep their own flags, so the frozen task prompt id 0 (and
    all ids when ``use_task_prompt`` is off) stay frozen.
    """
    if mode not in MODES:
        raise ValueError(f"train.mode={mode!r}: expected one of {MODES}")
    for p in sam.image_encoder.parameters():
        p.requires_grad_(mode == "full")


def param_groups(
    sam: nn.Module, lr: float, weight_decay: float, layer_decay: float, mode: str, task_prompt_lr_scale: float = 1.0
) -> List[Dict]:
    """AdamW parameter groups, one per (lr scale, weight decay) pair (spec §8.1).

    Arguments:
      sam: the SUM model (``image_encoder``, ``prompt_encoder``, ``mask_decoder``), after
        ``set_trainable``.
      lr: base learning rate (spec: 1e-5).
      weight_decay: AdamW weight decay for ≥2-D weights (spec A2: 0.1).
      layer_decay: d (spec: 0.8); 1.0 switches layer decay off.
      mode: ``full`` or ``decoder``.
      task_prompt_lr_scale: lr multiplier of the task-prompt embeddings (spec §2.2). The paper
        trains them at the base lr over 6,000 steps; a short schedule (the embedded CPU default)
        raises it so that the new, zero-initialised embeddings, not the shared decoder weights,
        absorb what is task-specific (as HQ-SAM trains its new tokens at 100x SAM's fine-tuning lr).
        No weight decay on them: decay would pull a task towards "unspecified".
    Returns:
      list of dicts with ``params``, ``names``, ``lr`` (= lr · scale), ``lr_scale``,
      ``weight_decay``; groups are ordered and named deterministically (resume restores by order).
    """
    if mode not in MODES:
        raise ValueError(f"train.mode={mode!r}: expected one of {MODES}")
    encoder = sam.image_encoder
    depth = encoder_depth(encoder)
    groups: Dict[Tuple[float, float], Dict] = {}
    for name, p in sam.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("image_encoder."):
            if mode != "full":
                raise ValueError(f"{name}: encoder parameter trainable in train.mode={mode!r}")
            scale = layer_scale(encoder_layer_id(name[len("image_encoder.") :], encoder), depth, layer_decay)
        elif _is_task_prompt(name):
            scale = float(task_prompt_lr_scale)
        else:
            scale = 1.0
        wd = 0.0 if (_no_weight_decay(name, p) or _is_task_prompt(name)) else float(weight_decay)
        g = groups.setdefault((scale, wd), {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    out = []
    for (scale, wd) in sorted(groups, key=lambda k: (-k[0], -k[1])):
        g = groups[(scale, wd)]
        g["lr"] = lr * scale
        out.append(g)
    return out


def build_optimizer(
    sam: nn.Module,
    *,
    mode: str,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    betas: Iterable[float] = (0.9, 0.999),
    task_prompt_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (spec §8.1: AdamW, β = (0.9, 0.999), lr 1e-5, layer decay 0.8).

    The group dicts keep ``names`` and ``lr_scale`` for inspection; AdamW ignores extra keys.
    """
    groups = param_groups(sam, lr, weight_decay, layer_decay, mode, task_prompt_lr_scale)
    if not groups:
        raise ValueError(f"train.mode={mode!r}: no trainable parameters")
    # foreach=False: the same per-parameter kernel on every rank and world size (DDP equivalence).
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=False)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_iters: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr with an optional linear warm-up over ``warmup_iters`` steps (spec A2: SAM's 250).

    The factor multiplies every group's own (layer-decayed) lr.
    """
    warmup = max(0, int(warmup_iters))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_lrs(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """Current lr of every trainable parameter, by name (for tests and logging)."""
    out: Dict[str, float] = {}
    for g in optimizer.param_groups:
        for name in g.get("names", []):
            out[name] = g["lr"]
    return out


def lr_scale_table(sam: nn.Module, layer_decay: float) -> Dict[str, Optional[float]]:
    """lr scale every encoder parameter would get in ``full`` mode (for reports)."""
    encoder = sam.image_encoder
    depth = encoder_depth(encoder)
    return {
        name: layer_scale(encoder_layer_id(name, encoder), depth, layer_decay) for name, _ in encoder.named_parameters()
    }
