"""The mask-refinement module (spec §4.1; NOT RELEASED by the authors: built from the paper's
description, with the choices below).

Architecture (paper §3.2.3, App. B.2): a *separate copy* of SAM's prompt encoder and mask decoder,
initialised from the foundation weights and fine-tuned; the image encoder is frozen and not even
run here: the module reads cached image embeddings (shared with SAM's, spec §4.1). Inputs are the
three prompts together, in one forward (App. D: isolated box or point prompts hurt):

1. mask prompt = SAM's low-res logits of the pseudo label (the dense mask input, 256x256);
2. box prompt = the box of that mask;
3. point prompt = the point that produced it (the AMG grid point; for training, the GT point).

Output = the single-output token (index 0, ``multimask_output=False``; spec §4.1 [INFERRED]).

Training pairs (App. D.2, `select_pairs`): for each GT mask of the human-annotated set, SAM is
prompted with one point drawn uniformly from the GT (``points_per_mask`` draws, seeded), the output
with the highest IoU to the GT is taken, and the pair is kept when that IoU >= 0.7 and it passes
SAM's AMG quality filters (predicted IoU >= 0.88, stability score >= 0.95, computed as the AMG does:
IoU of the masks thresholded at ±1 logit, on logits upsampled to the image). Target = the GT mask.

Choices where the paper is silent (spec §4.1 [REC], §13 A6, A10):

- loss: SAM's ``20·focal + 1·Dice + 1·IoU-MSE`` (`sum.model.losses.sam_loss`, u ≡ 0);
- optimiser: AdamW, lr in [1e-5, 1e-4] per A6 (default 1e-4, as A6 allows when tuning a
  pretrained decoder), weight decay 0.1 (A2), constant lr;
- loss resolution: A10 recommends upsampling the 256² logits to 1024² and cropping the padding.
  On the 2-core CPU budget the default computes the loss at ``loss_size=256``, the decoder's own
  resolution (the GT downsampled with antialiasing, the padding cropped), which skips a 16x
  larger upsample per mask; ``loss_size=1024`` is A10 exactly. Validation always scores at the
  original image resolution;
- schedule: A6's 12 epochs x batch 32 is HQSeg-44K on 8 A100s; the embedded default trains for
  ``epochs`` over the few hundred hq_train pairs (`RefineConfig`);
- validation: ``val_fraction`` of the images (seeded) are held out; val pairs are built and
  filtered the same way, and the mIoU of SAM's input mask and of the refined mask against the GT
  is reported (before and after training).

The checkpoint (`save_refiner`) holds the prompt encoder and mask decoder state, the model
architecture config, the `RefineConfig` and the metrics; written atomically.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from sum.config import RefineConfig
from sum.data.skipped import open_dataset
from sum.io import S3Options
from sum.model.checkpoint import load_model
from sum.model.embeddings import EmbeddingSource
from sum.model.predictor import SumPredictor
from sum.tracking import json_metrics, stage_run
from sum.uncertainty.pairs import prepare_images, split_images
from sum.uncertainty.refine_train import evaluate_pairs, train_refiner
from sum.uncertainty.refiner import RefinementModule, save_refiner

log = logging.getLogger(__name__)

# the roles of human-annotated datasets: the pairs' targets are human masks (spec §4.1, App. D.2)
HUMAN_ROLES = ("labeled", "refine")


def fit_refiner(
    model, datasets: Sequence, cfg: RefineConfig, embeddings: Optional[EmbeddingSource] = None
) -> Tuple[RefinementModule, dict]:
    """Pairs, split, training and validation of the refinement module (spec §4.1).

    Arguments:
      model: the foundation SAM (weights loaded).
      datasets: the human-annotated `SegDataset` s (one list of pairs; the val split is drawn
        over all their images).
      cfg: `RefineConfig`.
      embeddings: the `EmbeddingSource` of the images (the ``embed`` cache, else the encoder);
        None encodes every image.
    Returns:
      (trained module, metrics dict).
    """
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images, counts = prepare_images(model, datasets, cfg, embeddings)
    t_pairs = time.perf_counter() - t0
    train_ids, val_ids = split_images([d.image_id for d in images], cfg.val_fraction, cfg.seed)
    train = [d for d in images if d.image_id in set(train_ids)]
    val = [d for d in images if d.image_id in set(val_ids)]
    refiner = RefinementModule.from_sam(model).to(model.device)
    for p in refiner.parameters():
        p.requires_grad_(True)
    pe = refiner.prompt_encoder
    if getattr(pe, "zero_token_no_grad", False) and hasattr(pe, "task_prompt_embedding"):
        pe.task_prompt_embedding[0].weight.requires_grad_(False)  # task id 0 stays SAM (spec §2.2)
    sam_val = evaluate_pairs(refiner, val)  # the untrained copy of SAM (epoch 0)
    t1 = time.perf_counter()
    history, curve = train_refiner(refiner, train, cfg, val)
    t_train = time.perf_counter() - t1
    after = evaluate_pairs(refiner, val)
    n_train = sum(len(d.pairs) for d in train)
    first = history[: max(1, len(history) // 10)]
    last = history[-max(1, len(history) // 10) :]
    best = max(curve, key=lambda c: c["val_miou_refined"]) if curve else {"epoch": len({h["epoch"] for h in history})}
    metrics = {
        "pairs_candidates": counts.get("candidates", 0),
        "pairs_kept": counts.get("kept", 0),
        "pairs_low_iou": counts.get("low_iou", 0),
        "pairs_low_quality": counts.get("low_quality", 0),
        "train_images": len(train),
        "train_pairs": n_train,
        "val_images": len(val),
        "val_pairs": after["n_pairs"],
        "steps": len(history),
        "epochs_run": int(history[-1]["epoch"]),
        "best_epoch": int(best["epoch"]),
        "train_loss_first": float(np.mean([h["loss"] for h in first])),
        "train_loss_last": float(np.mean([h["loss"] for h in last])),
        "val_miou_sam": after["miou_sam"],
        "val_miou_refined_init": sam_val["miou_refined"],
        "val_miou_refined": after["miou_refined"],
        "val_improved_fraction": after["improved_fraction"],
        # the choice of the epoch (and, across runs, of lr) on val: SAM's masks vs refined
        "val_miou_refined_by_epoch": {str(c["epoch"]): c["val_miou_refined"] for c in curve},
        "seconds_pairs": round(t_pairs, 2),
        "seconds_train": round(t_train, 2),
    }
    log.info(
        "refine: %d train pairs, %d steps in %.0f s; val mIoU SAM %.4f -> refined %.4f (untrained %.4f, best epoch %d)",
        n_train, len(history), t_train, metrics["val_miou_sam"], metrics["val_miou_refined"],
        metrics["val_miou_refined_init"], metrics["best_epoch"],
    )
    return refiner, metrics


def run_refine(cfg) -> dict:
    """The ``refine`` stage: train the refinement module on ``cfg.refine.datasets`` with the
    foundation model of ``cfg.model`` and save it to ``cfg.refine.out``.

    Raises:
      ValueError: naming ``refine.datasets`` when it is empty or names a dataset that is not
        configured or not human-annotated (role labeled or refine).
    """
    rcfg = cfg.refine
    if not rcfg.datasets:
        raise ValueError("refine.datasets is empty: name the human-annotated datasets the refinement module trains on")
    for name in rcfg.datasets:
        if name not in cfg.data.datasets:
            raise ValueError(f"refine.datasets: {name!r} is not in data.datasets ({sorted(cfg.data.datasets)})")
        if cfg.data.datasets[name].role not in HUMAN_ROLES:
            raise ValueError(
                f"refine.datasets: {name!r} has role {cfg.data.datasets[name].role!r}, expected one of {list(HUMAN_ROLES)}"
            )
    torch.manual_seed(0)
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    for p in model.parameters():
        p.requires_grad_(False)
    datasets = [open_dataset(cfg.data, name) for name in rcfg.datasets]
    embed_dir = getattr(getattr(cfg, "embed", None), "out_dir", None)
    embeddings = EmbeddingSource(embed_dir, SumPredictor(model))
    with stage_run(cfg.tracking, "refine", params={"refine": rcfg}) as tracker:
        refiner, metrics = fit_refiner(model, datasets, rcfg, embeddings)
        save_refiner(refiner, rcfg.out, cfg.model, rcfg, metrics)
        tracker.log_metrics(json_metrics(metrics), step=0)
    return metrics
