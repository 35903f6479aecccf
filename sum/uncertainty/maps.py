"""Uncertainty maps of pseudo labels (spec §4.2) and their storage beside the pseudo-label shards.

For a pseudo label with SAM's low-res logits ``s`` and the refinement module's logits ``r``
(`sum.uncertainty.refine`, spec §4.1), paper Eq. 3:

    u = |σ(s) − σ(r)| ∈ [0, 1],   c = 1 − u,   pseudo label ŷ = 1[s > 0]

The label stays SAM's mask; the refined mask only serves to measure where SAM is likely wrong.

Storage (choice vs spec §3.4 / §13 A7). Per pseudo-label shard ``<pseudo_dir>/<dataset>/
shard-XXXXX.{json,npz}`` this stage writes ``<out_dir>/<dataset>/shard-XXXXX.npz`` with

- ``u`` uint8 (M, h, w) = round(255·u), h = w = 256 for SAM: the low-res padded 1024 frame of
  the pseudo-label logits, rows in the shard's ``logit_index`` order. A7 recommends σ(s) at the
  original resolution and σ(r) at 256²; the logits ``s`` here are already stored at 256² (the
  pseudo stage's float16 deviation), so u is computed where both live, in the padded frame, and
  brought to the image like SAM brings its logits (`sum.model.lowres.upsample_low_res`). 8-bit storage is what the
  released loader reads (σ(r)·255 PNGs); its error is at most 1/510 per pixel.
- ``r`` float16 (M, h, w), the refined logits (optional, ``store_refined``), for reports and
  for the "Mask Refinement" ablation (spec Tab. 2) that trains on ``1[r > 0]``.

and ``<out_dir>/<dataset>/shard-XXXXX.json`` with per-mask summaries aligned with the pseudo-label
records (`mask_summary`). Both are written atomically, the npz first: a json marks the shard
complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from sum.io import atomic_write_text
from sum.pseudo.store import read_npz, read_tagged_json, shard_stem, write_npz

log = logging.getLogger(__name__)

UNCERTAINTY_FORMAT = "sum-uncertainty-shard/1"
CERTAINTY_THRESHOLD = 0.6  # θ of the UA-Dice loss (spec §5.4); "uncertain" means c <= θ


def uncertainty_map(s_logits, r_logits):
    """``u = |σ(s) − σ(r)|``, paper Eq. 3 (spec §4.2).

    Arguments:
      s_logits: SAM's logits of the pseudo label, any shape (torch tensor or numpy array).
      r_logits: the refinement module's logits, same shape.
    Returns:
      u in [0, 1], same shape and kind (torch / numpy) as ``s_logits``; float32 for numpy.
    """
    if isinstance(s_logits, torch.Tensor):
        r = torch.as_tensor(r_logits, dtype=s_logits.dtype, device=s_logits.device)
        if r.shape != s_logits.shape:
            raise ValueError(f"uncertainty_map: s is {tuple(s_logits.shape)}, r is {tuple(r.shape)}")
        return (torch.sigmoid(s_logits) - torch.sigmoid(r)).abs()
    s = np.asarray(s_logits, dtype=np.float32)
    r = np.asarray(r_logits, dtype=np.float32)
    if r.shape != s.shape:
        raise ValueError(f"uncertainty_map: s is {s.shape}, r is {r.shape}")
    return np.abs(_sigmoid(s) - _sigmoid(r)).astype(np.float32)


def certainty(u):
    """``c = 1 − u`` (spec §4.2)."""
    return 1 - u


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free σ


def quantize_u(u) -> np.ndarray:
    """u in [0, 1] -> uint8 ``round(255·u)`` (error <= 1/510); values are clipped to [0, 1]."""
    u = u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u)
    return np.rint(np.clip(u.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize_u(u_q: np.ndarray) -> np.ndarray:
    """uint8 -> float32 u = value / 255, as `sum.pseudo.dataset.PseudoLabelDataset` reads it."""
    return np.asarray(u_q).astype(np.float32) / 255.0


# ---- applying the refinement module to pseudo labels -----------------------------------------


def _xywh_to_xyxy(b: Sequence[float]) -> List[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


@torch.no_grad()
def refine_image(
    refiner,
    features_1chw: torch.Tensor,
    original_size: Tuple[int, int],
    annotations: Sequence[dict],
    s_mhw: np.ndarray,
    batch_size: int = 16,
) -> Tuple[np.ndarray, np.ndarray]:
    """Refined logits of one image's pseudo labels (spec §4.1, inputs all at once).

    Each pseudo label is refined with its three prompts together: the mask prompt ``s`` (SAM's
    low-res logits), the box of the pseudo label (``bbox``, XYWH in the image) and the AMG grid
    point that produced it (``point_coords``, positive). Output: the single-output token (index 0).

    Arguments:
      refiner: `sum.uncertainty.refiner.RefinementModule`.
      features_1chw: the image embedding, (1, C, He, We).
      original_size: (H, W).
      annotations: pseudo-label records (``bbox``, ``point_coords``), in the order of ``s_mhw``.
      s_mhw: (M, h, w) SAM low-res logits.
      batch_size: pseudo labels per decoder call.
    Returns:
      (r (M, h, w) float32 refined logits, iou (M,) float32 predicted IoU of the refined masks).
    """
    m = len(annotations)
    if s_mhw.shape[0] != m:
        raise ValueError(f"refine_image: {m} annotations but {s_mhw.shape[0]} logit maps")
    if m == 0:
        return np.zeros((0, *s_mhw.shape[1:]), np.float32), np.zeros((0,), np.float32)
    transform = ResizeLongestSide(refiner.img_size)
    points = np.array([a["point_coords"][0] for a in annotations], np.float64)[:, None, :]  # (M, 1, 2)
    boxes = np.array([_xywh_to_xyxy(a["bbox"]) for a in annotations], np.float64)  # (M, 4)
    points = transform.apply_coords(points, tuple(original_size))
    boxes = transform.apply_boxes(boxes, tuple(original_size))
    device = refiner.device
    feats = features_1chw.to(device, torch.float32)
    r_out, iou_out = [], []
    for start in range(0, m, batch_size):
        sl = slice(start, start + batch_size)
        pts = torch.as_tensor(points[sl], dtype=torch.float32, device=device)
        lab = torch.ones(pts.shape[:2], dtype=torch.int, device=device)
        box = torch.as_tensor(boxes[sl], dtype=torch.float32, device=device)
        s = torch.as_tensor(np.asarray(s_mhw[sl], np.float32), device=device)[:, None]
        r_b1hw, iou_b1 = refiner(feats, pts, lab, box, s)
        r_out.append(r_b1hw[:, 0].float().cpu().numpy())
        iou_out.append(iou_b1[:, 0].float().cpu().numpy())
    return np.concatenate(r_out), np.concatenate(iou_out)


def refine_pseudo_labels(
    refiner,
    embedding_of: Callable[[str], object],
    images: Sequence[dict],
    logits_mhw: np.ndarray,
    batch_size: int = 16,
) -> Tuple[np.ndarray, np.ndarray]:
    """``r`` for every pseudo label of a shard, batched per image (spec §4.1-4.2).

    Arguments:
      refiner: `sum.uncertainty.refiner.RefinementModule`.
      embedding_of: image_id -> `sum.model.predictor.ImageEmbedding` (e.g. `EmbeddingCache.load`).
      images: the shard json's ``images`` (each with ``annotations`` holding ``logit_index``).
      logits_mhw: the shard's ``logits`` (M, h, w), SAM's ``s``.
      batch_size: pseudo labels per decoder call.
    Returns:
      (r (M, h, w) float32, refined predicted IoU (M,) float32), rows in ``logit_index`` order.
    """
    n = logits_mhw.shape[0]
    r_mhw = np.zeros(logits_mhw.shape, np.float32)
    iou_m = np.zeros((n,), np.float32)
    seen = np.zeros((n,), bool)
    for img in images:
        anns = img["annotations"]
        if not anns:
            continue
        rows = [int(a["logit_index"]) for a in anns]
        if max(rows) >= n:
            raise ValueError(f"image {img['image_id']!r}: logit_index {max(rows)} but the shard has {n} logit maps")
        emb = embedding_of(str(img["image_id"]))
        size = (int(img["height"]), int(img["width"]))
        if tuple(emb.original_size) != size:
            raise ValueError(f"image {img['image_id']!r}: embedding of a {emb.original_size} image, shard says {size}")
        r, iou = refine_image(refiner, emb.features, size, anns, logits_mhw[rows], batch_size)
        r_mhw[rows], iou_m[rows] = r, iou
        seen[rows] = True
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} logit maps are referenced by no annotation")
    return r_mhw, iou_m


# ---- per-mask summaries ----------------------------------------------------------------------


def lowres_valid_size(original_size: Tuple[int, int], img_size: int, low_res: int) -> Tuple[int, int]:
    """(h, w) of the non-padded part of the low-res frame (the resized image, before padding)."""
    h, w = ResizeLongestSide.get_preprocess_shape(int(original_size[0]), int(original_size[1]), img_size)
    scale = low_res / img_size
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def mask_summary(
    u_hw: np.ndarray,
    s_hw: np.ndarray,
    r_hw: np.ndarray,
    bbox_xywh: Sequence[float],
    original_size: Tuple[int, int],
    img_size: int,
    threshold: float = CERTAINTY_THRESHOLD,
) -> Dict[str, float]:
    """Summary statistics of one pseudo label's u, at low res in the padded frame.

    Returns:
      ``mean_u`` (over the non-padded image), ``mean_u_box`` (inside the pseudo label's box),
      ``uncertain_fraction_box`` (fraction of box pixels with ``c <= threshold``, i.e. what the
      UA-Dice loss leaves out, spec §5.4), ``mean_u_mask`` (inside ``s > 0``), ``iou_s_r`` (IoU
      of ``1[s > 0]`` and ``1[r > 0]`` over the image).
    """
    lh, lw = u_hw.shape
    vh, vw = lowres_valid_size(original_size, img_size, lh)
    u = u_hw[:vh, :vw]
    scale = lh / img_size * img_size / max(original_size)  # image pixels -> low-res pixels
    x0, y0, x1, y1 = _xywh_to_xyxy(bbox_xywh)
    bx0, by0 = int(np.floor(x0 * scale)), int(np.floor(y0 * scale))
    bx1, by1 = min(vw, int(np.ceil((x1 + 1) * scale))), min(vh, int(np.ceil((y1 + 1) * scale)))
    ub = u[by0:by1, bx0:bx1]
    sm, rm = s_hw[:vh, :vw] > 0, r_hw[:vh, :vw] > 0
    union = int((sm | rm).sum())
    return {
        "mean_u": float(u.mean()),
        "mean_u_box": float(ub.mean()) if ub.size else 0.0,
        "uncertain_fraction_box": float((1 - ub <= threshold).mean()) if ub.size else 0.0,
        "mean_u_mask": float(u[sm].mean()) if sm.any() else 0.0,
        "iou_s_r": float((sm & rm).sum() / union) if union else 0.0,
    }


# ---- shards ----------------------------------------------------------------------------------


def uncertainty_paths(out_dir: str | os.PathLike, dataset: str, shard: int) -> Tuple[Path, Path]:
    """(json, npz) of the uncertainty maps of one pseudo-label shard."""
    folder = Path(out_dir) / dataset
    return folder / f"{shard_stem(shard)}.json", folder / f"{shard_stem(shard)}.npz"


def uncertainty_shard(
    refiner,
    embedding_of: Callable[[str], object],
    doc: dict,
    logits_mhw: np.ndarray,
    batch_size: int = 16,
    threshold: float = CERTAINTY_THRESHOLD,
) -> Tuple[np.ndarray, np.ndarray, dict]:
    """u, r and the summary document of one pseudo-label shard.

    Returns:
      (u uint8 (M, h, w), r float16 (M, h, w), json document with per-mask summaries).
    """
    r_mhw, iou_m = refine_pseudo_labels(refiner, embedding_of, doc["images"], logits_mhw, batch_size)
    return shard_from_refined(doc, logits_mhw, r_mhw, iou_m, threshold)


def shard_from_refined(
    doc: dict,
    logits_mhw: np.ndarray,
    r_mhw: np.ndarray,
    iou_m: np.ndarray,
    threshold: float = CERTAINTY_THRESHOLD,
) -> Tuple[np.ndarray, np.ndarray, dict]:
    """u, r and the summary document of one pseudo-label shard, given the refined logits ``r``
    of its pseudo labels (rows in ``logit_index`` order) and their predicted IoU ``iou_m`` (the
    refinement module's, or the oracle's, `sum.uncertainty.oracle`).

    Returns:
      (u uint8 (M, h, w), r float16 (M, h, w), json document with per-mask summaries).
    """
    img_size = int(doc.get("img_size", 1024))
    if r_mhw.shape != logits_mhw.shape:
        raise ValueError(f"shard {doc.get('shard')}: r is {r_mhw.shape}, the pseudo-label logits {logits_mhw.shape}")
    u_mhw = uncertainty_map(logits_mhw.astype(np.float32), r_mhw)
    images = []
    for img in doc["images"]:
        size = (int(img["height"]), int(img["width"]))
        masks = []
        for a in img["annotations"]:
            j = int(a["logit_index"])
            stats = mask_summary(u_mhw[j], logits_mhw[j].astype(np.float32), r_mhw[j], a["bbox"], size, img_size, threshold)
            masks.append({"id": a["id"], "logit_index": j, "refined_iou_pred": float(iou_m[j]), **stats})
        images.append({"image_id": img["image_id"], "masks": masks})
    out = {
        "format": UNCERTAINTY_FORMAT,
        "shard": int(doc["shard"]),
        "dataset": doc.get("dataset"),
        "pseudo_config_hash": doc.get("config_hash"),
        "img_size": img_size,
        "certainty_threshold": threshold,
        "n_masks": int(logits_mhw.shape[0]),
        "images": images,
    }
    return quantize_u(u_mhw), r_mhw.astype(np.float16), out


def write_uncertainty_shard(
    out_dir: str | os.PathLike,
    dataset: str,
    shard: int,
    u_q: np.ndarray,
    summary: dict,
    r: Optional[np.ndarray] = None,
) -> Path:
    """Write the npz (``u`` uint8, optional ``r`` float16), then the json, each atomically.

    Returns:
      the json path.
    """
    if u_q.dtype != np.uint8:
        raise ValueError(f"{dataset} shard {shard}: u must be uint8 (quantize_u), got {u_q.dtype}")
    json_path, npz_path = uncertainty_paths(out_dir, dataset, shard)
    arrays = {"u": u_q}
    if r is not None:
        if r.shape != u_q.shape:
            raise ValueError(f"{npz_path}: r is {r.shape}, u is {u_q.shape}")
        arrays["r"] = r.astype(np.float16)
    write_npz(npz_path, **arrays)
    atomic_write_text(json_path, json.dumps(summary, separators=(",", ":")) + "\n")
    return json_path


def _u_and_r(z) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    return dequantize_u(z["u"]), (z["r"].astype(np.float32) if "r" in z.files else None)


def read_uncertainty_shard(out_dir: str | os.PathLike, dataset: str, shard: int) -> Tuple[dict, np.ndarray, Optional[np.ndarray]]:
    """(summary json, u float32 (M, h, w), r float32 or None).

    Raises:
      FileNotFoundError, ValueError: naming the file.
    """
    json_path, npz_path = uncertainty_paths(out_dir, dataset, shard)
    for p in (json_path, npz_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: uncertainty shard not found (run `sumseg uncertainty`)")
    doc = read_tagged_json(json_path, UNCERTAINTY_FORMAT, "uncertainty shard", "an uncertainty shard")
    u, r = read_npz(npz_path, "uncertainty archive with 'u'", _u_and_r)
    if u.shape[0] != doc.get("n_masks"):
        raise ValueError(f"{npz_path}: {u.shape[0]} maps, {json_path.name} says n_masks={doc.get('n_masks')}")
    return doc, u, r
