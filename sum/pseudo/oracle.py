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

    sum oracle-pool --out data/pseudo_oracle
    sum finetune --method sum train.pseudo_dir=data/pseudo_oracle train.model_dir=models/oracle \\
        method.use_uncertainty_loss=false method.use_uncertainty_sampling=false

This is a diagnostic. The hidden GT is never used by the pipeline's own stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from sum.pseudo.store import ShardImage, list_shards, shard_paths, write_shard

log = logging.getLogger(__name__)


def oracle_records(masks_nhw: np.ndarray, logits_hw: tuple[int, int] = (256, 256)) -> list[dict]:
    """Generator records (`sum.pseudo.store.RECORD_FIELDS`) for exact masks: COCO RLE, area, the
    XYWH box of the mask's pixels, IoU and stability 1, the whole image as crop box, zero logits."""
    from sum.data.coco import mask_to_annotation

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


def write_oracle_dataset(
    hidden_gt_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, dataset: str, shard_size: int
) -> int:
    """Write ``<out_dir>/<dataset>/shard-*`` from the hidden GT files (every granularity, one
    record per non-empty mask; image ids as those files give them, which are the dataset's),
    images in file-name order; return the number of masks.

    Raises:
      ValueError: naming a hidden-GT file that is not readable COCO (`load_hidden_gt`).
    """
    from sum.uncertainty.report import hidden_gt_masks, load_hidden_gt

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
    config_hash = "oracle:" + digest.hexdigest()
    target = Path(out_dir) / dataset
    if target.exists():
        shutil.rmtree(target)
    names = sorted(hidden)
    n_masks = 0
    for shard, start in enumerate(range(0, len(names), shard_size)):
        images = []
        for position in range(start, min(start + shard_size, len(names))):
            name = names[position]
            (h, w), _ = hidden[name]
            masks, _ = hidden_gt_masks(hidden[name], f"hidden GT of {name}")
            records = oracle_records(masks)
            n_masks += len(records)
            images.append(ShardImage(image_ids[name], name, h, w, position, records))
        write_shard(out_dir, dataset, shard, config_hash, images)
    return n_masks


def write_oracle_pool(cfg, out_dir: str | os.PathLike) -> Dict[str, int]:
    """The ``oracle-pool`` command: an oracle dataset for every unlabeled dataset with hidden GT,
    the real shards (from ``pseudo.out_dir``) copied for the others; return masks per oracle
    dataset.

    Raises:
      ValueError: when no unlabeled dataset has hidden GT, or ``out_dir`` is ``pseudo.out_dir``.
      FileNotFoundError: naming a dataset without hidden GT that has no pseudo labels either.
    """
    from sum.uncertainty.report import hidden_gt_paths

    if Path(out_dir).resolve() == Path(cfg.pseudo.out_dir).resolve():
        raise ValueError(f"--out {out_dir}: would overwrite the real pseudo labels (pseudo.out_dir)")
    counts: Dict[str, int] = {}
    unlabeled = {n: d for n, d in cfg.data.datasets.items() if d.role == "unlabeled"}
    for name, d in unlabeled.items():
        paths = hidden_gt_paths(d.images, cfg.uncertainty.hidden_gt)
        if paths:
            counts[name] = write_oracle_dataset(paths, out_dir, name, cfg.pseudo.shard_size)
            log.info("oracle pool: %s, %d hidden GT masks from %s", name, counts[name], ", ".join(Path(p).name for p in paths))
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
