"""A training run's pieces built from the config: the model as it trains, the data pools, the
forward's precision and the MLflow tracker. `sum.train.trainer.finetune` calls these once, before
its loop.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Dict, Optional

import torch
from torch import nn

from sum.data.skipped import open_dataset
from sum.io import S3Options
from sum.model.checkpoint import load_model
from sum.model.fast import cpu_has_native_bf16
from sum.pseudo.dataset import PseudoLabelDataset
from sum.tracking import NullTracker, flatten, start_run
from sum.train.data import LABELED, UNLABELED, Pool
from sum.train.distributed import DistInfo
from sum.train.optim import set_trainable


def build_train_model(cfg, info: DistInfo) -> nn.Module:
    """The foundation model on this rank's device, with what trains in ``cfg.train.mode`` trainable
    (spec §8.1), and the encoder fast path in full mode on CUDA."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank even without a checkpoint
    fast_path = cfg.model.fast_path if info.device.type == "cuda" and t.mode == "full" else "off"
    s3 = S3Options.from_config(cfg.storage.s3)
    sam = load_model(cfg.model, s3=s3, device=str(info.device), fast_path=fast_path)
    set_trainable(sam, t.mode)
    set_train_modes(sam, t.mode)
    return sam


def set_train_modes(sam: nn.Module, mode: str) -> None:
    """Train mode for what trains. The encoder stays in eval mode when frozen; in full mode it
    trains but its BatchNorms (TinyViT) keep their statistics: one image per GPU gives no useful
    batch statistics (SAM's ViT has none; no dropout anywhere, spec §8.1)."""
    sam.train()
    if mode == "decoder":
        sam.image_encoder.eval()
        return
    for m in sam.image_encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def build_pools(cfg, method) -> Dict[str, Pool]:
    """Labeled datasets (role ``labeled``, their task ids) and, when the method uses them, the
    pseudo labels of the unlabeled ones (role ``unlabeled``; u only when the method uses it)."""
    t = cfg.train
    labeled = [(n, open_dataset(cfg.data, n)) for n, d in cfg.data.datasets.items() if d.role == "labeled"]
    unlabeled = []
    if method.use_unlabeled:
        for name, d in cfg.data.datasets.items():
            if d.role != "unlabeled":
                continue
            unlabeled.append(
                (
                    name,
                    PseudoLabelDataset(
                        d.images,
                        t.pseudo_dir,
                        name,
                        task="unspecified",
                        uncertainty_dir=t.uncertainty_dir if method.uses_uncertainty else None,
                        min_ratio=t.pseudo_min_ratio,
                        max_ratio=t.pseudo_max_ratio,
                        max_masks=t.max_masks,
                        seed=t.seed,
                    ),
                )
            )
    if not labeled:
        raise ValueError("data.datasets: no dataset with role 'labeled' to fine-tune on")
    return {LABELED: Pool(LABELED, labeled), UNLABELED: Pool(UNLABELED, unlabeled)}


def forward_autocast(precision: str, device: torch.device, mode: str):
    """The forward's autocast context (spec A2: bf16; losses stay fp32, see
    `sum.train.rounds.to_loss_frame`).

    ``auto``: bf16 on CUDA, and on a CPU with native bf16 (avx512_bf16 / AMX) in ``decoder``
    mode, where the decoder's matmuls run faster than in fp32; fp32 elsewhere.
    ``bf16`` / ``fp32`` force it.

    Raises:
      ValueError: naming ``train.precision`` for another value.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision: {precision!r} is not one of auto, bf16, fp32")
    bf16 = precision == "bf16" or (
        precision == "auto" and (device.type == "cuda" or (mode == "decoder" and cpu_has_native_bf16()))
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def start_tracking(cfg, method, info: DistInfo, run_id: Optional[str]):
    """The run's MLflow tracker (rank 0; a `NullTracker` elsewhere or when tracking is off),
    resuming ``run_id`` when given, with the flattened config and method logged as params."""
    tracker = NullTracker() if not cfg.tracking.enabled else start_run(
        experiment=cfg.tracking.experiment,
        run_name=f"finetune-{method.name}",
        rank=info.rank,
        uri=cfg.tracking.uri,
        resume_run_id=run_id,
        tags={"stage": "finetune", "method": method.name, "world_size": info.world_size},
        system_metrics=cfg.tracking.system_metrics,
    )
    tracker.log_params({**flatten(cfg), **flatten(dataclasses.asdict(method), "method.")})
    return tracker
