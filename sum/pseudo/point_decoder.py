"""SAM's mask decoder for many single-point prompts on one image embedding, the kernel of the
pseudo-label generator (`sum.pseudo.amg.MaskGenerator`, spec §3.3).

SAM's decoder, run once per grid point, gives every prompt its own copy of the image embedding,
projected to queries/keys/values and split into heads, although only 7 prompt tokens ever attend
to it. `PointBatchDecoder` computes the same function with the prompt-independent work done once
per image and with the cross attentions folded onto the 7-token side (`sum.model.decoder.two_way`,
the decoder every stage runs), which cuts the per-prompt work to a few thin matrix products. It
evaluates the predicted-IoU filter before the output upscaling (the IoU head reads
only the IoU token, so this is exact) and upscales only prompts with a surviving output, and of
those only the image tokens that the resized image covers (`PointBatchDecoder.decode_cropped`);
`PointBatchDecoder.complete_logits` adds the rest for the masks that pass every filter.

``exact=True`` runs SAM's own `MaskDecoder` instead (`sum.model.decoder.decode` with ``exact``).

``precision="bf16"`` runs the per-prompt work on the image tokens (the two-way transformer and the
output upscaling) under bf16 autocast and the token-side heads in fp32: the IoU head and the
hypernetwork read the tokens cast back to fp32, and the hypernetwork product that makes the logits
runs in fp32, so the predicted IoUs (the NMS scores) and the logits the stability score counts are
not rounded to bf16's 8-bit mantissa. Masks then differ from fp32's where a pixel's logit lies within
bf16's rounding of 0 and where two candidates' scores lie within it of each other (NMS keeps the
other grid point's mask of the same object); `benchmarks.pseudolabel` measures both.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Dict, Optional, Tuple

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batch_iterator
from torch import Tensor

from sum.model.decoder import decode, hypernetwork, two_way, upscale_masks, upscaling_is_sam

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")


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
      precision (str): "fp32", or "bf16": the image-token work under bf16 autocast, the heads and
        the logits in fp32 (module docstring); not with ``exact``.
    """

    def __init__(
        self, model: Sam, embedding: Tensor, task_prompt: int = 0, exact: bool = False, precision: str = "fp32"
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        if precision != "fp32" and exact:
            raise ValueError(f"precision={precision!r} needs the fast decoder; SAM's own MaskDecoder (exact) runs fp32")
        self.precision = precision
        self.model = model
        self.embedding = embedding
        self.task_prompt = int(task_prompt)
        self.decoder = model.mask_decoder
        self.exact = exact or not upscaling_is_sam(self.decoder)
        if self.exact and not exact:
            if precision != "fp32":
                raise ValueError(f"precision={precision!r} needs SAM's output upscaling; this mask decoder's is not SAM's")
            log.warning("mask decoder output_upscaling is not SAM's; using SAM's MaskDecoder forward")
        self.image_pe = model.prompt_encoder.get_dense_pe()  # (1, C, He, We)
        self._shared: Optional[Tuple[Tensor, Tensor]] = None
        self._q_cache: Dict[int, Tensor] = {}

    def embed_points(self, points_b2: Tensor) -> Tuple[Tensor, Tensor]:
        """Sparse (B, 2, C) and dense (B, C, He, We) prompt embeddings of one positive point each,
        in the model's input frame, as `SamPredictor.predict_torch` builds them."""
        labels_b1 = torch.ones(points_b2.shape[0], 1, dtype=torch.int, device=points_b2.device)
        points = (points_b2[:, None, :], labels_b1)
        if self.task_prompt or hasattr(self.model.prompt_encoder, "task_prompt_embedding"):
            return self.model.prompt_encoder(points, None, None, task_prompt=self.task_prompt)
        return self.model.prompt_encoder(points, None, None)

    def _image_side(self, dense_1chw: Tensor) -> Tuple[Tensor, Tensor]:
        """Image tokens ``src = embedding + dense`` and the positional encoding, (1, N, C) each,
        shared by every prompt of the image."""
        if self._shared is None:
            src_1nc = (self.embedding + dense_1chw).flatten(2).transpose(1, 2).contiguous()
            pe_1nc = self.image_pe.flatten(2).transpose(1, 2).contiguous()
            self._shared = (src_1nc, pe_1nc)
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
        self, points_b2: Tensor, pred_iou_thresh: float, token_hw: Optional[Tuple[int, int]], select: bool = True
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """`__call__`, with the kept outputs' logits upscaled only over the top-left
        ``token_hw = (th, tw)`` image tokens (None: all): (K, 4*th, 4*tw).

        SAM's output upscaling maps each image token to its own 4x4 block of low-res pixels (two
        kernel-2 stride-2 transposed convolutions), so the block is what the full upscaling
        computes there. `complete_logits` adds the rest for the masks that survive.

        ``select=False`` upscales every prompt and returns the logits of all outputs (B*3, 4*th,
        4*tw), row-major, for the caller to index with ``keep`` later: nothing here then waits
        for the device (the choice for accelerators). ``select=True`` upscales only prompts with
        a kept output, which needs their indices on the host (free on CPU, a sync elsewhere).
        """
        sparse_btc, dense_bchw = self.embed_points(points_b2)
        he, we = self.embedding.shape[-2:]
        th, tw = token_hw if token_hw is not None else (he, we)
        if self.exact:
            low_res_b3hw, iou_b3 = decode(self.decoder, self.embedding, self.image_pe, sparse_btc, dense_bchw, True, exact=True)
            keep_b3 = iou_keep(iou_b3, pred_iou_thresh)
            low_res_b3hw = low_res_b3hw[..., : 4 * th, : 4 * tw]
            return iou_b3, keep_b3, low_res_b3hw[keep_b3] if select else low_res_b3hw.flatten(0, 1)

        with self._autocast():
            hs_btc, keys_bnc = self._transformer(sparse_btc, dense_bchw[:1])
        hs_btc = hs_btc.float()  # the token-side heads run in fp32 (a no-op in fp32)
        iou_b3 = self.decoder.iou_prediction_head(hs_btc[:, 0, :])[:, 1:]  # hs: iou, mask tokens 1..
        keep_b3 = iou_keep(iou_b3, pred_iou_thresh)
        if select:
            rows = torch.nonzero(keep_b3.any(dim=1)).flatten()
            if len(rows) == 0:
                return iou_b3, keep_b3, keys_bnc.new_zeros((0, 4 * th, 4 * tw))
        else:
            rows = torch.arange(len(keys_bnc), device=keys_bnc.device)
        low_res = []
        for (idx,) in batch_iterator(16, rows):
            keys = token_block(keys_bnc[idx], (he, we), (0, th), (0, tw))
            low_res_k3hw = self._upscale(keys, self._hyper(hs_btc[idx]), (th, tw))
            low_res.append(low_res_k3hw[keep_b3[idx]] if select else low_res_k3hw.flatten(0, 1))
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
            with self._autocast():
                hs_btc, keys_bnc = self._transformer(sparse_btc, dense_bchw[:1])
            hyper = self._hyper(hs_btc.float())
            hyper_kc1 = hyper[torch.arange(len(hyper)), :, output_k[sl]].unsqueeze(2)
            if bh < he:  # rows below the block, all columns
                keys = token_block(keys_bnc, (he, we), (bh, he), (0, we))
                out[sl, 4 * bh :, :] = self._upscale(keys, hyper_kc1, (he - bh, we))[:, 0].to(out.dtype)
            if bw < we:  # columns right of the block, block rows
                keys = token_block(keys_bnc, (he, we), (0, bh), (bw, we))
                out[sl, : 4 * bh, 4 * bw :] = self._upscale(keys, hyper_kc1, (bh, we - bw))[:, 0].to(out.dtype)
        return out

    def _autocast(self) -> ContextManager:
        """bf16 autocast on the embedding's device with ``precision="bf16"``, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.embedding.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _upscale(self, keys_bnc: Tensor, hyper_bcm: Tensor, hw: Tuple[int, int]) -> Tensor:
        """`upscale_masks`; with bf16 the upscaling under autocast, the product with the
        hypernetwork outputs (fp32) in fp32."""
        if self.precision == "fp32":
            return upscale_masks(self.decoder, keys_bnc, hyper_bcm, hw)
        with self._autocast():
            return upscale_masks(self.decoder, keys_bnc, hyper_bcm, hw, product_dtype=torch.float32)

    def _hyper(self, hs_btc: Tensor) -> Tensor:
        """Hypernetwork outputs (B, C', 3) of the multimask outputs from `_transformer`'s tokens."""
        return hypernetwork(self.decoder, hs_btc[:, 1:], range(1, self.decoder.num_mask_tokens))

    def _transformer(self, sparse_btc: Tensor, dense_1chw: Tensor) -> Tuple[Tensor, Tensor]:
        """`sum.model.decoder.two_way` on the image's shared tokens: the final IoU and multimask
        tokens (B, num_mask_tokens, C) and the image keys (B, N, C)."""
        src_1nc, pe_1nc = self._image_side(dense_1chw)
        read = [0] + list(range(2, 1 + self.decoder.num_mask_tokens))
        return two_way(self.decoder, sparse_btc, src_1nc, pe_1nc, read, shared=self._q_cache)


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
