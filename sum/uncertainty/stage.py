"""The ``uncertainty`` stage (spec §4.2): the refinement module over every pseudo-label shard of
the chosen datasets, u (and r) written beside each shard (`sum.uncertainty.maps`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from sum.config import UncertaintyConfig
from sum.data.dataset import build_dataset, select_datasets
from sum.io import S3Options
from sum.model.checkpoint import load_model
from sum.model.embeddings import EmbeddingSource
from sum.model.predictor import SumPredictor
from sum.pseudo.store import list_shards, read_shard
from sum.tracking import json_metrics, stage_run
from sum.uncertainty.maps import uncertainty_shard, write_uncertainty_shard
from sum.uncertainty.refiner import load_refiner

log = logging.getLogger(__name__)


def pseudo_datasets(pseudo_dir: str | os.PathLike) -> List[str]:
    """Datasets with at least one complete pseudo-label shard under ``pseudo_dir``."""
    root = Path(pseudo_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and list_shards(root, p.name))


def stage_datasets(cfg) -> List[str]:
    """The datasets of the ``uncertainty`` stages: ``cfg.uncertainty.datasets``, or (empty) all
    that have pseudo-label shards under ``cfg.pseudo.out_dir``.

    Raises:
      ValueError: naming unknown dataset names.
    """
    names = list(cfg.uncertainty.datasets) or pseudo_datasets(cfg.pseudo.out_dir)
    return select_datasets(cfg.data.datasets, names, "uncertainty.datasets") if names else []


def compute_uncertainty(
    refiner,
    model,
    datasets: Dict[str, object],
    pseudo_dir: str | os.PathLike,
    cfg: UncertaintyConfig,
    embed_dir: Optional[str | os.PathLike] = None,
) -> Dict[str, dict]:
    """Write u (and r) for every pseudo-label shard of each dataset (spec §4.2).

    Arguments:
      refiner: the trained `RefinementModule`.
      model: the foundation SAM (its encoder makes the embeddings the cache lacks, `EmbeddingSource`).
      datasets: name -> `SegDataset` of the images the pseudo labels were made on.
      pseudo_dir: the pseudo-label folder.
      cfg: `UncertaintyConfig`.
      embed_dir: the ``embed`` stage's cache, or None.
    Returns:
      name -> {"shards", "masks", "mean_u", "uncertain_fraction_box"}.
    """
    summary = {}
    embeddings = EmbeddingSource(embed_dir, SumPredictor(model), datasets=datasets)
    for name in datasets:
        embedding_of = functools.partial(embeddings.load, name)
        shards = list_shards(pseudo_dir, name)
        if not shards:
            raise FileNotFoundError(f"{Path(pseudo_dir) / name}: no pseudo-label shards (run `sumseg pseudolabel`)")
        mean_u, frac = [], []
        for shard in shards:
            doc, logits = read_shard(pseudo_dir, name, shard)
            u_q, r, out = uncertainty_shard(refiner, embedding_of, doc, logits, cfg.batch_size, cfg.certainty_threshold)
            write_uncertainty_shard(cfg.out_dir, name, shard, u_q, out, r if cfg.store_refined else None)
            for img in out["images"]:
                mean_u += [m["mean_u_box"] for m in img["masks"]]
                frac += [m["uncertain_fraction_box"] for m in img["masks"]]
            log.info("uncertainty %s shard %d: %d masks", name, shard, out["n_masks"])
        summary[name] = {
            "shards": len(shards),
            "masks": len(mean_u),
            "mean_u_box": float(np.mean(mean_u)) if mean_u else 0.0,
            "uncertain_fraction_box": float(np.mean(frac)) if frac else 0.0,
        }
    return summary


def run_uncertainty(cfg) -> Dict[str, dict]:
    """The ``uncertainty`` stage: the refinement module of ``cfg.refine.out`` over the pseudo labels
    of ``cfg.pseudo.out_dir`` (datasets ``cfg.uncertainty.datasets``, empty = all that have shards).

    Raises:
      ValueError: naming unknown dataset names.
    """
    ucfg = cfg.uncertainty
    pseudo_dir = cfg.pseudo.out_dir
    names = stage_datasets(cfg)
    torch.manual_seed(0)  # a randomly initialised model (no checkpoint) is the embed stage's
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    refiner, _ = load_refiner(cfg.refine.out, device=model.device)
    datasets = {n: build_dataset(cfg.data.datasets[n], n) for n in names}
    embed_dir = getattr(getattr(cfg, "embed", None), "out_dir", None)
    with stage_run(cfg.tracking, "uncertainty", params={"uncertainty": ucfg}) as tracker:
        stats = compute_uncertainty(refiner, model, datasets, pseudo_dir, ucfg, embed_dir)
        tracker.log_metrics(json_metrics(stats), step=0)
    return stats
