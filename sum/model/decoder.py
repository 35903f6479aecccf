"""SAM's mask decoder, one implementation for every caller (spec §3.3, §4.1, §7).

Every stage that decodes masks calls `decode` (the trainer's interactive rounds, evaluation, the
refinement module) or, for many single-point prompts on one image, `two_way` through
`sum.pseudo.point_decoder.PointBatchDecoder` (pseudo-labeling). Where the decoder's layout is
SAM's (`upscaling_is_sam`) they compute SAM's ``MaskDecoder`` with its cross attentions folded
onto the few prompt tokens: SAM projects every one of the 4096 image tokens to queries, keys and
values (and back) in every cross attention, although only ~7 prompt tokens sit on the other side,
and when each prompt has its own dense mask prompt it does so once per prompt. Folded, the
projections act on the token side (``(q Wq Wk) k^T`` instead of ``q Wq (k Wk)^T``), after the
final attention only the tokens the requested outputs read are computed, and the output
upscaling runs as matrix products. The function is SAM's, algebraically; floating-point rounding
differs (logits agree to ~1e-5). ``exact=True``, or a decoder of another layout, runs SAM's own
``MaskDecoder``.

Nothing is computed in place while autograd records, so the trainer and the refinement module
train through the same kernels that pseudo-labeling runs under ``no_grad``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn


def upscaling_is_sam(mask_decoder: nn.Module) -> bool:
    """Whether ``mask_decoder.output_upscaling`` is SAM's (two kernel-2 stride-2 transposed
    convolutions around a LayerNorm2d), the layout `upscale_masks` computes as matrix products."""
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
    """``attn(q, k, v)`` for T tokens attending to N image tokens, the key and value projections
    folded onto the token side: ``softmax((q Wq Wk) k^T + q Wq bk) (A v) Wv + bv`` (attention rows
    sum to 1, so the value bias passes through).

    Arguments:
      attn: a `segment_anything.modeling.transformer.Attention`.
      q_btc: (B, T, C) token queries.
      k_bnc, v_bnc: (B, N, C) image keys and values, one copy per prompt.
    Returns:
      (B, T, C), as ``attn(q_btc, k_bnc, v_bnc)``.
    """
    b, t, c = q_btc.shape
    heads, ch = attention_heads(attn)
    q_bthc = attn.q_proj(q_btc).view(b, t, heads, ch) * (1.0 / math.sqrt(ch))
    qk_bpc = torch.einsum("bthd,hdc->bhtc", q_bthc, attn.k_proj.weight.view(heads, ch, c)).reshape(b, heads * t, c)
    qbias_bp1 = torch.einsum("bthd,hd->bht", q_bthc, attn.k_proj.bias.view(heads, ch)).reshape(b, heads * t, 1)
    a_bpn = torch.baddbmm(qbias_bp1, qk_bpc, k_bnc.transpose(1, 2)).softmax(dim=-1)  # p = heads * T
    av_bhtc = torch.bmm(a_bpn, v_bnc).view(b, heads, t, c)
    out_bthd = torch.einsum("bhtc,hdc->bthd", av_bhtc, attn.v_proj.weight.view(heads, ch, c)) + attn.v_proj.bias.view(heads, ch)
    return attn.out_proj(out_bthd.reshape(b, t, heads * ch))


def image_to_token(
    attn: nn.Module, q_bnc: Tensor, k_btc: Tensor, v_btc: Tensor, residual_bnc: Tensor, q_projected: bool = False
) -> Tensor:
    """``residual + attn(q, k, v)`` for N image tokens attending to T tokens, the query and output
    projections folded onto the token side: per head ``softmax(x (Wq^T k_h)) (v_h Wo_h)``.

    Scores are laid out (B, heads, T, N) so the softmax over the T tokens runs along contiguous
    rows of N; it is computed in place unless autograd records.

    Arguments:
      attn: a `segment_anything.modeling.transformer.Attention`.
      q_bnc: (B or 1, N, C) image queries (1: shared by every prompt), or with ``q_projected``
        the shared projected queries ``attn.q_proj(q)``, (1, N, internal_dim).
      k_btc, v_btc: (B, T, C) token keys and values.
      residual_bnc: (B or 1, N, C) added to the output (the block's residual).
    Returns:
      (B, N, C).
    """
    b, t, c = k_btc.shape
    heads, ch = attention_heads(attn)
    p = heads * t
    k_bthd = attn.k_proj(k_btc).view(b, t, heads, ch) * (1.0 / math.sqrt(ch))
    v_bthd = attn.v_proj(v_btc).view(b, t, heads, ch)
    if q_projected:
        eye_hg = torch.eye(heads, dtype=k_bthd.dtype, device=k_bthd.device)
        kbd_bpi = torch.einsum("bthd,hg->bhtgd", k_bthd, eye_hg).reshape(b, p, heads * ch)  # block diagonal
        scores_bpn = torch.matmul(kbd_bpi, q_bnc[0].t())
    else:
        qk_bpc = torch.einsum("hdc,bthd->bhtc", attn.q_proj.weight.view(heads, ch, c), k_bthd).reshape(b, p, c)
        qbias_bp1 = torch.einsum("hd,bthd->bht", attn.q_proj.bias.view(heads, ch), k_bthd).reshape(b, p, 1)
        if q_bnc.shape[0] == 1:
            scores_bpn = torch.matmul(qk_bpc, q_bnc[0].t()) + qbias_bp1
        else:
            scores_bpn = torch.baddbmm(qbias_bp1, qk_bpc, q_bnc.transpose(1, 2))
    n = scores_bpn.shape[-1]
    s_bhtn = scores_bpn.view(b, heads, t, n)
    s_bhtn = s_bhtn - s_bhtn.amax(dim=2, keepdim=True)  # softmax over the T tokens
    if torch.is_grad_enabled() and s_bhtn.requires_grad:
        s_bhtn = s_bhtn.exp()
        s_bhtn = s_bhtn / s_bhtn.sum(dim=2, keepdim=True)
    else:
        s_bhtn = s_bhtn.exp_()
        s_bhtn /= s_bhtn.sum(dim=2, keepdim=True)
    # each head's attention row sums to 1, so bias / heads on every value row adds the bias once
    vo_bpc = torch.einsum("bthd,chd->bhtc", v_bthd, attn.out_proj.weight.view(c, heads, ch)).reshape(b, p, c)
    vo_bpc = vo_bpc + attn.out_proj.bias / heads
    return torch.baddbmm(residual_bnc, s_bhtn.view(b, p, n).transpose(1, 2), vo_bpc)


def two_way(
    mask_decoder: nn.Module,
    sparse_btc: Tensor,
    src_bnc: Tensor,
    pe_1nc: Tensor,
    read: Sequence[int],
    shared: Optional[Dict[int, Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """``mask_decoder.transformer`` (a `TwoWayTransformer` of any depth) on the output tokens and
    ``sparse_btc``, with the folded attention of the module docstring.

    Arguments:
      mask_decoder: a ``MaskDecoder``.
      sparse_btc: (B, Ts, C) sparse prompt embeddings.
      src_bnc: (B, N, C) image tokens (embedding + dense prompt), one copy per prompt; or, with
        ``shared``, (1, N, C) tokens shared by every prompt (one dense prompt for all).
      pe_1nc: (1, N, C) dense positional encoding.
      read: the output tokens (0 = IoU, 1.. = mask tokens) computed by the final attention, the
        only ones the caller reads (tokens attend independently).
      shared: a cache of the shared image queries' projections, one dict per image embedding,
        or None when the image tokens are per prompt. With it, the first layer attends to the
        shared tokens without copying them (they become per prompt after its image update).
    Returns:
      the ``read`` tokens after the final attention (B, len(read), C) and the image tokens after
      the transformer (B, N, C).
    """
    tr = mask_decoder.transformer
    b = sparse_btc.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    queries = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_btc), dim=1)
    query_pe = queries
    keys_bnc, keys_pe_bnc = src_bnc, src_bnc + pe_1nc
    for layer in tr.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q = queries + query_pe
        if shared is not None:  # keys shared by all prompts: SAM's attention broadcasts them
            attn_out = layer.cross_attn_token_to_image(q=q, k=keys_pe_bnc, v=keys_bnc)
        else:
            attn_out = token_to_image(layer.cross_attn_token_to_image, q, keys_pe_bnc, keys_bnc)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        attn = layer.cross_attn_image_to_token
        if shared is not None:
            if id(attn) not in shared:
                shared[id(attn)] = attn.q_proj(keys_pe_bnc)
            keys_new = image_to_token(attn, shared[id(attn)], q, queries, keys_bnc, q_projected=True)
        else:
            keys_new = image_to_token(attn, keys_pe_bnc, q, queries, keys_bnc)
        keys_bnc = F.layer_norm(keys_new, (keys_new.shape[-1],), layer.norm4.weight, layer.norm4.bias, layer.norm4.eps)
        keys_pe_bnc = keys_bnc + pe_1nc
        shared = None

    queries, query_pe = take_tokens(queries, read), take_tokens(query_pe, read)
    q = queries + query_pe
    if shared is not None:  # a transformer without layers
        attn_out = tr.final_attn_token_to_image(q=q, k=keys_pe_bnc, v=keys_bnc)
        keys_bnc = keys_bnc.expand(b, -1, -1)
    else:
        attn_out = token_to_image(tr.final_attn_token_to_image, q, keys_pe_bnc, keys_bnc)
    return tr.norm_final_attn(queries + attn_out), keys_bnc


def take_tokens(x_btc: Tensor, read: Sequence[int]) -> Tensor:
    """``x_btc[:, read]`` built from slices of consecutive runs: indexing with a Python list copies
    the index to the device and waits for it on CUDA (once per decoder call); slices do not."""
    read = list(read)
    runs, start = [], 0
    for j in range(1, len(read) + 1):
        if j == len(read) or read[j] != read[j - 1] + 1:
            runs.append(x_btc[:, read[start] : read[j - 1] + 1])
            start = j
    return runs[0] if len(runs) == 1 else torch.cat(runs, dim=1)


def hypernetwork(mask_decoder: nn.Module, mask_tokens_bmc: Tensor, outputs: Sequence[int]) -> Tensor:
    """Hypernetwork outputs (B, C', M) of mask outputs ``outputs`` (0 = single, 1.. = multimask)
    from their tokens after the transformer, ``mask_tokens_bmc`` (B, M, C) in the same order."""
    mlps = mask_decoder.output_hypernetworks_mlps
    return torch.stack([mlps[o](mask_tokens_bmc[:, j]) for j, o in enumerate(outputs)], dim=2)


def decode(
    mask_decoder: nn.Module,
    image_embeddings_1chw: Tensor,
    image_pe_1chw: Tensor,
    sparse_btc: Tensor,
    dense_bchw: Tensor,
    multimask_output: bool = False,
    exact: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``mask_decoder(..., multimask_output)``: SAM's single output (token 0), or its three
    multimask outputs (tokens 1-3), folded (module docstring) unless ``exact`` or the decoder's
    layout is not SAM's.

    Arguments:
      mask_decoder: a ``MaskDecoder``.
      image_embeddings_1chw: (1, C, He, We) image embedding shared by the B prompts, or
        (B, C, He, We), one per prompt.
      image_pe_1chw: (1, C, He, We) dense positional encoding.
      sparse_btc: (B, Ts, C) sparse prompt embeddings.
      dense_bchw: (B, C, He, We) dense prompt embeddings (the mask prompts).
      multimask_output: three outputs instead of one.
      exact: run SAM's own ``MaskDecoder``.
    Returns:
      (logits (B, M, 4He, 4We), predicted IoU (B, M)), M = 3 or 1.
    """
    if exact or not upscaling_is_sam(mask_decoder):
        return mask_decoder(
            image_embeddings=image_embeddings_1chw,
            image_pe=image_pe_1chw,
            sparse_prompt_embeddings=sparse_btc,
            dense_prompt_embeddings=dense_bchw,
            multimask_output=multimask_output,
        )
    he, we = image_embeddings_1chw.shape[-2:]
    src_bnc = (image_embeddings_1chw + dense_bchw).flatten(2).transpose(1, 2)
    pe_1nc = image_pe_1chw.flatten(2).transpose(1, 2)
    outputs = list(range(1, mask_decoder.num_mask_tokens)) if multimask_output else [0]
    tokens_bmc, keys_bnc = two_way(mask_decoder, sparse_btc, src_bnc, pe_1nc, [0] + [1 + o for o in outputs])
    iou_bm = mask_decoder.iou_prediction_head(tokens_bmc[:, 0])[:, outputs]
    hyper_bcm = hypernetwork(mask_decoder, tokens_bmc[:, 1:], outputs)
    return upscale_masks(mask_decoder, keys_bnc, hyper_bcm, (he, we)), iou_bm


def upscale_masks(
    mask_decoder: nn.Module, keys_bnc: Tensor, hyper_bcm: Tensor, hw: Tuple[int, int], product_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """``MaskDecoder``'s output upscaling and hypernetwork product, as matrix products: SAM's two
    kernel-2 stride-2 transposed convolutions are per-pixel linear maps, run in token layout with
    the LayerNorm2d as a layer norm over the last axis; one permutation puts the sub-pixels in place.

    Arguments:
      mask_decoder: a ``MaskDecoder`` whose upscaling is SAM's (`upscaling_is_sam`).
      keys_bnc: (B, N = He*We, C) image tokens after the transformer.
      hyper_bcm: (B, C', M) hypernetwork outputs of the M mask tokens read.
      hw: (He, We).
      product_dtype: None, or the dtype of the last product (upscaled tokens x hypernetwork
        outputs), computed outside any autocast (``PointBatchDecoder``'s bf16: logits in fp32).
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
    if product_dtype is None:
        m = torch.bmm(z, hyper_bcm)  # (B, N*16, M), rows (y, x, i, j, i2, j2)
    else:
        with torch.autocast(z.device.type, enabled=False):
            m = torch.bmm(z.to(product_dtype), hyper_bcm.to(product_dtype))
    return m.view(b, he, we, 2, 2, 2, 2, nm).permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, nm, 4 * he, 4 * we)
