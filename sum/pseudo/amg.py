"""Automatic mask generation for pseudo-labels (spec §3.3-3.5), faster than SAM's own AMG.

`MaskGenerator` has the parameters and the output of `segment_anything.SamAutomaticMaskGenerator`
(same masks, same order, same NMS tie semantics) and adds, per record, SAM's low-res logits of the
kept multimask output as float16 (spec §3.3: the pseudo label is ``1[s > 0]``; §3.4 / §13 A7:
we store float16 logits instead of 8-bit probabilities, a documented deviation).

Where the time goes, and what changes (measured with MobileSAM on the 2-core development CPU):
the image encoder runs once per crop in both; SAM's mask decoder, run once per grid point, is
about 90% of the official generator's time, and most of that is memory traffic: every prompt gets
its own copy of the 64x64x256 image embedding, projected to queries/keys/values and split into
heads, although only 7 prompt tokens ever attend to it. `PointBatchDecoder` computes the same
function with the prompt-independent work done once per image and with the projections of the
cross attentions folded onto the 7-token side (``(q Wk) k^T`` instead of ``q (k Wk^T)^T``), which
cuts the per-prompt work to a few thin matrix products. It also evaluates the predicted-IoU filter
before the output upscaling (the IoU head reads only the IoU token, so this is exact) and upscales
only prompts with a surviving output, and of those only the image tokens that the resized image
covers: the upscaling maps each token to its own 4x4 logits, so on a 4:3 image a quarter of the
work (the padding rows) is skipped until a mask has passed every filter and its stored logits are
completed. Then, per survivor, the pipeline is the official one: upsample to the crop
(`Sam.postprocess_masks`, over the same rows), stability score, binarise, box, crop-edge filter,
RLE, box NMS, all with `segment_anything.utils.amg` functions.

The folded attention is algebraically equal to SAM's; floating-point rounding differs (logits
agree to ~1e-5), so a mask can differ by a pixel whose logit is within rounding of 0.
``decoder="exact"`` runs SAM's own `MaskDecoder` instead and is bit-identical to the official
generator at equal ``points_per_batch``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torchvision.ops.boxes import batched_nms, box_area

from sum.model.folded_decoder import upscale_masks, upscaling_is_sam

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DECODERS = ("fast", "exact")


def _attention_heads(attn) -> Tuple[int, int]:
    """(heads, channels per head) of a `segment_anything.modeling.transformer.Attention`."""
    return attn.num_heads, attn.internal_dim // attn.num_heads


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
    heads, ch = _attention_heads(attn)
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
    heads, ch = _attention_heads(attn)
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
            keep_b3 = _iou_keep(iou_b3, pred_iou_thresh)
            return iou_b3, keep_b3, low_res_b3hw[keep_b3][:, : 4 * th, : 4 * tw]

        hs_btc, keys_bnc = self._transformer(sparse_btc, dense_bchw[:1])
        iou_b3 = self.decoder.iou_prediction_head(hs_btc[:, 0, :])[:, 1:]  # hs: iou, mask tokens 1..
        keep_b3 = _iou_keep(iou_b3, pred_iou_thresh)
        any_b = keep_b3.any(dim=1)
        if not bool(any_b.any()):
            return iou_b3, keep_b3, keys_bnc.new_zeros((0, 4 * th, 4 * tw))
        rows = torch.nonzero(any_b).flatten()
        low_res = []
        for (idx,) in batch_iterator(16, rows):
            keys = _token_block(keys_bnc[idx], (he, we), (0, th), (0, tw))
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
                keys = _token_block(keys_bnc, (he, we), (bh, he), (0, we))
                out[sl, 4 * bh :, :] = upscale_masks(self.decoder, keys, hyper_kc1, (he - bh, we))[:, 0].to(out.dtype)
            if bw < we:  # columns right of the block, block rows
                keys = _token_block(keys_bnc, (he, we), (0, bh), (bw, we))
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


def _token_block(keys_bnc: Tensor, hw: Tuple[int, int], rows: Tuple[int, int], cols: Tuple[int, int]) -> Tensor:
    """Image tokens (B, N, C) of an (He, We) grid -> those of rows [r0, r1) x cols [c0, c1)."""
    (he, we), (r0, r1), (c0, c1) = hw, rows, cols
    if (r0, r1, c0, c1) == (0, he, 0, we):
        return keys_bnc
    b, _, c = keys_bnc.shape
    return keys_bnc.reshape(b, he, we, c)[:, r0:r1, c0:c1].reshape(b, (r1 - r0) * (c1 - c0), c)


def _iou_keep(iou_b3: Tensor, thresh: float) -> Tensor:
    if thresh > 0.0:
        return iou_b3 > thresh
    return torch.ones_like(iou_b3, dtype=torch.bool)


class MaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "coco_rle",
        task_prompt: int = 0,
        decoder: str = "fast",
        upsample_batch: int = 16,
        decoder_batch: int = 4,
    ) -> None:
        """SAM's automatic mask generator for pseudo-labels (spec §3.3), same masks as
        `segment_anything.SamAutomaticMaskGenerator` at equal settings.

        Defaults are the spec's (§3.3, the released AMG defaults) except ``output_mode``, which
        defaults to SA-1B's COCO RLE (§3.4).

        Arguments:
          model (Sam): SAM or SUM model (eval mode, weights loaded).
          points_per_side, point_grids, points_per_batch, pred_iou_thresh, stability_score_thresh,
            stability_score_offset, box_nms_thresh, crop_n_layers, crop_nms_thresh,
            crop_overlap_ratio, crop_n_points_downscale_factor, min_mask_region_area,
            output_mode: as in `SamAutomaticMaskGenerator`. ``points_per_batch`` is the number
            of grid points decoded together.
          task_prompt (int): task id given to a `TaskPromptEncoder` (spec §2.2); pseudo-labels
            use 0, plain SAM (§3.3).
          decoder (str): "fast" (`PointBatchDecoder`, float rounding differs from SAM's decoder)
            or "exact" (SAM's `MaskDecoder`).
          upsample_batch (int): survivors upsampled to full resolution at a time (memory).
          decoder_batch (int): with ``decoder="fast"``, grid points decoded together inside a
            ``points_per_batch`` batch. Prompts are independent, so this changes nothing but
            speed: the per-prompt image tokens (B x 4096 x 256 floats) of a small batch stay in
            cache, where 64 of them stream through memory at every operation.
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}: expected one of {OUTPUT_MODES}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS}")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            self.point_grids = point_grids
        if len(self.point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids has {len(self.point_grids)} grids, crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}")
        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.task_prompt = int(task_prompt)
        self.decoder = decoder
        self.upsample_batch = upsample_batch
        if decoder_batch < 1:
            raise ValueError(f"decoder_batch={decoder_batch}: expected >= 1")
        self.decoder_batch = decoder_batch

    @property
    def device(self) -> torch.device:
        return self.model.device

    def input_size(self, original_size: Sequence[int]) -> Tuple[int, int]:
        """(h, w) of an image of ``original_size`` after `ResizeLongestSide`, before padding."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.transform.target_length)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> Tuple[Tensor, Tuple[int, int]]:
        """Image embedding (1, C, He, We) and input size of an HWC uint8 RGB image, as
        `SamPredictor.set_image` computes them."""
        predictor = SamPredictor(self.model)
        predictor.set_image(image)
        return predictor.features, tuple(predictor.input_size)

    @torch.no_grad()
    def generate(self, image: np.ndarray, embedding: Optional[Tensor] = None) -> List[Dict[str, Any]]:
        """Masks for an HWC uint8 RGB image (spec §3.3).

        Arguments:
          image (np.ndarray): (H, W, 3) uint8.
          embedding (Tensor or None): a cached (1, C, He, We) embedding of the whole image (crop
            layer 0); the encoder then runs only on the smaller crops, if any.

        Returns:
          list of SA-1B-style records, in the official generator's order:
            segmentation: COCO RLE (``output_mode="coco_rle"``), uncompressed RLE or (H, W) bool;
            area (int); bbox (list, XYWH); predicted_iou (float); stability_score (float);
            point_coords ([[x, y]], the grid point that produced the mask, image frame);
            crop_box (list, XYWH);
            low_res_logits: (4He, 4We) float16 numpy array (256x256 for SAM), SAM's logits of
              the kept multimask output in the padded model-input frame of its crop (1024x1024
              for SAM; pixels past the resized image are padding). Upsampled bilinearly to the
              padded frame, cropped to the input size and resized to the crop, ``> 0`` gives the
              mask (before ``min_mask_region_area`` post-processing; spec §3.4, §13 A7).
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image is {image.dtype} {image.shape}: expected (H, W, 3) uint8")
        return self._generate(image, tuple(image.shape[:2]), embedding)

    @torch.no_grad()
    def generate_from_embedding(
        self,
        embedding: Tensor,
        original_size: Sequence[int],
        input_size: Optional[Sequence[int]] = None,
    ) -> List[Dict[str, Any]]:
        """Masks from a cached image embedding, without the image (crop_n_layers=0 only).

        Arguments:
          embedding (Tensor): (1, C, He, We), as `SamPredictor.get_image_embedding` returns.
          original_size: (H, W) of the image.
          input_size: (h, w) after `ResizeLongestSide` (derived from original_size if None).

        Returns:
          the records of `generate`.
        """
        if self.crop_n_layers > 0:
            raise ValueError(f"crop_n_layers={self.crop_n_layers}: crops need the image, use generate(image, embedding)")
        original_size = (int(original_size[0]), int(original_size[1]))
        expected = self.input_size(original_size)
        if input_size is not None and tuple(input_size) != expected:
            raise ValueError(f"input_size={tuple(input_size)} does not match original_size={original_size} (expected {expected})")
        return self._generate(None, original_size, embedding)

    def _generate(self, image: Optional[np.ndarray], orig_size: Tuple[int, int], embedding: Optional[Tensor]) -> List[Dict[str, Any]]:
        data = self._generate_masks(image, orig_size, embedding)
        if self.min_mask_region_area > 0:
            data = SamAutomaticMaskGenerator.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return self._records(data)

    def _records(self, data: MaskData) -> List[Dict[str, Any]]:
        records = []
        for idx, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": area_from_rle(rle),
                    "bbox": box_xyxy_to_xywh(data["boxes"][idx]).tolist(),
                    "predicted_iou": data["iou_preds"][idx].item(),
                    "point_coords": [data["points"][idx].tolist()],
                    "stability_score": data["stability_score"][idx].item(),
                    "crop_box": box_xyxy_to_xywh(data["crop_boxes"][idx]).tolist(),
                    "low_res_logits": data["low_res_logits"][idx],
                }
            )
        return records

    def _generate_masks(self, image: Optional[np.ndarray], orig_size: Tuple[int, int], embedding: Optional[Tensor]) -> MaskData:
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        parts = []
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            x0, y0, x1, y1 = crop_box
            crop_size = (y1 - y0, x1 - x0)
            if layer_idx == 0 and embedding is not None:
                emb, input_size = embedding.to(self.device), self.input_size(crop_size)
                he, we = self.model.prompt_encoder.image_embedding_size
                if tuple(emb.shape[-2:]) != (he, we) or emb.ndim != 4:
                    raise ValueError(f"embedding is {tuple(emb.shape)}: expected (1, C, {he}, {we})")
            else:
                emb, input_size = self.embed(image[y0:y1, x0:x1, :])
            parts.append(self._process_crop(emb, input_size, crop_size, crop_box, layer_idx, orig_size))
        data = _concat(parts)

        if len(crop_boxes) > 1:
            # Prefer masks from smaller crops (as SAM's AMG)
            scores = 1 / box_area(data["crop_boxes"])
            keep = batched_nms(
                data["boxes"].float(), scores.to(data["boxes"].device), torch.zeros(len(data["boxes"])),
                iou_threshold=self.crop_nms_thresh,
            )
            data.filter(keep)
        data.to_numpy()
        return data

    def _process_crop(
        self,
        embedding: Tensor,
        input_size: Tuple[int, int],
        crop_size: Tuple[int, int],
        crop_box: List[int],
        layer_idx: int,
        orig_size: Tuple[int, int],
    ) -> MaskData:
        decode = PointBatchDecoder(self.model, embedding, self.task_prompt, exact=self.decoder == "exact")
        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        token_hw = self._token_crop(embedding, input_size) if self.decoder == "fast" else None
        low_res = 4 * embedding.shape[-2]  # SAM's low-res logits: 4x the (square) embedding grid
        step = self.decoder_batch if self.decoder == "fast" else self.points_per_batch
        parts = []
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            in_points = torch.as_tensor(self.transform.apply_coords(points, crop_size), device=self.device)
            # the fast decoder's prompts are independent: decode and filter ``decoder_batch`` at a time
            for i in range(0, len(points), step):
                iou_b3, keep_b3, low_res_khw = decode.decode_cropped(in_points[i : i + step], self.pred_iou_thresh, token_hw)
                n_out = keep_b3.shape[1]
                batch = MaskData(
                    iou_preds=iou_b3.flatten(0, 1)[keep_b3.flatten()],
                    points=torch.as_tensor(points[i : i + step].repeat(n_out, axis=0))[keep_b3.flatten().cpu()],
                    low_res_logits=low_res_khw,
                    output=torch.nonzero(keep_b3)[:, 1].cpu(),
                )
                parts.extend(self._filter_upsampled(batch, input_size, crop_size, crop_box, orig_size, low_res))
        if not parts:
            he, we = embedding.shape[-2:]
            return _empty_crop((4 * he, 4 * we))
        data = _concat(parts)
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])), iou_threshold=self.box_nms_thresh
        )
        data.filter(keep)
        # the survivors' logits over the padding tokens, skipped so far
        in_points = torch.as_tensor(self.transform.apply_coords(data["points"].numpy(), crop_size), device=self.device)
        data["low_res_logits"] = decode.complete_logits(
            in_points, data["output"].to(self.device), data["low_res_logits"].to(self.device)
        ).cpu()
        del data["output"]
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))])
        return data

    def _token_crop(self, embedding: Tensor, input_size: Tuple[int, int]) -> Tuple[int, int]:
        """Image tokens (rows, cols) whose upscaled logits the bilinear upsampling to ``input_size``
        reads (`_upsample_to_crop`): ``ceil(h * L / img_size) + 1`` low-res rows (the +1 is the
        lower neighbour of the last row) of the L = 4 * He low-res rows, 4 per token."""
        he, we = embedding.shape[-2:]
        img = self.model.image_encoder.img_size
        if img % (4 * he) or img % (4 * we):
            return he, we
        rows = math.ceil(input_size[0] * 4 * he / img) + 1
        cols = math.ceil(input_size[1] * 4 * we / img) + 1
        return min(he, math.ceil(rows / 4)), min(we, math.ceil(cols / 4))

    def _upsample_to_crop(
        self, logits_k1hw: Tensor, low_res: int, input_size: Tuple[int, int], crop_size: Tuple[int, int]
    ) -> Tensor:
        """``Sam.postprocess_masks`` of the top-left block of (low_res x low_res) logits
        (`_token_crop`): the upsampling to (img_size, img_size) runs only over the block, at the
        same scale (low_res / img_size), so each pixel it keeps after the crop to ``input_size``
        is computed from the same neighbours with the same weights as SAM's."""
        img = self.model.image_encoder.img_size
        h, w = logits_k1hw.shape[-2:]
        if (h, w) == (low_res, low_res):
            return self.model.postprocess_masks(logits_k1hw, input_size, crop_size)
        up = F.interpolate(logits_k1hw, (h * img // low_res, w * img // low_res), mode="bilinear", align_corners=False)
        up = up[..., : input_size[0], : input_size[1]]
        return F.interpolate(up, crop_size, mode="bilinear", align_corners=False)

    def _filter_upsampled(
        self,
        batch: MaskData,
        input_size: Tuple[int, int],
        crop_size: Tuple[int, int],
        crop_box: List[int],
        orig_size: Tuple[int, int],
        low_res: int,
    ) -> List[MaskData]:
        """Stability filter, boxes, crop-edge filter and RLE of IoU survivors, upsampled
        ``upsample_batch`` at a time (the filters of SAM's ``_process_batch``).

        ``batch["low_res_logits"]`` may be the top-left block of the (low_res x low_res) logits
        (`PointBatchDecoder.decode_cropped`); the survivors' blocks are kept, as float16."""
        orig_h, orig_w = orig_size
        threshold = self.model.mask_threshold
        x0, y0, x1, y1 = crop_box
        pad = (x0, orig_w - x1, y0, orig_h - y1)
        out = []
        n = len(batch["iou_preds"])
        for start in range(0, n, self.upsample_batch):
            idx = torch.arange(start, min(n, start + self.upsample_batch))
            chunk = MaskData(**{k: v[idx] for k, v in batch.items()})
            logits_khw = chunk["low_res_logits"]
            masks_khw = self._upsample_to_crop(logits_khw[:, None], low_res, input_size, crop_size)[:, 0]
            chunk["stability_score"] = calculate_stability_score(masks_khw, threshold, self.stability_score_offset)
            keep = torch.ones(len(idx), dtype=torch.bool, device=masks_khw.device)
            if self.stability_score_thresh > 0.0:
                keep &= chunk["stability_score"] >= self.stability_score_thresh
            masks_khw = masks_khw > threshold
            boxes = batched_mask_to_box(masks_khw)
            keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            if not bool(keep.any()):
                continue
            chunk["boxes"] = boxes
            chunk.filter(keep)
            masks_khw = masks_khw[keep]
            if any(pad):
                masks_khw = F.pad(masks_khw, pad, value=0)
            chunk["rles"] = mask_to_rle_pytorch(masks_khw)
            chunk["low_res_logits"] = chunk["low_res_logits"].to(torch.float16).cpu()
            chunk["iou_preds"] = chunk["iou_preds"].cpu()
            chunk["stability_score"] = chunk["stability_score"].cpu()
            chunk["boxes"] = chunk["boxes"].cpu()
            out.append(chunk)
        return out


def _concat(parts: List[MaskData]) -> MaskData:
    """``MaskData.cat`` of many parts at once, without its deep copies (the parts are ours)."""
    out = MaskData()
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat(values)
        else:
            out[key] = [v for vs in values for v in vs]
    return out


def _empty_crop(low_res_hw: Tuple[int, int]) -> MaskData:
    return MaskData(
        iou_preds=torch.zeros(0),
        points=torch.zeros(0, 2, dtype=torch.float64),
        low_res_logits=torch.zeros(0, *low_res_hw, dtype=torch.float16),
        stability_score=torch.zeros(0),
        boxes=torch.zeros(0, 4, dtype=torch.int64),
        rles=[],
        crop_boxes=torch.zeros(0, 4, dtype=torch.int64),
    )
