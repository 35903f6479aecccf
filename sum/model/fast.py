"""The image-encoder fast path: fused attention, bf16 autocast, channels_last, compile (spec §2.1, §14).

The encoder is SAM's own (`segment_anything.modeling.ImageEncoderViT`) or MobileSAM's TinyViT;
nothing here copies them. The fast path changes how they run, never what they compute beyond
bf16 rounding, and can be switched off again:

- **Fused attention** (ViT only): every `segment_anything.modeling.image_encoder.Attention` gets
  its class swapped to `SdpaAttention`, whose forward calls
  ``torch.nn.functional.scaled_dot_product_attention`` with SAM's decomposed relative position
  bias passed as ``attn_mask``. In fp32 it matches the original attention to 1e-5. On CUDA the
  class is `FlexAttention` instead: the bias enters as a ``score_mod`` gathering per-query rows
  of the two small rel-pos tables, so no (B*heads, N, N) bias is built and the fused kernel runs.
- **torch.compile** of the encoder forward, off by default (``ModelConfig.compile_encoder``);
  meant for CUDA, where kernels fuse; its benefit is not measured on this project's CPUs.
- **bf16 autocast** around the encoder forward; the embedding is cast back to fp32, so the prompt
  encoder, the mask decoder and every output stay fp32.
- **channels_last** for the encoder's convolutions (TinyViT is mostly convolutions; for the ViT
  only the patch embedding and the neck are).

``mode="auto"`` turns everything on for CUDA. On CPU it turns bf16 autocast + channels_last on for
TinyViT (MobileSAM) when the CPU has native bf16 (AVX512-BF16 or AMX), and leaves the ViT in
plain fp32. The CPU decision is measured, on the 2-core AVX512-BF16 development CPU, MobileSAM's
encoder at 1024 px, one image, real weights (``benchmarks/encoder.py``): fp32 1.13 s, bf16
autocast + channels_last 0.40 s (2.8x; bf16 alone about 0.7 s, channels_last alone about 1.0 s).
The masks the predictor hands out (the top-scored of three per click, the single mask per box)
agree with fp32 at mean IoU >= 0.99 (``tests/test_model.py``); the two lower-scored alternatives
of a click are less stable (0.93-0.99), as they are under any perturbation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as sam_image_encoder
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class FastPath:
    """Which parts of the encoder fast path are on."""

    fused_attention: bool = False  # SDPA attention in ImageEncoderViT blocks
    flex_attention: bool = False  # with fused_attention: FlexAttention (rel-pos bias as score_mod) instead
    compile: bool = False  # torch.compile the encoder forward
    bf16_autocast: bool = False  # bf16 autocast around the encoder forward, fp32 out
    channels_last: bool = False  # encoder weights and input in channels_last memory format

    @property
    def on(self) -> bool:
        return self.fused_attention or self.bf16_autocast or self.channels_last or self.compile


OFF = FastPath()


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """SAM's decomposed relative position term as an additive attention bias.

    Computes the same ``rel_h`` and ``rel_w`` as
    ``segment_anything.modeling.image_encoder.add_decomposed_rel_pos`` (with its ``get_rel_pos``),
    but returns their broadcast sum instead of adding it to a materialised attention map.

    Arguments:
      q (torch.Tensor): queries (B*heads, q_h*q_w, C), unscaled, as the original uses them.
      rel_pos_h, rel_pos_w (torch.Tensor): relative position tables (Lh, C) and (Lw, C).
      q_size, k_size (tuple(int, int)): spatial sizes of queries and keys.

    Returns:
      (torch.Tensor): bias of shape (B*heads, q_h*q_w, k_h*k_w), in ``q``'s dtype.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rel_h, rel_w = rel_pos_tables(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b = q.shape[0]
    bias = rel_h.view(b, q_h * q_w, k_h, 1) + rel_w.view(b, q_h * q_w, 1, k_w)  # (B, N, k_h, k_w)
    return bias.reshape(b, q_h * q_w, k_h * k_w)


class SdpaAttention(sam_image_encoder.Attention):
    """SAM's ViT attention computed by ``scaled_dot_product_attention`` (fused kernels on CUDA).

    Same parameters and state-dict keys as the parent; only ``forward`` differs. Instances are made
    by swapping ``__class__`` of existing ``Attention`` modules (`enable_fast_path`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, dim) -> (B, H, W, dim)
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            q_flat = q.reshape(b * self.num_heads, h * w, -1)
            bias = decomposed_rel_pos_bias(q_flat, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            bias = bias.view(b, self.num_heads, h * w, h * w)
        # SDPA's default scale is head_dim ** -0.5 == self.scale.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, H*W, head_dim)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def rel_pos_tables(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_size: Tuple[int, int], k_size: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of SAM's decomposed relative position term, not yet broadcast: ``rel_h``
    (B*heads, q_h*q_w, k_h) and ``rel_w`` (B*heads, q_h*q_w, k_w); the bias of query i and key
    (kh, kw) is ``rel_h[:, i, kh] + rel_w[:, i, kw]`` (`decomposed_rel_pos_bias` sums them out)."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh_qkc = sam_image_encoder.get_rel_pos(q_h, k_h, rel_pos_h)
    rw_qkc = sam_image_encoder.get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh_qkc.to(q.dtype)).reshape(b, q_h * q_w, k_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw_qkc.to(q.dtype)).reshape(b, q_h * q_w, k_w)
    return rel_h, rel_w


_COMPILED_FLEX = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod) -> torch.Tensor:
    """``flex_attention``: eager on CPU (a reference implementation, for tests), compiled once
    elsewhere (eager flex materialises the scores; compiled it is one fused kernel)."""
    global _COMPILED_FLEX
    if q.device.type == "cpu":
        return flex_attention(q, k, v, score_mod=score_mod)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(q, k, v, score_mod=score_mod)


class FlexAttention(sam_image_encoder.Attention):
    """SAM's ViT attention computed by FlexAttention, the decomposed relative position term added
    to each score by a ``score_mod`` that gathers it from the (N, k_h) and (N, k_w) tables of
    `rel_pos_tables`: no (B*heads, N, N) bias is built (512 MiB per image in ViT-H's global
    blocks), so the fused kernel applies. Same parameters and state-dict keys as the parent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, dim) -> (B, H, W, dim)
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, H*W, head_dim)
        score_mod = None
        if self.use_rel_pos:
            q_flat = q.reshape(b * self.num_heads, h * w, -1)
            rel_h, rel_w = rel_pos_tables(q_flat, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            rel_h = rel_h.view(b, self.num_heads, h * w, h)
            rel_w = rel_w.view(b, self.num_heads, h * w, w)

            def score_mod(score, bi, hi, qi, ki):
                return score + rel_h[bi, hi, qi, ki // w] + rel_w[bi, hi, qi, ki % w]

        out = _flex(q, k, v, score_mod)  # default scale head_dim ** -0.5 == self.scale
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class _FastEncoderMixin:
    """Runs the encoder's own forward under bf16 autocast and/or channels_last, compiled or not;
    returns fp32."""

    _sum_fast_path: FastPath
    _sum_base_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._sum_fast_path
        if plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = super().forward
        if plan.compile:
            if "_sum_compiled" not in self.__dict__:
                self.__dict__["_sum_compiled"] = torch.compile(self._sum_base_class.forward)
            forward = partial(self.__dict__["_sum_compiled"], self)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=plan.bf16_autocast):
            out = forward(x)
        return out.float().contiguous()


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(base: type) -> type:
    if base not in _FAST_CLASSES:
        _FAST_CLASSES[base] = type(
            f"Fast{base.__name__}", (_FastEncoderMixin, base), {"_sum_base_class": base}
        )
    return _FAST_CLASSES[base]


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch without the probes: assume emulated bf16 (slow)
        return False


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def resolve_fast_path(
    model: nn.Module, mode: str, device: Optional[torch.device | str] = None, compile: bool = False
) -> FastPath:
    """Turn ``model.fast_path`` ("auto" | "on" | "off") into the parts to switch on.

    Arguments:
      model (Sam): the model whose ``image_encoder`` is considered.
      mode (str): "on" = every part that applies to this encoder; "off" = none; "auto" = "on" for
        CUDA, and on CPU bf16 autocast + channels_last for TinyViT only, when the CPU has native
        bf16 (measured faster with masks within 0.99 mean IoU; see the module docstring). The
        ViT's fused attention is FlexAttention on CUDA, SDPA elsewhere (eager FlexAttention, all
        there is off CUDA, materialises the scores).
      device: where the encoder runs; default: where its parameters are.
      compile (bool): ``ModelConfig.compile_encoder``: also `torch.compile` the encoder forward
        (with any mode, "off" included).

    Raises:
      ValueError: naming ``fast_path`` when ``mode`` is not one of "auto", "on", "off".
    """
    if mode not in MODES:
        raise ValueError(f"fast_path={mode!r}: expected one of {', '.join(repr(m) for m in MODES)}")
    encoder = model.image_encoder
    is_vit = isinstance(encoder, ImageEncoderViT)
    device = torch.device(device) if device is not None else _device_of(encoder)
    flex = is_vit and device.type == "cuda"
    full = FastPath(fused_attention=is_vit, flex_attention=flex, bf16_autocast=True, channels_last=True)
    if mode == "off":
        plan = OFF
    elif mode == "on" or device.type == "cuda":
        plan = full
    elif device.type == "cpu" and not is_vit and cpu_has_native_bf16():
        plan = FastPath(bf16_autocast=True, channels_last=True)
    else:
        plan = OFF
    return replace(plan, compile=bool(compile))


def apply_fast_path(model: nn.Module, plan: FastPath) -> FastPath:
    """Switch the encoder of ``model`` to exactly ``plan`` (in place); ``OFF`` restores it.

    Only forwards and memory formats change: parameters, buffers and state-dict keys stay the same,
    so checkpoints load and save as usual with the fast path on or off.

    Returns:
      (FastPath): ``plan``.
    """
    encoder = model.image_encoder
    if plan.fused_attention and not isinstance(encoder, ImageEncoderViT):
        raise ValueError(
            f"fused_attention: only for segment_anything's ImageEncoderViT, not {type(encoder).__name__}"
        )
    if plan.flex_attention and not plan.fused_attention:
        raise ValueError("flex_attention: is a kind of fused_attention, which is off")
    attention = FlexAttention if plan.flex_attention else SdpaAttention if plan.fused_attention else None
    for module in encoder.modules():
        if type(module) in (sam_image_encoder.Attention, SdpaAttention, FlexAttention):
            module.__class__ = attention or sam_image_encoder.Attention

    base = getattr(type(encoder), "_sum_base_class", type(encoder))
    encoder.__dict__.pop("_sum_compiled", None)
    if plan.bf16_autocast or plan.channels_last or plan.compile:
        encoder.__class__ = _fast_class(base)
        encoder._sum_fast_path = plan
    else:
        encoder.__class__ = base
        encoder.__dict__.pop("_sum_fast_path", None)
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):  # not the ViT's (1, H, W, C) pos_embed: it is no image
            module.to(memory_format=memory_format)
    return plan


def fast_path_of(model: nn.Module) -> FastPath:
    """The parts of the fast path that are on for ``model``'s encoder now."""
    encoder = model.image_encoder
    plan = encoder.__dict__.get("_sum_fast_path", OFF)
    flex = any(type(m) is FlexAttention for m in encoder.modules())
    fused = flex or any(type(m) is SdpaAttention for m in encoder.modules())
    return replace(plan, fused_attention=fused, flex_attention=flex)


def enable_fast_path(
    model: nn.Module, mode: str = "auto", device: Optional[torch.device | str] = None, compile: bool = False
) -> FastPath:
    """Apply ``ModelConfig.fast_path`` to ``model`` (spec §2.1): resolve ``mode``, then apply it.

    Call it after loading weights and moving the model to its device; call it again with "off" to
    get the official fp32 encoder back.

    Returns:
      (FastPath): the parts now on.
    """
    plan = apply_fast_path(model, resolve_fast_path(model, mode, device, compile))
    log.debug("encoder fast path %s: %s", mode, plan)
    return plan
