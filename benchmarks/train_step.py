"""Training step: the step ``finetune`` runs (`sum.train.trainer.setup_run`'s `TrainStep`, then
the optimizer step) against a plain fp32 loop, on the same model, batches and prompts.

- **ours**: built by `setup_run` from ``params.yaml`` (method, rounds, loss options, precision
  ``train.precision``, the encoder fast path in full mode on CUDA) with the suite's model, batch
  and sizes, tracking off: the rank's batch, cached embeddings (decoder mode, the CPU default)
  or the batched encoder (full mode, on CUDA), the interactive rounds of an image in one decoder
  call per round, backward after every round, the forward under the trainer's autocast.
- **reference** (`reference_loss`): per image, per round, per prompt kind (box, point) one
  ``prompt_encoder`` + SAM ``mask_decoder`` forward, the same loss (`sum.model.losses`, on the
  un-padded loss frame), summed over the batch and back-propagated once; fp32, the official
  attention. Its batches, prompt sampling and generators are `TrainStep.batch`'s, so both compute
  the same step: the check compares the losses and gradients of step 0 from the same weights.

Data: a small procedural world (`sum.data.synthetic.generate_set`): a labeled salient set and an
entity set read as pseudo labels with a synthetic u (`AsPseudo`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import REPO, Result, median, model_config, timed, weights_of
from sum.config import WorldSetConfig, load_params
from sum.data.dataset import CocoDataset
from sum.data.prompts import sample_first_points
from sum.data.sample import Sample
from sum.data.synthetic import generate_set
from sum.model.fast import OFF, apply_fast_path, enable_fast_path, fast_path_of
from sum.model.losses import combined_loss
from sum.model.predictor import SumPredictor
from sum.train.build import set_train_modes
from sum.train.data import LABELED, UNLABELED, Pool, cached_features, global_batch
from sum.train.rounds import to_input_frame, to_loss_frame
from sum.train.sampling import PROMPT_ERROR_POINT, add_jitter_to_boxes, sample_error_clicks, sample_first_prompt_is_box
from sum.train.trainer import TrainStep, setup_run

FP32_TOL = {"loss_rel": 1e-4, "grad_cos": 0.9999}
BF16_TOL = {"loss_rel": 0.05, "grad_cos": 0.95}


@dataclass(frozen=True)
class TrainSizes:
    batch: int
    max_masks: int
    loss_size: int  # 0 = the model's input size (spec A10)
    steps: int
    warmup: int
    world_images: int
    world_size: int  # px of the procedural world's images


@dataclass
class AsPseudo:
    """A COCO set read as pseudo labels: task 0 and a synthetic u (0.5 on a band around each
    mask's border, 0 elsewhere), so that the uncertainty-aware paths do their real work."""

    ds: CocoDataset

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        s = self.ds[i]
        kernel = np.ones((9, 9), np.uint8)
        u = np.stack([
            (cv2.dilate(m.astype(np.uint8), kernel) - cv2.erode(m.astype(np.uint8), kernel)).astype(np.float32) * 0.5
            for m in s.masks
        ]) if len(s.masks) else np.zeros(s.masks.shape, np.float32)
        return Sample(s.image_id, s.image, s.masks, s.boxes, s.ann_ids, 0, s.path, u)


def world_pools(root: Path, n_images: int, size: int) -> Dict[str, Pool]:
    hq = generate_set(root, "hq_train", WorldSetConfig(task="salient", role="labeled", n_images=n_images, seed=1), size, workers=1)
    ent = generate_set(root, "unlabeled", WorldSetConfig(task="entity", role="labeled", n_images=n_images, seed=2), size, workers=1)
    lab = CocoDataset(hq / "images", hq / "annotations.json", name="hq_train")
    unl = CocoDataset(ent / "images", ent / "annotations.json", task="unspecified", name="unlabeled")
    return {LABELED: Pool(LABELED, [("hq_train", lab)]), UNLABELED: Pool(UNLABELED, [("unlabeled", AsPseudo(unl))])}


class Embeddings:
    """Decoder mode: the embeddings of the steps' images, computed up front."""

    def __init__(self):
        self.store = {}

    def load(self, dataset, image_id):
        return self.store[(dataset, image_id)]


def precompute_embeddings(step_fn: TrainStep, steps: int, mode: str) -> Embeddings:
    """The image embeddings of the first ``steps`` global batches, with the encoder fast path."""
    sam, pools = step_fn.sam, step_fn.pools
    embeddings = Embeddings()
    enable_fast_path(sam, "auto", device=step_fn.info.device)
    predictor = SumPredictor(sam)
    for step in range(steps):
        for s in global_batch(step, step_fn.batch_size, step_fn.n_labeled, step_fn.sizes, step_fn.seed):
            dname, ds, i = pools[s.kind].locate(s.index)
            sample = ds[i]
            if (dname, sample.image_id) not in embeddings.store:
                predictor.set_image(sample.image)
                embeddings.store[(dname, sample.image_id)] = predictor.get_embedding()
    enable_fast_path(sam, "off", device=step_fn.info.device)
    set_train_modes(sam, mode)
    return embeddings


def reference_loss(sam, batch, features, schedule, opts):
    """Per image, per round, per prompt kind: one SAM prompt-encoder + decoder forward; the
    trainer's loss on the un-padded loss frame; summed over images and rounds (module docstring)."""
    total = 0.0
    for i, (item, g) in enumerate(batch):
        if item.n_masks == 0:
            continue
        emb = features[i : i + 1]
        c = item.certainty_k1hw if item.is_pseudo else None
        c_loss = c if opts.use_uncertainty_loss else None
        c_click = c if opts.use_uncertainty_sampling else None
        is_box = sample_first_prompt_is_box(item.n_masks, generator=g, box_probability=opts.box_probability)
        order = torch.cat([is_box.nonzero()[:, 0], (~is_box).nonzero()[:, 0]])
        kb = int(is_box.sum())
        target = item.masks_k1hw[order].float()
        valid_hw = tuple(target.shape[-2:])
        c_loss = None if c_loss is None else c_loss[order]
        c_click = None if c_click is None else c_click[order]
        groups = []  # per prompt kind: dict(rows, boxes, points)
        if kb:
            boxes = add_jitter_to_boxes(item.boxes_k4[order[:kb]], item.input_hw, generator=g, mode=opts.jitter)
            groups.append({"rows": slice(0, kb), "boxes": boxes, "points": None})
        if kb < item.n_masks:
            first = sample_first_points(item.masks_k1hw[order[kb:]], None if c_click is None else c_click[kb:], generator=g)
            groups.append({"rows": slice(kb, None), "boxes": None, "points": (to_input_frame(first.coords, item.frame_scale), first.labels)})
        mask_input = pred = None
        for spec in schedule:
            if spec.new_prompt == PROMPT_ERROR_POINT:
                click = sample_error_clicks(pred, target, c_click, generator=g)
                xy = to_input_frame(click.coords, item.frame_scale)
                for grp in groups:
                    r, old = grp["rows"], grp["points"]
                    grp["points"] = (xy[r], click.labels[r]) if old is None else (
                        torch.cat([old[0], xy[r]], 1), torch.cat([old[1], click.labels[r]], 1))
            task = item.task_id if spec.task_prompt_on else 0
            lows, ious = [], []
            for grp in groups:
                masks = None if (mask_input is None or not spec.mask_input) else mask_input[grp["rows"]]
                sparse, dense = sam.prompt_encoder(points=grp["points"], boxes=grp["boxes"], masks=masks, task_prompt=task)
                low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=spec.multimask)
                lows.append(low)
                ious.append(iou)
            low, iou = torch.cat(lows), torch.cat(ious)
            logits = to_loss_frame(low, opts.loss_size, valid_hw)
            total = total + combined_loss(logits, iou, target, c_loss, threshold=opts.dice_threshold)["loss"]
            best = iou.detach().argmax(1)
            k = torch.arange(low.shape[0])
            mask_input = low.detach()[k, best][:, None]
            pred = logits.detach()[k, best][:, None] > 0
    return total


def reference_step(step_fn: TrainStep, step: int) -> torch.Tensor:
    """The reference loop's step up to the optimizer update, on `TrainStep.batch`'s batch; the
    summed loss (detached)."""
    sam, device = step_fn.sam, step_fn.info.device
    batch = step_fn.batch(step)
    if step_fn.mode == "decoder":
        features = cached_features(step_fn.embeddings, batch, device)
    else:
        features = sam.image_encoder(torch.cat([sam.preprocess(it.image_3hw[None].to(device, torch.float32)) for it, _ in batch]))
    step_fn.optimizer.zero_grad(set_to_none=True)
    loss = reference_loss(sam, batch, features, step_fn.schedule, step_fn.opts)
    (loss / step_fn.batch_size).backward()
    return loss.detach()


def grads(params: List[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in params])


def train_config(name: str, device: str, mode: str, sizes: TrainSizes, run_dir: Path):
    """``params.yaml`` with the suite's model, device, mode and sizes; tracking off."""
    cfg = load_params(REPO / "params.yaml")
    path = weights_of(name)
    model = dataclasses.replace(model_config(name), checkpoint=None if path is None else str(path), checkpoint_sha256=None, device=device)
    train = dataclasses.replace(cfg.train, mode=mode, batch_size=sizes.batch, max_masks=sizes.max_masks, loss_size=sizes.loss_size,
                                iterations=sizes.warmup + sizes.steps, run_dir=str(run_dir / "runs"), checkpoint_every=10**9)
    return dataclasses.replace(cfg, model=model, train=train, tracking=dataclasses.replace(cfg.tracking, enabled=False)), path


def equal_step(step_fn: TrainStep, plan) -> Dict:
    """Losses and gradients of step 0 from the same weights: ours (as timed) vs the reference."""
    out = step_fn(0)
    ours_loss, ours_g = float(out["loss_sum"]), grads(step_fn.trainable)
    apply_fast_path(step_fn.sam, OFF)
    ref_loss, ref_g = float(reference_step(step_fn, 0)), grads(step_fn.trainable)
    apply_fast_path(step_fn.sam, plan)
    step_fn.optimizer.zero_grad(set_to_none=True)
    return {"loss_ours": ours_loss, "loss_reference": ref_loss,
            "loss_rel": abs(ours_loss - ref_loss) / max(abs(ref_loss), 1e-12),
            "grad_cos": float(F.cosine_similarity(ours_g, ref_g, dim=0)),
            "grad_rel": float((ours_g - ref_g).norm() / ref_g.norm().clamp(min=1e-30))}


def run(name: str, device: str, sizes: TrainSizes) -> Result:
    """The trainer's step vs the reference loop (module docstring); full mode on CUDA."""
    mode = "full" if device.startswith("cuda") else "decoder"
    with tempfile.TemporaryDirectory(prefix="sum-bench-train-") as tmp:
        cfg, path = train_config(name, device, mode, sizes, Path(tmp))
        pools = world_pools(Path(tmp) / "world", sizes.world_images, sizes.world_size)
        embeddings = Embeddings()
        run_ = setup_run(cfg, None, pools, embeddings)
        step_fn, opt, sam = run_.train_step, run_.optimizer, run_.sam
        plan = fast_path_of(sam)
        if mode == "decoder":
            embeddings.store = precompute_embeddings(step_fn, sizes.warmup + sizes.steps, mode).store
        bf16 = isinstance(step_fn.autocast, torch.autocast) and step_fn.autocast.fast_dtype == torch.bfloat16
        check = equal_step(step_fn, plan)
        tol = BF16_TOL if bf16 else FP32_TOL
        check.update(ok=check["loss_rel"] <= tol["loss_rel"] and check["grad_cos"] >= tol["grad_cos"], tolerance=tol,
                     summary=f"step 0: loss rel. diff {check['loss_rel']:.1e}, grad cosine {check['grad_cos']:.6f}")
        times: Dict[str, List[float]] = {"ours": [], "reference": []}
        peak: Dict[str, float] = {}
        variants = {"ours": (plan, lambda s: step_fn(s)), "reference": (OFF, lambda s: reference_step(step_fn, s))}
        for step in range(sizes.warmup + sizes.steps):
            for key, (p, fn) in variants.items():
                apply_fast_path(sam, p)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                _, dt = timed(lambda: (fn(step), opt.step()), device)
                if device.startswith("cuda"):
                    peak[key] = max(peak.get(key, 0.0), round(torch.cuda.max_memory_allocated() / 2**30, 2))
                if step >= sizes.warmup:
                    times[key].append(dt)
        apply_fast_path(sam, plan)
    return Result(
        benchmark="train_step", model=name, reference="plain fp32 loop", ours=f"finetune step ({mode}, {'bf16' if bf16 else 'fp32'})",
        unit=f"s/step of {sizes.batch} images", reference_s=median(times["reference"]), ours_s=median(times["ours"]),
        check=check,
        settings={**dataclasses.asdict(sizes), "mode": mode, "method": run_.method.name, "weights": str(path or "random"),
                  "loss_size": step_fn.opts.loss_size, "rounds": len(step_fn.schedule)},
        extra={"peak_gib": peak, "encoder_plan": dataclasses.asdict(plan)},
    )
