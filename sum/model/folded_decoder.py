"""SAM's mask decoder computed faster for prompts with their own dense embedding (spec §4.1, §7).

The refinement module (every call) and the interactive training rounds 2-7 (spec §7) call SAM's
``MaskDecoder`` on prompts that each carry their own dense mask prompt, so every prompt has its
own copy of the 64x64 image tokens. In SAM's attention every one of those 4096 tokens is projected to queries/keys/values
(and back) in every cross attention, although only the ~8 prompt tokens sit on the other side.
`folded_decode` computes the same function with those projections folded onto the token side
(``(q Wk) k^T`` instead of ``q (k Wk)^T``, as `sum.pseudo.point_decoder.token_to_image_attention` does for
the pseudo-label generator), reads only the tokens the requested outputs need after the final
attention, and runs the output upscaling as matrix products. Faster forward and backward;
algebraically equal to SAM's decoder, so the gradients are the same too (key biases,
which cancel in the softmax, get a zero gradient instead of a rounding-sized one).

Unlike `sum.pseudo.point_decoder.image_to_token_attention`, nothing here is computed in place, so autograd
can train through it.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn


def upscaling_is_sam(mask_decoder: nn.Module) -> bool:
    """Whether ``mask_decoder.output_upscaling`` is SAM's (two kernel-2 stride-2 transposed
    convolutions around a LayerNorm2d), the layout `folded_decode` computes as matrix products."""
    seq = getattr(mask_decoder, "output_upscaling", None)
    if not isinstance(seq, nn.Sequential) or len(seq) != 5 or not isinstance(seq[1], LayerNorm2d):
        return False
    return all(
        isinstance(m, nn.ConvTranspose2d)
        and m.kernel_size == (2, 2)
        and m.stride == (2, 2)
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.groups == 1
        for m in (seq[0], seq[3])
    )


def attention_heads(attn: nn.Module) -> Tuple[int, int]:
    """(heads, channels per head) of a `segment_anything.modeling.transformer.Attention`."""
    return attn.num_heads, attn.internal_dim // attn.num_heads


def token_to_image(attn: nn.Module, q_btc: Tensor, k_bnc: Tensor, v_bnc: Tensor) -> Tensor:
    """``attn(q, k, v)`` for T tokens attending to N image tokens, keys and values projected on
    the token side: ``softmax((q Wq Wk) k^T) (A v) Wv`` (the key bias cancels in the softmax, the
    value bias passes through since attention rows sum to 1).

    Arguments:
      attn: a `segment_anything.modeling.transformer.Attention`.
      q_btc: (B, T, C) token queries.
      k_bnc, v_bnc: (B, N, C) image keys and values.
    Returns:
      (B, T, C).
    """
    b, t, c = q_btc.shape
    heads, ch = attention_heads(attn)
    q_bthc = attn.q_proj(q_btc).view(b, t, heads, ch) * (1.0 / math.sqrt(ch))
    qk_bpc = torch.einsum("bthd,hdc->bhtc", q_bthc, attn.k_proj.weight.view(heads, ch, c)).reshape(b, heads * t, c)
    a_bpn = torch.bmm(qk_bpc, k_bnc.transpose(1, 2)).softmax(dim=-1)
    av_bhtc = torch.bmm(a_bpn, v_bnc).view(b, heads, t, c)
    out_bthd = torch.einsum("bhtc,hdc->bthd", av_bhtc, attn.v_proj.weight.view(heads, ch, c)) + attn.v_proj.bias.view(heads, ch)
    return attn.out_proj(out_bthd.reshape(b, t, heads * ch))


def image_to_token(attn: nn.Module, q_bnc: Tensor, k_btc: Tensor, v_btc: Tensor, residual_bnc: Tensor) -> Tensor:
    """``residual + attn(q, k, v)`` for N image tokens attending to T tokens, query and output
    projections folded onto the token side: per head ``softmax(x (Wq^T k_h)) (v_h Wo_h)``.

    Arguments:
      attn: a `segment_anything.modeling.transformer.Attention`.
      q_bnc: (B, N, C) image queries.
      k_btc, v_btc: (B, T, C) token keys and values.
      residual_bnc: (B, N, C) added to the output.
    Returns:
      (B, N, C).
    """
    b, t, c = k_btc.shape
    heads, ch = attention_heads(attn)
    k_bthd = attn.k_proj(k_btc).view(b, t, heads, ch) * (1.0 / math.sqrt(ch))
    v_bthd = attn.v_proj(v_btc).view(b, t, heads, ch)
    qk_bpc = torch.einsum("hdc,bthd->bhtc", attn.q_proj.weight.view(heads, ch, c), k_bthd).reshape(b, heads * t, c)
    qbias_bp1 = torch.einsum("hd,bthd->bht", attn.q_proj.bias.view(heads, ch), k_bthd).reshape(b, heads * t, 1)
    n = q_bnc.shape[1]
    scores_bhtn = torch.baddbmm(qbias_bp1, qk_bpc, q_bnc.transpose(1, 2)).view(b, heads, t, n)
    a_bpn = scores_bhtn.softmax(dim=2).reshape(b, heads * t, n)  # softmax over the T tokens
    # each head's row sums to 1, so bias / heads on every value row adds the output bias once
    vo_bpc = torch.einsum("bthd,chd->bhtc", v_bthd, attn.out_proj.weight.view(c, heads, ch)).reshape(b, heads * t, c)
    vo_bpc = vo_bpc + attn.out_proj.bias / heads
    return torch.baddbmm(residual_bnc, a_bpn.transpose(1, 2), vo_bpc)


def folded_decode(
    mask_decoder: nn.Module,
    image_embeddings_1chw: Tensor,
    image_pe_1chw: Tensor,
    sparse_btc: Tensor,
    dense_bchw: Tensor,
    multimask_output: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``mask_decoder(..., multimask_output)`` with the folded attention of the module docstring:
    SAM's single-output token 0, or its three multimask outputs (tokens 1-3).

    Arguments:
      mask_decoder: a ``MaskDecoder`` whose upscaling is SAM's (`upscaling_is_sam`).
      image_embeddings_1chw: (1, C, He, We) image embedding shared by the B prompts, or (B, C,
        He, We), one per prompt.
      image_pe_1chw: (1, C, He, We) dense positional encoding.
      sparse_btc: (B, Ts, C) sparse prompt embeddings.
      dense_bchw: (B, C, He, We) dense prompt embeddings (the mask prompts).
      multimask_output: three outputs (tokens 1-3) instead of token 0.
    Returns:
      (logits (B, M, 4He, 4We), predicted IoU (B, M)), M = 3 or 1.
    """
    d = mask_decoder
    tr = d.transformer
    b = sparse_btc.shape[0]
    c, he, we = image_embeddings_1chw.shape[1:]
    n = he * we
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens_btc = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_btc), dim=1)
    keys_bnc = (image_embeddings_1chw + dense_bchw).flatten(2).transpose(1, 2)
    pe_1nc = image_pe_1chw.flatten(2).transpose(1, 2)

    queries, query_pe = tokens_btc, tokens_btc
    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        keys_pe_bnc = keys_bnc + pe_1nc
        q = queries + query_pe
        queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, q, keys_pe_bnc, keys_bnc))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys_bnc = layer.norm4(image_to_token(layer.cross_attn_image_to_token, keys_pe_bnc, q, queries, keys_bnc))

    # after the final attention only the IoU token and the requested mask tokens are read; tokens
    # attend independently, so the others need not be computed
    tokens = [1, 2, 3] if multimask_output else [0]
    n_read = tokens[-1] + 2
    queries, query_pe = queries[:, :n_read], query_pe[:, :n_read]
    q = queries + query_pe
    queries = tr.norm_final_attn(queries + token_to_image(tr.final_attn_token_to_image, q, keys_bnc + pe_1nc, keys_bnc))
    iou_bm = d.iou_prediction_head(queries[:, 0])[:, tokens]
    hyper_bcm = torch.stack([d.output_hypernetworks_mlps[t](queries[:, 1 + t]) for t in tokens], dim=2)

    return upscale_masks(d, keys_bnc, hyper_bcm, (he, we)), iou_bm


def upscale_masks(mask_decoder: nn.Module, keys_bnc: Tensor, hyper_bcm: Tensor, hw: Tuple[int, int]) -> Tensor:
    """``MaskDecoder``'s output upscaling and hypernetwork product, as matrix products: SAM's two
    kernel-2 stride-2 transposed convolutions are per-pixel linear maps, run in token layout with
    the LayerNorm2d as a layer norm over the last axis; one permutation puts the sub-pixels in place.

    Arguments:
      mask_decoder: a ``MaskDecoder`` whose upscaling is SAM's (`upscaling_is_sam`).
      keys_bnc: (B, N = He*We, C) image tokens after the transformer.
      hyper_bcm: (B, C', M) hypernetwork outputs of the M mask tokens read.
      hw: (He, We).
    Returns:
      (B, M, 4He, 4We) mask logits.
    """
    b, n, c = keys_bnc.shape
    he, we = hw
    conv1, norm, act1, conv2, act2 = mask_decoder.output_upscaling
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # columns (i, j, c1)
    z = torch.addmm(conv1.bias.repeat(4), keys_bnc.reshape(b * n, c), w1).view(b, n * 4, c1)
    z = act1(F.layer_norm(z, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)  # columns (i2, j2, c2)
    z = act2(torch.addmm(conv2.bias.repeat(4), z.reshape(b * n * 4, c1), w2).view(b, n * 16, c2))
    nm = hyper_bcm.shape[2]
    m = torch.bmm(z, hyper_bcm)  # (B, N*16, M), rows (y, x, i, j, i2, j2)
    return m.view(b, he, we, 2, 2, 2, 2, nm).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, nm, 4 * he, 4 * we)
