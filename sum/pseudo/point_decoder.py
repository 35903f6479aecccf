"""SAM's mask decoder for many single-point prompts on one image embedding, the kernel of the
pseudo-label generator (`sum.pseudo.amg.MaskGenerator`, spec §3.3).

SAM's decoder, run once per grid point, gives every prompt its own copy of the image embedding,
projected to queries/keys/values and split into heads, although only 7 prompt tokens ever attend
to it. `PointBatchDecoder` computes the same function with the prompt-independent work done once
per image and with the projections of the cross attentions folded onto the 7-token side
(``(q Wk) k^T`` instead of ``q (k Wk^T)^T``), which cuts the per-prompt work to a few thin matrix
products. It evaluates the predicted-IoU filter before the output upscaling (the IoU head reads
only the IoU token, so this is exact) and upscales only prompts with a surviving output, and of
those only the image tokens that the resized image covers (`PointBatchDecoder.decode_cropped`);
`PointBatchDecoder.complete_logits` adds the rest for the masks that pass every filter.

The folded attention is algebraically equal to SAM's; floating-point rounding differs (logits
agree to ~1e-5). ``exact=True`` runs SAM's own `MaskDecoder` instead.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batch_iterator
from torch import Tensor

from sum.model.folded_decoder import attention_heads, upscale_masks, upscaling_is_sam

log = logging.getLogger(__name__)


def token_to_image_attention(attn, q_btc: Tensor, k_bnc: Tensor, v_bnc: Tensor) -> Tensor:
    """``attn(q, k, v)`` for T prompt tokens attending to N image tokens, with the key/value
    projections folded onto the token side.

    ``softmax(q Wq (k Wk)^T) (v Wv)`` is computed as ``softmax((q Wq Wk) k^T) (A v) Wv``:
    two (T*heads x C x N) products per prompt instead of projecting all N image tokens.

    Arguments:
      attn: the `Attention` module whose weights are used.
      q_btc: (B, T, C) token queries.
      k_bnc, v_bnc: (B, N, C) image keys and values, one copy per prompt.

    Returns:
      (B, T, C), as ``attn(q_btc, k_bnc, v_bnc)``.
    """
    b, t, c = q_btc.shape
    heads, ch = attention_heads(attn)
    scale = 1.0 / math.sqrt(ch)
    q_bthc = attn.q_proj(q_btc).view(b, t, heads, ch) * scale
    wk_hcC = attn.k_proj.weight.view(heads, ch, c)
    qk_bhtC = torch.einsum("bthc,hcC->bhtC", q_bthc, wk_hcC).reshape(b, heads * t, c)
    qbias_bh1 = torch.einsum("bthc,hc->bht", q_bthc, attn.k_proj.bias.view(heads, ch)).reshape(b, heads * t, 1)
    scores_bpn = torch.baddbmm(qbias_bh1, qk_bhtC, k_bnc.transpose(1, 2))  # p = heads * T
    attn_bpn = scores_bpn.softmax(dim=-1)
    av_bhtC = torch.bmm(attn_bpn, v_bnc).view(b, heads, t, c)
    # rows of the attention sum to 1, so the value bias passes through unchanged
    wv_hcC = attn.v_proj.weight.view(heads, ch, c)
    out_bthc = torch.einsum("bhtC,hcC->bthc", av_bhtC, wv_hcC) + attn.v_proj.bias.view(heads, ch)
    return attn.out_proj(out_bthc.reshape(b, t, heads * ch))


def image_to_token_attention(
    attn, q_bnc: Tensor, k_btc: Tensor, v_btc: Tensor, residual_bnc: Tensor, q_projected: bool = False
) -> Tensor:
    """``residual + attn(q, k, v)`` for N image tokens attending to T prompt tokens, with the
    query and output projections folded onto the token side.

    Per head, ``softmax((x Wq) (k Wk)^T) (v Wv) Wo`` is computed as ``softmax(x (Wq^T k Wk^T))
    (v Wv Wo_h)``: the image side meets only (C x heads*T) and (heads*T x C) matrices. Scores are
    laid out (B, heads, T, N) so the softmax over the T tokens runs along contiguous rows of N.

    Arguments:
      attn: the `Attention` module whose weights are used.
      q_bnc: (B or 1, N, C) image queries (1: shared by all prompts), or with ``q_projected``
        the shared projected queries ``attn.q_proj(q)``, (1, N, internal_dim).
      k_btc, v_btc: (B, T, C) token keys and values.
      residual_bnc: (B or 1, N, C) added to the output (the block's residual).

    Returns:
      (B, N, C).
    """
    b, t, c = k_btc.shape
    heads, ch = attention_heads(attn)
    p = heads * t
    k_bthc = attn.k_proj(k_btc).view(b, t, heads, ch) * (1.0 / math.sqrt(ch))
    v_bthc = attn.v_proj(v_btc).view(b, t, heads, ch)
    if q_projected:
        eye_hg = torch.eye(heads, dtype=k_bthc.dtype, device=k_bthc.device)
        kbd_bpI = torch.einsum("bthc,hg->bhtgc", k_bthc, eye_hg).reshape(b, p, heads * ch)  # block diagonal
        scores_bpn = torch.matmul(kbd_bpI, q_bnc[0].t())
    else:
        wq_hcC = attn.q_proj.weight.view(heads, ch, c)
        qk_bpC = torch.einsum("hcC,bthc->bhtC", wq_hcC, k_bthc).reshape(b, p, c)
        qbias_bp1 = torch.einsum("hc,bthc->bht", attn.q_proj.bias.view(heads, ch), k_bthc).reshape(b, p, 1)
        if q_bnc.shape[0] == 1:
            scores_bpn = torch.matmul(qk_bpC, q_bnc[0].t()) + qbias_bp1
        else:
            scores_bpn = torch.baddbmm(qbias_bp1, qk_bpC, q_bnc.transpose(1, 2))
    n = scores_bpn.shape[-1]
    s_bhtn = scores_bpn.view(b, heads, t, n)
    s_bhtn = (s_bhtn - s_bhtn.amax(dim=2, keepdim=True)).exp_()
    s_bhtn /= s_bhtn.sum(dim=2, keepdim=True)
    wo_Chc = attn.out_proj.weight.view(c, heads, ch)
    # each head's attention row sums to 1, so bias / heads on every value row adds the bias once
    vo_bpC = torch.einsum("bthc,Chc->bhtC", v_bthc, wo_Chc).reshape(b, p, c) + attn.out_proj.bias / heads
    return torch.baddbmm(residual_bnc, s_bhtn.view(b, p, n).transpose(1, 2), vo_bpC)


class PointBatchDecoder:
    """SAM's mask decoder for many single-point prompts on one image embedding (spec §3.3).

    Computes what ``model.mask_decoder(embedding, pe, sparse, dense, multimask_output=True)``
    computes for prompts whose dense embedding is shared (no mask input, one task prompt), so
    that everything on the image side before the first image-to-token attention is computed
    once per image instead of once per prompt. Works with any `TwoWayTransformer` depth.

    Arguments:
      model (Sam): the model; its prompt encoder may be a `TaskPromptEncoder`.
      embedding (Tensor): (1, C, He, We) image embedding.
      task_prompt (int): task id added to the dense embedding (spec §2.2); 0 is plain SAM.
      exact (bool): run SAM's own `MaskDecoder` (bit-identical to the official generator).
    """

    def __init__(self, model: Sam, embedding: Tensor, task_prompt: int = 0, exact: bool = False) -> None:
        self.model = model
        self.embedding = embedding
        self.task_prompt = int(task_prompt)
        self.decoder = model.mask_decoder
        self.exact = exact or not upscaling_is_sam(self.decoder)
        if self.exact and not exact:
            log.warning("mask decoder output_upscaling is not SAM's; using SAM's MaskDecoder forward")
        self.image_pe = model.prompt_encoder.get_dense_pe()  # (1, C, He, We)
        self._shared: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self._q_cache: Dict[int, Tensor] = {}

    def embed_points(self, points_b2: Tensor) -> Tuple[Tensor, Tensor]:
        """Sparse (B, 2, C) and dense (B, C, He, We) prompt embeddings of one positive point each,
        in the model's input frame, as `SamPredictor.predict_torch` builds them."""
        labels_b1 = torch.ones(points_b2.shape[0], 1, dtype=torch.int, device=points_b2.device)
        points = (points_b2[:, None, :], labels_b1)
        if self.task_prompt or hasattr(self.model.prompt_encoder, "task_prompt_embedding"):
            return self.model.prompt_encoder(points, None, None, task_prompt=self.task_prompt)
        return self.model.prompt_encoder(points, None, None)

    def _image_side(self, dense_1chw: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Image tokens ``src = embedding + dense`` and positional encoding, (1, N, C) each, and
        ``src + pe``."""
        if self._shared is None:
            src_1nc = (self.embedding + dense_1chw).flatten(2).transpose(1, 2).contiguous()
            pe_1nc = self.image_pe.flatten(2).transpose(1, 2).contiguous()
            self._shared = (src_1nc, pe_1nc, src_1nc + pe_1nc)
        return self._shared

    @torch.no_grad()
    def __call__(self, points_b2: Tensor, pred_iou_thresh: float) -> Tuple[Tensor, Tensor, Tensor]:
        """Decode B single-point prompts (input frame) and keep the outputs whose predicted IoU
        passes ``> pred_iou_thresh`` (no filter if the threshold is <= 0, as in SAM's AMG).

        Returns:
          iou_pred (B, 3), keep (B, 3) bool, and the low-res logits of the kept outputs
          (K, 4*He, 4*We), K = keep.sum(), in row-major order of ``keep``.
        """
        return self.decode_cropped(points_b2, pred_iou_thresh, None)

    @torch.no_grad()
    def decode_cropped(
        self, points_b2: Tensor, pred_iou_thresh: float, token_hw: Optional[Tuple[int, int]]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """`__call__`, with the kept outputs' logits upscaled only over the top-left
        ``token_hw = (th, tw)`` image tokens (None: all): (K, 4*th, 4*tw).

        SAM's output upscaling maps each image token to its own 4x4 block of low-res pixels (two
        kernel-2 stride-2 transposed convolutions), so the block is what the full upscaling
        computes there. `complete_logits` adds the rest for the masks that survive.
        """
        sparse_btc, dense_bchw = self.embed_points(points_b2)
        he, we = self.embedding.shape[-2:]
        th, tw = token_hw if token_hw is not None else (he, we)
        if self.exact:
            low_res_b3hw, iou_b3 = self.decoder(
                image_embeddings=self.embedding,
                image_pe=self.image_pe,
                sparse_prompt_embeddings=sparse_btc,
                dense_prompt_embeddings=dense_bchw,
                multimask_output=True,
            )
            keep_b3 = iou_keep(iou_b3, pred_iou_thresh)
            return iou_b3, keep_b3, low_res_b3hw[keep_b3][:, : 4 * th, : 4 * tw]

        hs_btc, keys_bnc = self._transformer(sparse_btc, dense_bchw[:1])
        iou_b3 = self.decoder.iou_prediction_head(hs_btc[:, 0, :])[:, 1:]  # hs: iou, mask tokens 1..
        keep_b3 = iou_keep(iou_b3, pred_iou_thresh)
        any_b = keep_b3.any(dim=1)
        if not bool(any_b.any()):
            return iou_b3, keep_b3, keys_bnc.new_zeros((0, 4 * th, 4 * tw))
        rows = torch.nonzero(any_b).flatten()
        low_res = []
        for (idx,) in batch_iterator(16, rows):
            keys = token_block(keys_bnc[idx], (he, we), (0, th), (0, tw))
            low_res.append(upscale_masks(self.decoder, keys, self._hyper(hs_btc[idx]), (th, tw))[keep_b3[idx]])
        return iou_b3, keep_b3, torch.cat(low_res)

    @torch.no_grad()
    def complete_logits(self, points_k2: Tensor, output_k: Tensor, block_khw: Tensor) -> Tensor:
        """Full (K, 4He, 4We) low-res logits of output ``output_k`` (0-2) of single-point prompts
        ``points_k2``, given their top-left block ``block_khw`` from `decode_cropped`: the
        prompts are decoded again and only the tokens outside the block are upscaled; the block
        itself is kept as given. For the few masks that pass every filter of the generator."""
        he, we = self.embedding.shape[-2:]
        bh, bw = block_khw.shape[-2] // 4, block_khw.shape[-1] // 4
        out = block_khw.new_zeros((len(points_k2), 4 * he, 4 * we))
        out[:, : 4 * bh, : 4 * bw] = block_khw
        if (bh, bw) == (he, we) or len(points_k2) == 0:
            return out
        for i in range(0, len(points_k2), 4):
            sl = slice(i, i + 4)
            sparse_btc, dense_bchw = self.embed_points(points_k2[sl])
            hs_btc, keys_bnc = self._transformer(sparse_btc, dense_bchw[:1])
            hyper = self._hyper(hs_btc)
            hyper_kc1 = hyper[torch.arange(len(hyper)), :, output_k[sl]].unsqueeze(2)
            if bh < he:  # rows below the block, all columns
                keys = token_block(keys_bnc, (he, we), (bh, he), (0, we))
                out[sl, 4 * bh :, :] = upscale_masks(self.decoder, keys, hyper_kc1, (he - bh, we))[:, 0].to(out.dtype)
            if bw < we:  # columns right of the block, block rows
                keys = token_block(keys_bnc, (he, we), (0, bh), (bw, we))
                out[sl, : 4 * bh, 4 * bw :] = upscale_masks(self.decoder, keys, hyper_kc1, (bh, we - bw))[:, 0].to(out.dtype)
        return out

    def _hyper(self, hs_btc: Tensor) -> Tensor:
        """Hypernetwork outputs (B, C', 3) of the multimask tokens."""
        d = self.decoder
        return torch.stack([d.output_hypernetworks_mlps[i](hs_btc[:, i, :]) for i in range(1, d.num_mask_tokens)], dim=2)

    def _transformer(self, sparse_btc: Tensor, dense_1chw: Tensor) -> Tuple[Tensor, Tensor]:
        """`TwoWayTransformer.forward` on tokens (B, T, C) and the shared image side; returns
        the final IoU and mask tokens (B, num_mask_tokens, C) and the image keys (B, N, C)."""
        d = self.decoder
        tr = d.transformer
        b = sparse_btc.shape[0]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens_btc = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_btc), dim=1)
        src_1nc, pe_1nc, srcpe_1nc = self._image_side(dense_1chw)

        queries, query_pe = tokens_btc, tokens_btc
        keys_bnc, keys_pe_bnc = src_1nc, srcpe_1nc  # batch 1 until the first image update
        shared = True  # not ``keys_bnc.shape[0] == 1``: a batch of one prompt has its own keys too
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)

            q = queries + query_pe
            if shared:
                # keys shared by all prompts: SAM's attention broadcasts them, projected once
                attn_out = layer.cross_attn_token_to_image(q=q, k=keys_pe_bnc, v=keys_bnc)
            else:
                attn_out = token_to_image_attention(layer.cross_attn_token_to_image, q, keys_pe_bnc, keys_bnc)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))

            q = queries + query_pe
            attn = layer.cross_attn_image_to_token
            if shared:
                keys_new = image_to_token_attention(
                    attn, self._projected_queries(attn, keys_pe_bnc), q, queries, keys_bnc, q_projected=True
                )
            else:
                keys_new = image_to_token_attention(attn, keys_pe_bnc, q, queries, keys_bnc)
            keys_bnc = F.layer_norm(
                keys_new, (keys_new.shape[-1],), layer.norm4.weight, layer.norm4.bias, layer.norm4.eps
            )
            keys_pe_bnc = keys_bnc + pe_1nc
            shared = False

        # Only the IoU token and the multimask tokens are read after the final attention, and
        # each query token attends independently.
        used = [0] + list(range(2, 1 + d.num_mask_tokens))
        queries, query_pe = queries[:, used], query_pe[:, used]
        q = queries + query_pe
        if shared:  # a transformer without layers
            attn_out = tr.final_attn_token_to_image(q=q, k=keys_pe_bnc, v=keys_bnc)
            keys_bnc = keys_bnc.expand(b, -1, -1)
        else:
            attn_out = token_to_image_attention(tr.final_attn_token_to_image, q, keys_pe_bnc, keys_bnc)
        queries = tr.norm_final_attn(queries + attn_out)
        return queries, keys_bnc

    def _projected_queries(self, attn, q_1nc: Tensor) -> Tensor:
        """``attn.q_proj`` of the shared image queries, computed once per image and module."""
        key = id(attn)
        if key not in self._q_cache:
            self._q_cache[key] = attn.q_proj(q_1nc)
        return self._q_cache[key]


def token_block(keys_bnc: Tensor, hw: Tuple[int, int], rows: Tuple[int, int], cols: Tuple[int, int]) -> Tensor:
    """Image tokens (B, N, C) of an (He, We) grid -> those of rows [r0, r1) x cols [c0, c1)."""
    (he, we), (r0, r1), (c0, c1) = hw, rows, cols
    if (r0, r1, c0, c1) == (0, he, 0, we):
        return keys_bnc
    b, _, c = keys_bnc.shape
    return keys_bnc.reshape(b, he, we, c)[:, r0:r1, c0:c1].reshape(b, (r1 - r0) * (c1 - c0), c)


def iou_keep(iou_b3: Tensor, thresh: float) -> Tensor:
    if thresh > 0.0:
        return iou_b3 > thresh
    return torch.ones_like(iou_b3, dtype=torch.bool)
