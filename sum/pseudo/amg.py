"""Automatic mask generation for pseudo-labels (spec §3.3-3.5), faster than SAM's own AMG.

`MaskGenerator` has the parameters and the output of `segment_anything.SamAutomaticMaskGenerator`
(same masks, same order, same NMS tie semantics) and adds, per record, SAM's low-res logits of the
kept multimask output as float16 (spec §3.3: the pseudo label is ``1[s > 0]``; §3.4 / §13 A7:
we store float16 logits instead of 8-bit probabilities, a documented deviation).

The image encoder runs once per crop; SAM's mask decoder, run once per grid point, is most of the
official generator's time, so grid points are decoded by `sum.pseudo.point_decoder.PointBatchDecoder`
(SAM's function, folded; IoU filter before upscaling). Then, per survivor, the pipeline is the
official one (upsample, stability score, binarise, box, crop-edge filter, RLE, box NMS) with
`segment_anything.utils.amg` functions. Float rounding differs from SAM's decoder (logits ~1e-5),
so a pixel whose logit is within rounding of 0 may flip; ``decoder="exact"`` runs SAM's own
`MaskDecoder`, bit-identical to the official generator at equal ``points_per_batch``.
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

from sum.pseudo.point_decoder import PRECISIONS, PointBatchDecoder

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
DECODERS = ("fast", "exact")
# decoder_batch=None: grid points decoded together. On CPU 4, the earlier fixed value: its batches of
# image tokens stay in cache, and other sizes round the decoder's floats differently (masks equal,
# bits not always); on an accelerator a batch must be large enough to fill it.
DECODER_BATCH_CPU = 4
DECODER_BATCH_ACCELERATOR = 256


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
        decoder_batch: Optional[int] = None,
        decoder_precision: str = "fp32",
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
          decoder_batch (int or None): with ``decoder="fast"``, grid points decoded together
            inside a ``points_per_batch`` batch. Prompts are independent, so this changes nothing
            but speed and memory (B x 4096 x 256 floats of image tokens per batch). None: sized
            per device (`decoder_batch_for`).
          decoder_precision (str): with ``decoder="fast"``, "fp32" or "bf16": the decoder's work on
            the image tokens under bf16 autocast, its heads and logits in fp32
            (`PointBatchDecoder`). Faster where the device has bf16 matrix units (here about 1.5x
            on a CPU with avx512_bf16); masks equal fp32's up to pixels within rounding and NMS
            ties (`benchmarks.pseudolabel` reports both).
        """
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}: expected one of {OUTPUT_MODES}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r}: expected one of {DECODERS}")
        if decoder_precision not in PRECISIONS:
            raise ValueError(f"decoder_precision={decoder_precision!r}: expected one of {PRECISIONS}")
        if decoder_precision != "fp32" and decoder != "fast":
            raise ValueError(f"decoder_precision={decoder_precision!r} needs decoder='fast' (SAM's own decoder runs fp32)")
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
        if decoder_batch is not None and decoder_batch < 1:
            raise ValueError(f"decoder_batch={decoder_batch}: expected >= 1 or None (sized per device)")
        self.decoder_batch = decoder_batch
        self.decoder_precision = decoder_precision

    @property
    def device(self) -> torch.device:
        return self.model.device

    def decoder_batch_for(self, device: torch.device) -> int:
        """``decoder_batch``, or where it is None the default of ``device``'s type:
        `DECODER_BATCH_CPU` on CPU, `DECODER_BATCH_ACCELERATOR` elsewhere."""
        if self.decoder_batch is not None:
            return self.decoder_batch
        return DECODER_BATCH_CPU if device.type == "cpu" else DECODER_BATCH_ACCELERATOR

    def selects_in_decoder(self) -> bool:
        """Whether the decoder upscales only prompts with a kept output: on CPU, where their
        indices cost nothing. Elsewhere it upscales all and the crop's outputs are filtered after
        its decoding, which then waits for the device once."""
        return self.device.type == "cpu"

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
        decode = PointBatchDecoder(
            self.model, embedding, self.task_prompt, exact=self.decoder == "exact", precision=self.decoder_precision
        )
        points_scale = np.array(crop_size)[None, ::-1]
        points_for_image = self.point_grids[layer_idx] * points_scale
        token_hw = self._token_crop(embedding, input_size) if self.decoder == "fast" else None
        low_res = 4 * embedding.shape[-2]  # SAM's low-res logits: 4x the (square) embedding grid
        step = self.decoder_batch_for(self.device) if self.decoder == "fast" else self.points_per_batch
        select = self.selects_in_decoder()
        iou, keep, logits = [], [], []
        if len(points_for_image) == 0:
            return _empty_crop((low_res, low_res))
        for (points,) in batch_iterator(self.points_per_batch, points_for_image):
            in_points = torch.as_tensor(self.transform.apply_coords(points, crop_size), device=self.device)
            # the fast decoder's prompts are independent: decode and filter ``decoder_batch`` at a time
            for i in range(0, len(points), step):
                iou_b3, keep_b3, logits_khw = decode.decode_cropped(in_points[i : i + step], self.pred_iou_thresh, token_hw, select)
                iou.append(iou_b3)
                keep.append(keep_b3)
                logits.append(logits_khw)
        keep_n3 = torch.cat(keep)
        logits_khw = torch.cat(logits) if select else torch.cat(logits)[keep_n3.flatten()]
        keep_cpu_n3 = keep_n3.cpu()  # the one wait for the device of this crop's decoding
        batch = MaskData(
            iou_preds=torch.cat(iou).flatten()[keep_n3.flatten()],
            points=torch.as_tensor(points_for_image.repeat(keep_n3.shape[1], axis=0))[keep_cpu_n3.flatten()],
            low_res_logits=logits_khw,
            output=torch.nonzero(keep_cpu_n3)[:, 1],
        )
        parts = self._filter_upsampled(batch, input_size, crop_size, crop_box, orig_size, low_res)
        if not parts:
            return _empty_crop((low_res, 4 * embedding.shape[-1]))
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
        self, batch: MaskData, input_size: Tuple[int, int], crop_size: Tuple[int, int], crop_box: List[int],
        orig_size: Tuple[int, int], low_res: int,
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
            chunk["rles"] = mask_to_rle_pytorch(masks_khw.cpu())  # one copy, not a wait per mask
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
