"""Training pairs of the refinement module (spec §4.1, App. D.2): SAM's output for one point drawn
in a human-annotated mask, kept when it matches that mask and passes SAM's quality filters; and
the images they come from (embedding, sizes, GT), split into train and validation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

from sum.config import RefineConfig
from sum.data.prompts import sample_first_points
from sum.model.embeddings import EmbeddingSource
from sum.model.predictor import SumPredictor
from sum.pseudo.point_decoder import PointBatchDecoder


@dataclass
class Pair:
    """One training pair: SAM's output for a single GT point, and the GT it should become.

    Coordinates are in the original image frame; ``s`` is SAM's low-res logits (h, w) float16.
    """

    image_id: str
    gt_index: int
    point_xy: np.ndarray  # (2,)
    box_xyxy: np.ndarray  # (4,) box of SAM's mask
    s: np.ndarray  # (h, w) float16
    iou_to_gt: float
    predicted_iou: float
    stability: float


def pair_filter(
    iou_to_gt: torch.Tensor,
    predicted_iou: torch.Tensor,
    stability: torch.Tensor,
    iou_filter: float = 0.7,
    pred_iou_thresh: float = 0.88,
    stability_thresh: float = 0.95,
) -> torch.Tensor:
    """Which candidate pairs are kept (App. D.2): ``IoU(SAM, GT) >= iou_filter`` and SAM's AMG
    filters, ``predicted IoU >= pred_iou_thresh`` and ``stability >= stability_thresh``.

    The AMG keeps ``predicted IoU > thresh`` (strict) and ``stability >= thresh``; the paper
    states the pair rule as "IoU < 0.7 excluded", so equality keeps a pair on all three here.

    Returns:
      bool tensor of the inputs' shape.
    """
    return (iou_to_gt >= iou_filter) & (predicted_iou >= pred_iou_thresh) & (stability >= stability_thresh)


class PointPredictor:
    """SAM's three outputs for single positive points on one image, what
    ``SumPredictor.predict_torch(points, labels, multimask_output=True, return_logits=True)``
    returns, with the prompt-independent decoder work done once per image
    (`sum.pseudo.point_decoder.PointBatchDecoder`; logits agree with SAM's decoder to float rounding).

    Arguments:
      predictor: a `SumPredictor` with the image's embedding set.
    """

    def __init__(self, predictor) -> None:
        self.model = predictor.model
        self.transform = predictor.transform
        self.original_size = tuple(predictor.original_size)
        self.input_size = tuple(predictor.input_size)
        self.device = predictor.device
        self.decoder = PointBatchDecoder(predictor.model, predictor.features)

    @torch.no_grad()
    def predict_torch(self, point_coords, point_labels, multimask_output=True, return_logits=True):
        """(logits (B, 3, H, W) at the original size, predicted IoU (B, 3), low-res logits
        (B, 3, h, w)) for points (B, 1, 2) in the input frame, all labelled positive."""
        if not (multimask_output and return_logits) or point_coords.shape[1] != 1 or not bool((point_labels == 1).all()):
            raise ValueError("PointPredictor: one positive point per prompt, multimask logits only")
        iou_b3, _, low_k_hw = self.decoder(point_coords[:, 0], 0.0)  # threshold 0: all 3 outputs
        b = point_coords.shape[0]
        low_b3hw = low_k_hw.view(b, 3, *low_k_hw.shape[-2:])
        logits_b3hw = self.model.postprocess_masks(low_b3hw, self.input_size, self.original_size)
        return logits_b3hw, iou_b3, low_b3hw


def _iou_nm(pred_nmhw: torch.Tensor, gt_n1hw: torch.Tensor) -> torch.Tensor:
    inter = (pred_nmhw & gt_n1hw).flatten(2).sum(-1).float()
    union = (pred_nmhw | gt_n1hw).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


@torch.no_grad()
def select_pairs(
    predictor,
    image_id: str,
    gt_khw: np.ndarray,
    cfg: RefineConfig,
    generator: torch.Generator,
) -> Tuple[List[Pair], Dict[str, int]]:
    """Candidate pairs of one image and the ones kept (App. D.2).

    Arguments:
      predictor: a `SumPredictor` of the foundation SAM with this image's embedding set.
      image_id: the image.
      gt_khw: (K, H, W) bool GT masks.
      cfg: ``points_per_mask`` and the filter thresholds.
      generator: CPU generator the points are drawn with.
    Returns:
      (kept pairs, counts {"candidates", "kept", "low_iou", "low_quality"}).
    """
    gt = torch.as_tensor(gt_khw)
    keep_gt = gt.flatten(1).any(1)
    gt = gt[keep_gt]
    gt_index = torch.nonzero(keep_gt)[:, 0]
    counts = {"candidates": 0, "kept": 0, "low_iou": 0, "low_quality": 0}
    if gt.shape[0] == 0:
        return [], counts
    points = [sample_first_points(gt[:, None], generator=generator).coords[:, 0] for _ in range(cfg.points_per_mask)]
    pts_b2 = torch.cat(points).to(torch.float32)  # (P*K, 2): point-major
    gt_b = gt.repeat(cfg.points_per_mask, 1, 1)
    idx_b = gt_index.repeat(cfg.points_per_mask)
    coords = predictor.transform.apply_coords_torch(pts_b2[:, None], predictor.original_size).to(predictor.device)
    labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
    logits_b3hw, iou_pred_b3, low_res_b3hw = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    logits_b3hw, iou_pred_b3, low_res_b3hw = logits_b3hw.cpu(), iou_pred_b3.cpu(), low_res_b3hw.cpu()
    iou_b3 = _iou_nm(logits_b3hw > 0, gt_b[:, None])
    best_b = iou_b3.argmax(1)
    pick = torch.arange(len(best_b))
    best_logits = logits_b3hw[pick, best_b]
    stability_b = calculate_stability_score(best_logits, 0.0, cfg.stability_offset)
    iou_b, pred_b = iou_b3[pick, best_b], iou_pred_b3[pick, best_b]
    keep_b = pair_filter(iou_b, pred_b, stability_b, cfg.iou_filter, cfg.pred_iou_thresh, cfg.stability_thresh)
    boxes_b4 = batched_mask_to_box(best_logits > 0)
    counts["candidates"] = len(best_b)
    counts["kept"] = int(keep_b.sum())
    counts["low_iou"] = int((iou_b < cfg.iou_filter).sum())
    counts["low_quality"] = int(((iou_b >= cfg.iou_filter) & ~keep_b).sum())
    pairs = [
        Pair(
            image_id=str(image_id),
            gt_index=int(idx_b[j]),
            point_xy=pts_b2[j].numpy().astype(np.float64),
            box_xyxy=boxes_b4[j].numpy().astype(np.float64),
            s=low_res_b3hw[j, best_b[j]].numpy().astype(np.float16),
            iou_to_gt=float(iou_b[j]),
            predicted_iou=float(pred_b[j]),
            stability=float(stability_b[j]),
        )
        for j in torch.nonzero(keep_b)[:, 0].tolist()
    ]
    return pairs, counts


# ---- one image's data for training and validation --------------------------------------------


@dataclass
class ImageData:
    """An image's embedding, sizes, GT masks, and its kept pairs."""

    image_id: str
    features: torch.Tensor  # (1, C, He, We)
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    gt_khw: np.ndarray
    pairs: List[Pair] = field(default_factory=list)


def split_images(image_ids: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """(train ids, val ids): a seeded random ``val_fraction`` of the images is held out (at least
    one when ``val_fraction > 0`` and there are two or more images)."""
    ids = list(image_ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[j] for j in order[:n_val]}
    return [i for i in ids if i not in val], [i for i in ids if i in val]


def prepare_images(
    model,
    datasets: Sequence,
    cfg: RefineConfig,
    embeddings: Optional[EmbeddingSource] = None,
) -> Tuple[List[ImageData], Dict[str, int]]:
    """Embeddings, GT and kept pairs of every image of the human-annotated ``datasets``.

    Arguments:
      model: the foundation SAM (weights loaded).
      datasets: human-annotated `SegDataset` s, in order; each one's ``name`` is its name in the
        cache. An image's id is ``<dataset name>/<image id>`` (unique across the datasets).
      cfg: `RefineConfig` (``max_images`` per dataset, ``seed`` and the pair filters).
      embeddings: the `EmbeddingSource` (the ``embed`` cache, else the encoder); None encodes
        every image.
    Returns:
      (images with at least one GT mask, pair counts summed over images).
    """
    predictor = SumPredictor(model)
    embeddings = embeddings if embeddings is not None else EmbeddingSource(None, predictor)
    gen = torch.Generator().manual_seed(cfg.seed)
    counts: Dict[str, int] = defaultdict(int)
    images = []
    for dataset, i in _indices(datasets, cfg.max_images):
        sample = dataset[i]
        if sample.masks.shape[0] == 0:
            continue
        image_id = f"{dataset.name}/{sample.image_id}"
        predictor.set_embedding(embeddings.load(dataset.name, sample.image_id, image=sample.image))
        pairs, c = select_pairs(PointPredictor(predictor), image_id, sample.masks, cfg, gen)
        for k, v in c.items():
            counts[k] += v
        images.append(
            ImageData(
                image_id=image_id,
                features=predictor.features.detach().clone(),
                original_size=tuple(predictor.original_size),
                input_size=tuple(predictor.input_size),
                gt_khw=sample.masks,
                pairs=pairs,
            )
        )
    return images, dict(counts)


def _indices(datasets: Sequence, max_images: int):
    """(dataset, index) of the first ``max_images`` images of each dataset (0: all), in order."""
    for dataset in datasets:
        n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
        for i in range(n):
            yield dataset, i
