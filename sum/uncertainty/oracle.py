"""Oracle uncertainty maps: u of the real pseudo labels against the hidden ground truth, the top
of the refiner-quality axis (a diagnostic, like the oracle pool `sum.pseudo.oracle`).

The uncertainty-aware loss and sampling (spec §5.3-5.4) can only help as much as ``u`` finds the
pixels where a pseudo label is wrong. The refinement module (spec §4.1) estimates the object a
pseudo label is meant to be; the oracle *knows* it. Per pseudo label ``ŷ = 1[s > 0]`` of the pool
(SAM's logits ``s`` and masks unchanged), the oracle's refined mask is the hidden GT mask of
highest IoU over every granularity the world annotates (the uncertainty report's match, without
its 0.5 threshold: a fragment finer than any annotated object is refined to the object that holds
it, as a perfect refiner would grow it; one that overlaps no GT mask is refined to nothing),
brought to the low-res padded frame where ``s`` lives
(`gt_lowres`: the fraction of each 4x4-pixel cell of the 1024 input the GT covers, so ``σ(r)`` is
exact up to the frame's resolution). Then spec Eq. 3 as the stage computes it:
``u = |σ(s) − σ(r)|`` (`sum.uncertainty.maps.shard_from_refined`).

Shards have the layout of the ``uncertainty`` stage, so a fine-tune reads them with
``train.uncertainty_dir=<out>``; unlabeled datasets without hidden GT (the photos) get the
stage's own maps copied from ``uncertainty.out_dir``. ``sumseg seeds seeds=dose`` fine-tunes
``sum`` on them beside the refiner's maps (README, "dose-response"). The hidden GT is never used
by the pipeline's own stages.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from sum.data.hidden_gt import hidden_gt_masks, hidden_gt_paths, load_hidden_gt
from sum.data.masks import mask_iou_matrix
from sum.pseudo.coverage import pseudo_label_masks
from sum.pseudo.store import list_shards, read_shard
from sum.uncertainty.maps import (
    lowres_valid_size,
    shard_from_refined,
    uncertainty_paths,
    write_uncertainty_shard,
)
from sum.uncertainty.stage import stage_datasets

log = logging.getLogger(__name__)

PROB_CLIP = 1e-3  # σ(r) of the oracle in [PROB_CLIP, 1 - PROB_CLIP]: logits of ±6.9, exact in float16


def gt_lowres(mask_hw: np.ndarray, img_size: int, low_res: int) -> np.ndarray:
    """A mask at the original resolution -> (low_res, low_res) float32: the fraction of each cell of
    the padded low-res frame it covers (area resampling of the resized image region, zero in the
    padding), i.e. the frame SAM's low-res logits live in (`sum.model.lowres`)."""
    vh, vw = lowres_valid_size(mask_hw.shape, img_size, low_res)
    t = torch.from_numpy(np.ascontiguousarray(mask_hw, dtype=np.float32))[None, None]
    out = np.zeros((low_res, low_res), np.float32)
    out[:vh, :vw] = F.interpolate(t, size=(vh, vw), mode="area")[0, 0].numpy()
    return out


def prob_to_logit(p: np.ndarray) -> np.ndarray:
    """logit(p) with p clipped to [PROB_CLIP, 1 - PROB_CLIP] (finite, float16-exact range)."""
    p = np.clip(np.asarray(p, np.float32), PROB_CLIP, 1.0 - PROB_CLIP)
    return np.log(p / (1.0 - p)).astype(np.float32)


def oracle_refined(doc: dict, logits_mhw: np.ndarray, hidden: Dict[str, tuple], where: str) -> Tuple[np.ndarray, np.ndarray]:
    """The oracle's refined logits and match IoU of every pseudo label of a shard (module docstring).

    Arguments:
      doc: the shard json (images with ``file_name``, ``height``, ``width``, ``annotations``).
      logits_mhw: its logits (M, h, w), for the frame's size.
      hidden: `sum.data.hidden_gt.load_hidden_gt` of the dataset.
      where: the dataset's name, for errors.
    Returns:
      (r (M, h, w) float32 logits, iou (M,) float32: IoU of each pseudo label with its GT).
    Raises:
      ValueError: an image without hidden GT, or whose hidden GT has another size.
    """
    img_size = int(doc.get("img_size", 1024))
    low_res = logits_mhw.shape[-1]
    r_mhw = np.zeros(logits_mhw.shape, np.float32)
    iou_m = np.zeros((logits_mhw.shape[0],), np.float32)
    nothing = prob_to_logit(np.zeros(logits_mhw.shape[1:], np.float32))  # p = 0: no object there
    for img in doc["images"]:
        anns = img["annotations"]
        if not anns:
            continue
        size = (int(img["height"]), int(img["width"]))
        entry = hidden.get(img["file_name"])
        if entry is None:
            raise ValueError(f"{where}: image {img['file_name']!r} has no hidden GT")
        if tuple(entry[0]) != size:
            raise ValueError(f"{where}: hidden GT of {img['file_name']!r} is {entry[0]}, the shard says {size}")
        rows = [int(a["logit_index"]) for a in anns]
        gt, _ = hidden_gt_masks(entry, f"hidden GT of {img['file_name']}")
        if len(gt) == 0:
            r_mhw[rows] = nothing
            continue
        iou = mask_iou_matrix(pseudo_label_masks(anns, size), gt)
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(rows)), best]
        lowres = {int(k): prob_to_logit(gt_lowres(gt[k], img_size, low_res)) for k in set(best.tolist())}
        # a pseudo label no GT overlaps has no object there: p = 0
        r_mhw[rows] = np.stack([lowres[int(k)] if v > 0 else nothing for k, v in zip(best, best_iou)])
        iou_m[rows] = best_iou
    return r_mhw, iou_m


def write_oracle_uncertainty(cfg, out_dir: str | os.PathLike) -> Dict[str, int]:
    """The ``oracle-uncertainty`` command: oracle u for every dataset with pseudo labels and hidden
    GT, the stage's maps (``uncertainty.out_dir``) copied for the others; returns masks per oracle
    dataset.

    Raises:
      ValueError: ``out_dir`` is ``uncertainty.out_dir``, or no dataset has hidden GT.
      FileNotFoundError: naming a dataset without hidden GT whose stage maps are missing.
    """
    ucfg = cfg.uncertainty
    if Path(out_dir).resolve() == Path(ucfg.out_dir).resolve():
        raise ValueError(f"--out {out_dir}: would overwrite the stage's uncertainty maps (uncertainty.out_dir)")
    gt_paths = {name: hidden_gt_paths(cfg.data.datasets[name].images, ucfg.hidden_gt) for name in stage_datasets(cfg)}
    if not any(gt_paths.values()):
        raise ValueError(f"data.datasets: no dataset with pseudo labels has hidden GT ({ucfg.hidden_gt}) for oracle uncertainty")
    counts: Dict[str, int] = {}
    for name, paths in gt_paths.items():
        target = Path(out_dir) / name
        partial = target.with_name(f"{name}.partial")  # renamed to ``target`` when every shard is written
        shards = list_shards(cfg.pseudo.out_dir, name)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            if paths:
                counts[name] = _write_oracle_dataset(cfg, name, shards, load_hidden_gt(paths), partial)
                log.info("oracle uncertainty: %s, %d masks, hidden GT from %s", name, counts[name],
                         ", ".join(Path(p).name for p in paths))
            else:
                _copy_stage_maps(ucfg.out_dir, name, shards, partial)
                log.info("oracle uncertainty: %s has no hidden GT, the stage's maps copied", name)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)  # shards of an older pool must not survive beside the new ones
        os.replace(partial, target)
    return counts


def _write_oracle_dataset(cfg, name: str, shards, hidden: Dict[str, tuple], folder: Path) -> int:
    """Oracle u of every shard of dataset ``name`` into ``folder`` (its final name is the caller's);
    returns the number of masks."""
    n = 0
    for shard in shards:
        doc, logits = read_shard(cfg.pseudo.out_dir, name, shard)
        r, iou = oracle_refined(doc, logits, hidden, name)
        u_q, r16, out = shard_from_refined(doc, logits, r, iou, cfg.uncertainty.certainty_threshold)
        out["oracle"] = "hidden_gt"
        write_uncertainty_shard(folder.parent, folder.name, shard, u_q, out, r16 if cfg.uncertainty.store_refined else None)
        n += out["n_masks"]
    return n


def _copy_stage_maps(stage_dir, name: str, shards, folder: Path) -> None:
    """The ``uncertainty`` stage's maps of dataset ``name`` copied into ``folder``.

    Raises:
      FileNotFoundError: naming the first missing map.
    """
    files = [p for shard in shards for p in uncertainty_paths(stage_dir, name, shard)]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: {name} has no hidden GT and no uncertainty map to copy (run `sumseg uncertainty`)")
    for p in files:
        shutil.copy2(p, folder / p.name)
