"""The oracle pool: pseudo-label shards made of the hidden ground truth, an upper-bound ablation.

SUM can only keep what its unlabeled pool's pseudo labels describe (spec §3.3; App. I.1: the
SA-1B pool is about half part masks). To tell "the pool misses a granularity" apart from "the
recipe or the budget cannot anchor it", fine-tune once on an oracle pool: the same images, whose
"pseudo labels" are every hidden GT mask the embedded world keeps for scoring (all granularities,
``uncertainty.hidden_gt``), exact at the original resolution. Unlabeled datasets without hidden
GT (the photos) keep their real pseudo labels, so the pool's images stay the same.

The oracle shards have the layout of `sum.pseudo.store` (records of the generator's fields, with
``predicted_iou`` and ``stability_score`` 1) and zero low-res logits: they carry no SAM logits
and therefore no uncertainty maps. Train on them with the uncertainty-aware loss and sampling
off (``method.use_uncertainty_loss=false method.use_uncertainty_sampling=false``), e.g.::

    sumseg oracle-pool --out data/pseudo_oracle
    sumseg finetune --method sum train.pseudo_dir=data/pseudo_oracle train.model_dir=models/oracle \\
        method.use_uncertainty_loss=false method.use_uncertainty_sampling=false

Two more modes take the real pool's pseudo labels as the starting point, to tell which half of
the oracle's gain is which (``--oracle``):

- ``matched``: the real pseudo labels (SAM's masks and logits) that match some hidden GT mask
  (IoU >= ``uncertainty.min_match_iou``); the unmatched ones are dropped. Asks: does the pool's
  noise cost anything?
- ``add-parts``: every real pseudo label, plus each hidden GT *part* that none of them matches and
  that covers at least ``min_area`` of the image. Asks: do the missing parts cost anything, and
  which sizes of them?

Mask ids change when labels are dropped or added, so the uncertainty maps of ``pseudo.out_dir`` no
longer line up: train these with the uncertainty-aware loss and sampling off as well.

This is a diagnostic. The hidden GT is never used by the pipeline's own stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from sum.data.coco import mask_to_annotation
from sum.data.hidden_gt import hidden_gt_masks, hidden_gt_paths, load_hidden_gt
from sum.pseudo.coverage import coverage_records, pseudo_label_masks
from sum.pseudo.store import RECORD_FIELDS, ShardImage, iter_pseudo_labels, list_shards, read_shard_json, shard_paths, write_shard

log = logging.getLogger(__name__)

MODES = ("gt", "matched", "add-parts")


def oracle_records(masks_nhw: np.ndarray, logits_hw: tuple[int, int] = (256, 256)) -> list[dict]:
    """Generator records (`sum.pseudo.store.RECORD_FIELDS`) for exact masks: COCO RLE, area, the
    XYWH box of the mask's pixels, IoU and stability 1, the whole image as crop box, zero logits."""
    out = []
    h, w = masks_nhw.shape[1:] if masks_nhw.ndim == 3 else (0, 0)
    for m in masks_nhw:
        ann = mask_to_annotation(m, 0, 0)
        ys, xs = np.nonzero(m)
        out.append(
            {
                "segmentation": ann["segmentation"],
                "area": int(ann["area"]),
                "bbox": ann["bbox"],
                "predicted_iou": 1.0,
                "point_coords": [[float(xs.mean()), float(ys.mean())]],
                "stability_score": 1.0,
                "crop_box": [0, 0, int(w), int(h)],
                "low_res_logits": np.zeros(logits_hw, np.float16),
            }
        )
    return out


def mixed_records(
    anns: Sequence[dict],
    logits_mhw: np.ndarray,
    gt_nhw: np.ndarray,
    granularity: Sequence[str],
    mode: str,
    min_match_iou: float,
    min_area: float = 0.0,
) -> List[dict]:
    """One image's records for the ``matched`` or ``add-parts`` mode (module docstring).

    Arguments:
      anns, logits_mhw: the image's real pseudo labels (shard annotations) and their low-res logits.
      gt_nhw: (N, H, W) bool hidden GT masks; ``granularity``: the granularity of each.
      min_match_iou: a pseudo label matches a GT mask (and a GT mask is covered) at this IoU.
      min_area: ``add-parts`` adds only missing parts of at least this fraction of the image.
    Returns:
      generator records: the kept real ones in shard order (their own logits), then the added GT
      parts in file order (`oracle_records`).
    """
    if mode not in ("matched", "add-parts"):
        raise ValueError(f"mode={mode!r}: expected 'matched' or 'add-parts'")
    h, w = gt_nhw.shape[1:]
    pseudo_mhw = pseudo_label_masks(anns, (h, w))
    if pseudo_mhw.shape[1:] != (h, w):
        raise ValueError(f"pseudo labels are {pseudo_mhw.shape[1:]}, the hidden GT {(h, w)}")
    gts, labels = coverage_records(pseudo_mhw, gt_nhw, granularity)
    out = [
        {**{k: a[k] for k in RECORD_FIELDS}, "low_res_logits": logits_mhw[i]}
        for i, a in enumerate(anns)
        if mode == "add-parts" or labels[i]["iou"] >= min_match_iou
    ]
    if mode == "add-parts":
        missing = [
            j for j, g in enumerate(gts)
            if g["granularity"] == "part" and g["best_iou"] < min_match_iou and g["area_fraction"] >= min_area
        ]
        out += oracle_records(gt_nhw[missing], tuple(logits_mhw.shape[1:])) if missing else []
    return out


def write_oracle_dataset(
    hidden_gt_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    dataset: str,
    shard_size: int,
    mode: str = "gt",
    pseudo_dir: str | os.PathLike | None = None,
    min_match_iou: float = 0.5,
    min_area: float = 0.0,
) -> int:
    """Write ``<out_dir>/<dataset>/shard-*`` and return the number of masks written.

    ``gt``: from the hidden GT files alone (every granularity, one record per non-empty mask; image
    ids as those files give them, which are the dataset's), images in file-name order.
    ``matched`` / ``add-parts``: the real shards of ``pseudo_dir`` changed by `mixed_records`, images
    in the real shards' order.

    Raises:
      ValueError: naming a hidden-GT file that is not readable COCO (`load_hidden_gt`), an unknown
        mode, or an image of the real shards without hidden GT.
      FileNotFoundError: the real shards, for the modes that start from them.
    """
    if mode not in MODES:
        raise ValueError(f"oracle mode {mode!r}: expected one of {', '.join(MODES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: expected at least 1 image per shard")
    hidden = load_hidden_gt(hidden_gt_paths)
    digest = hashlib.sha256()
    image_ids: Dict[str, str] = {}  # file name -> image id (the world writes the dataset's ids)
    for p in sorted(str(p) for p in hidden_gt_paths):
        raw = Path(p).read_bytes()
        digest.update(raw)
        for img in json.loads(raw).get("images", []):
            image_ids.setdefault(img["file_name"], str(img["id"]))
    if mode == "gt":
        sources = [(image_ids[name], name, None, None) for name in sorted(hidden)]
    else:
        if pseudo_dir is None or not list_shards(pseudo_dir, dataset):
            raise FileNotFoundError(f"{Path(pseudo_dir or '.') / dataset}: no pseudo-label shards for oracle mode {mode!r}")
        for shard in list_shards(pseudo_dir, dataset):
            digest.update(read_shard_json(pseudo_dir, dataset, shard)["config_hash"].encode())
        digest.update(f"{min_match_iou}:{min_area}".encode())
        sources = [(rec["image_id"], rec["file_name"], anns, logits) for rec, anns, logits in iter_pseudo_labels(pseudo_dir, dataset)]
    no_gt = [name for _, name, _, _ in sources if name not in hidden]
    if no_gt:
        raise ValueError(f"{Path(pseudo_dir or '.') / dataset}: {len(no_gt)} images have pseudo labels but no hidden GT, e.g. {no_gt[0]}")
    config_hash = ("oracle:" if mode == "gt" else f"oracle-{mode}:") + digest.hexdigest()
    target = Path(out_dir) / dataset
    if target.exists():
        shutil.rmtree(target)
    n_masks = 0
    for shard, start in enumerate(range(0, len(sources), shard_size)):
        images = []
        for position in range(start, min(start + shard_size, len(sources))):
            image_id, name, anns, logits = sources[position]
            (h, w), _ = hidden[name]
            masks, granularity = hidden_gt_masks(hidden[name], f"hidden GT of {name}")
            if mode == "gt":
                records = oracle_records(masks)
            else:
                records = mixed_records(anns, logits, masks, granularity, mode, min_match_iou, min_area)
            n_masks += len(records)
            images.append(ShardImage(image_id, name, h, w, position, records))
        write_shard(out_dir, dataset, shard, config_hash, images)
    return n_masks


def write_oracle_pool(cfg, out_dir: str | os.PathLike, mode: str = "gt", min_area: float = 0.0) -> Dict[str, int]:
    """The ``oracle-pool`` command: an oracle dataset (``mode``, module docstring) for every
    unlabeled dataset with hidden GT, the real shards (from ``pseudo.out_dir``) copied for the
    others; return masks per oracle dataset.

    Raises:
      ValueError: when no unlabeled dataset has hidden GT, ``out_dir`` is ``pseudo.out_dir``, or
        ``mode`` or ``min_area`` is not one this module knows.
      FileNotFoundError: naming a dataset without hidden GT that has no pseudo labels either.
    """
    if mode not in MODES:
        raise ValueError(f"--oracle {mode}: expected one of {', '.join(MODES)}")
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"--min-area {min_area}: expected a fraction of the image in [0, 1)")
    if Path(out_dir).resolve() == Path(cfg.pseudo.out_dir).resolve():
        raise ValueError(f"--out {out_dir}: would overwrite the real pseudo labels (pseudo.out_dir)")
    counts: Dict[str, int] = {}
    unlabeled = {n: d for n, d in cfg.data.datasets.items() if d.role == "unlabeled"}
    for name, d in unlabeled.items():
        paths = hidden_gt_paths(d.images, cfg.uncertainty.hidden_gt)
        if paths:
            counts[name] = write_oracle_dataset(
                paths, out_dir, name, cfg.pseudo.shard_size, mode, cfg.pseudo.out_dir, cfg.uncertainty.min_match_iou, min_area
            )
            log.info("oracle pool (%s): %s, %d masks, hidden GT from %s", mode, name, counts[name], ", ".join(Path(p).name for p in paths))
            continue
        if not list_shards(cfg.pseudo.out_dir, name):
            raise FileNotFoundError(f"{Path(cfg.pseudo.out_dir) / name}: {name} has no hidden GT and no pseudo labels to copy")
        target = Path(out_dir) / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for shard in list_shards(cfg.pseudo.out_dir, name):
            for p in shard_paths(cfg.pseudo.out_dir, name, shard):
                shutil.copy2(p, target / p.name)
        log.info("oracle pool: %s has no hidden GT, its pseudo labels copied", name)
    if not counts:
        raise ValueError(f"data.datasets: no unlabeled dataset has hidden GT ({cfg.uncertainty.hidden_gt}) for an oracle pool")
    return counts
