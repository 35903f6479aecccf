"""The ``finetune`` stage: SUM's interactive fine-tuning of SAM (spec §5-§9).

`finetune` is the one library call the CLI, DVC and Prefect reach. It reads top to bottom
(nanoGPT's ``train.py`` is the model): set-up (`setup_run`), a loop of one screen (`TrainStep`:
data, forward under autocast, backward, gradient all-reduce; then the optimizer step, metrics,
checkpoint), and the results (`write_results`). DDP, autocast and checkpointing are in the loop,
not in callbacks. The SUM-specific work is in named functions it calls: the interactive rounds
and their prompts (`sum.train.rounds`), the method (`sum.train.method`).

Engineering:

- **Distributed** (`sum.train.distributed`). Each rank takes its slice of the global batch
  (`sum.train.data.rank_slots`); the loss is scaled by W / batch_size so that the gradient
  averaged over ranks equals the 1-process mean over the global batch. All randomness of a step
  comes from per-image generators seeded by (seed, step, slot), never by the rank, so W processes
  compute what one process computes (tests check 1e-5); the global RNGs are seeded with
  seed + rank.
- **Precision.** bf16 autocast (spec A2) on CUDA, with the encoder fast path (`sum.model.fast`),
  and in decoder mode on CPUs with native bf16 (`sum.train.build.forward_autocast`,
  ``train.precision``); losses in fp32.
- **Checkpoints** (`sum.train.state`). ``<run_dir>/<method>/train_state.pt`` every
  ``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT; a later call resumes from it.
- **Outputs.** A SUM checkpoint (`save_sum_checkpoint`) at ``<model_dir>/<method>.pt`` and a
  metrics JSON at ``<metrics_dir>/<method>.json``; MLflow run (rank 0) with the flattened config,
  per-step metrics, system metrics and the checkpoint as an artifact.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from sum.io import atomic_write_text, md5_file
from sum.model.checkpoint import save_sum_checkpoint
from sum.model.embeddings import EmbeddingSource
from sum.model.predictor import encoder_fingerprint
from sum.progress import StopSignals, progress_bar
from sum.tracking import MODEL_MD5_TAG
from sum.train.build import build_pools, build_train_model, forward_autocast, start_tracking
from sum.train.data import LABELED, UNLABELED, Pool, cached_features, split_batch, to_device
from sum.train.distributed import DistInfo, broadcast_parameters, reduce_metrics, setup_distributed, sync_gradients, teardown
from sum.train.loader import StepData, StepLoader, loader_workers
from sum.train.method import resolve_method
from sum.train.optim import build_optimizer, build_scheduler
from sum.train.rounds import RoundOptions, forward_backward
from sum.train.sampling import RoundSpec, round_schedule
from sum.train.state import (
    RunPaths,
    TrainingStopped,
    load_train_state,
    resume_key,
    run_paths,
    save_train_state,
    seed_everything,
)

Tensor = torch.Tensor


@dataclass
class TrainStep:
    """One rank's step up to the optimizer update (spec §7-§8): its slice of the global batch
    (spec §8.1, A1), decoded ahead by ``loader_workers`` processes (`sum.train.loader`), the
    images' cached embeddings (decoder mode) or the encoder (full mode), the forward and backward
    of the interactive rounds (`forward_backward`), the gradient all-reduce and clipping.
    `finetune`'s loop calls it, then steps the optimizer; ``benchmarks/train_step.py`` times it.
    """

    sam: nn.Module
    optimizer: torch.optim.Optimizer
    pools: Dict[str, Pool]
    embeddings: Any  # decoder mode: ``load(dataset, image_id) -> ImageEmbedding``
    schedule: Sequence[RoundSpec]
    opts: RoundOptions
    autocast: Any  # the forward's autocast context (`forward_autocast`)
    info: DistInfo
    mode: str  # "decoder" (cached embeddings) or "full" (spec §8.1)
    batch_size: int  # the global batch
    n_labeled: int  # labeled slots of the global batch
    sizes: Dict[str, int]  # images per pool
    seed: int
    img_size: int
    max_masks: int
    grad_clip: float = 0.0
    iterations: int = 0  # steps the loader's workers decode ahead (0 .. iterations - 1)
    loader_workers: int = 0  # 0: batches load on the calling thread

    def __post_init__(self) -> None:
        self.trainable = [p for p in self.sam.parameters() if p.requires_grad]
        self.data = StepData(self.pools, self.batch_size, self.n_labeled, self.sizes, self.seed, self.img_size,
                             self.opts.loss_size, self.max_masks, keep_images=self.mode == "full",
                             rank=self.info.rank, world_size=self.info.world_size)
        self.loader = StepLoader(self.data, self.iterations, self.loader_workers,
                                 pin_memory=self.info.device.type == "cuda")

    def batch(self, step: int):
        """This rank's (item, generator) pairs of ``step``, loaded on this thread, on its device."""
        return to_device(self.data.load(step), self.info.device)

    def __call__(self, step: int) -> Dict[str, Tensor]:
        """Gradients of ``step`` in the trainable parameters; `forward_backward`'s sums."""
        batch = to_device(self.loader.get(step), self.info.device)
        features = cached_features(self.embeddings, batch, self.info.device) if self.mode == "decoder" else None
        self.optimizer.zero_grad(set_to_none=True)
        out = forward_backward(self.sam, batch, features, self.schedule, self.opts,
                               self.info.world_size / self.batch_size, self.autocast)
        sync_gradients(self.trainable, self.info)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        return out

    def close(self) -> None:
        """Stop the loader's workers."""
        self.loader.close()


@dataclass
class TrainRun:
    """What `setup_run` builds for the loop, and the state it resumed from."""

    method: Any  # `sum.config.MethodConfig`
    info: DistInfo
    paths: RunPaths
    sam: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_step: TrainStep
    key: str  # `resume_key`
    step: int  # the resumed step (0 for a fresh run)
    history: List[float]  # loss per step so far
    tracker: Any
    n_unlabeled: int  # unlabeled slots of the global batch
    train_s: Optional[float]  # seconds the steps before `step` took, over earlier calls (None: unknown)

    def save_state(self, step: int, history: List[float], seconds: float) -> None:
        """The resumable state after ``step`` (`save_train_state`); ``seconds``: this call's
        training time so far."""
        save_train_state(self.paths.state, sam=self.sam, optimizer=self.optimizer, scheduler=self.scheduler,
                         step=step, key=self.key, history=history, run_id=self.tracker.run_id,
                         train_s=None if self.train_s is None else self.train_s + seconds)


def setup_run(cfg, method_name: Optional[str], pools: Optional[Dict[str, Pool]], embeddings) -> TrainRun:
    """Model, data, rounds, optimizer, resumed state and tracker of a `finetune` call, in the order
    that fixes its random streams (the initial weights, then the global RNGs, then a resumed state)."""
    method = resolve_method(cfg, method_name)
    t = cfg.train
    info = setup_distributed(cfg.model.device)
    paths = run_paths(t, method.name)
    # Model: foundation weights; what trains is the mode's (spec §8.1).
    sam = build_train_model(cfg, info)
    seed_everything(t.seed + info.rank)

    # Data: labeled + pseudo-labeled pools, mixed per step (spec §8.1, A1).
    pools = pools if pools is not None else build_pools(cfg, method)
    if not method.use_unlabeled:
        pools = {LABELED: pools[LABELED], UNLABELED: Pool(UNLABELED, [])}
    sizes = {k: len(p) for k, p in pools.items()}
    n_labeled, n_unlabeled = split_batch(t.batch_size, t.unlabeled_fraction, sizes[UNLABELED] > 0)
    img_size = sam.image_encoder.img_size
    if t.mode == "decoder" and embeddings is None:  # the encoder never runs (spec §8.1)
        embeddings = EmbeddingSource(cfg.embed.out_dir, fingerprint=encoder_fingerprint(sam), required=True)

    schedule = round_schedule(
        t.rounds, use_task_prompt=method.use_task_prompt, continuous_task_prompt=method.continuous_task_prompt
    )
    opts = RoundOptions(
        loss_size=t.loss_size or img_size,
        box_probability=t.box_probability,
        jitter=t.jitter,
        dice_threshold=t.dice_threshold,
        use_uncertainty_loss=method.use_uncertainty_loss,
        use_uncertainty_sampling=method.use_uncertainty_sampling,
    )
    broadcast_parameters(sam, info)
    optimizer = build_optimizer(
        sam, mode=t.mode, lr=t.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay, betas=t.betas,
        task_prompt_lr_scale=t.task_prompt_lr_scale,
    )
    scheduler = build_scheduler(optimizer, t.warmup_iters)
    key = resume_key(cfg, method)
    step, history, run_id, train_s = load_train_state(paths.state, key, sam=sam, optimizer=optimizer, scheduler=scheduler)
    tracker = start_tracking(cfg, method, info, run_id)
    train_step = TrainStep(
        sam, optimizer, pools, embeddings, schedule, opts, forward_autocast(t.precision, info.device, t.mode), info,
        mode=t.mode, batch_size=t.batch_size, n_labeled=n_labeled, sizes=sizes, seed=t.seed, img_size=img_size,
        max_masks=t.max_masks, grad_clip=t.grad_clip, iterations=t.iterations,
        loader_workers=loader_workers(t.loader_workers, info.device),
    )
    return TrainRun(method, info, paths, sam, optimizer, scheduler, train_step, key, step, history, tracker, n_unlabeled,
                    train_s)


def finetune(
    cfg,
    method_name: Optional[str] = None,
    *,
    pools: Optional[Dict[str, Pool]] = None,
    embeddings=None,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Dict:
    """Fine-tune SAM with one method (spec §5-§9); the ``finetune`` stage's library call.

    Arguments:
      cfg: the resolved `sum.config.Config` (``model``, ``method``, ``train``, ``data``,
        ``embed``, ``tracking``, ``storage``).
      method_name: the method to train (`resolve_method`); default ``cfg.method``.
      pools: labeled/unlabeled `Pool`s instead of `build_pools` (tests, notebooks).
      embeddings: an object with ``load(dataset, image_id) -> ImageEmbedding`` instead of the
        ``embed`` cache, ``EmbeddingSource(cfg.embed.out_dir, required=True)`` (decoder mode only).
      on_step: called as ``on_step(step, metrics)`` after every step, on every rank.
    Returns:
      the metrics written to ``<metrics_dir>/<method>.json`` (also on ranks > 0, unwritten).
    Raises:
      TrainingStopped: after SIGTERM/SIGINT, once the state is saved.
    """
    run = setup_run(cfg, method_name, pools, embeddings)
    t, info, optimizer, tracker = cfg.train, run.info, run.optimizer, run.tracker
    step, history = run.step, run.history
    stop = StopSignals("finetune")
    bar = progress_bar(t.iterations, "finetune", unit="step", initial=step, enabled=info.rank == 0)
    t0, images_done, status = time.perf_counter(), 0, "FAILED"
    saved_step, updating = step, False
    try:
        while step < t.iterations:
            # this rank's batch: forward + backward (7 interactive rounds per image), gradient all-reduce
            out = run.train_step(step)
            updating = True  # parameters and step disagree until the three lines below are done
            optimizer.step()
            run.scheduler.step()
            step += 1
            updating = False

            # metrics (all ranks agree on stopping here), logging, checkpoint
            metrics, stopping = reduce_metrics(out, stop.signum is not None, info)
            images_done += t.batch_size
            metrics.update(
                lr=optimizer.param_groups[0]["lr"],
                images_per_s=images_done / (time.perf_counter() - t0),
                unlabeled_epochs=unlabeled_epochs(run, step),
            )
            history.append(metrics["loss"])
            if step % t.log_every == 0 or step == t.iterations:
                tracker.log_metrics(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.2f}")
            if on_step is not None:
                on_step(step, metrics)
            if info.rank == 0 and (stopping or step % t.checkpoint_every == 0 or step == t.iterations):
                run.save_state(step, history, time.perf_counter() - t0)
                saved_step = step
            if stopping:
                status = "KILLED"
                raise TrainingStopped(step, stop.signum or signal.SIGTERM, run.paths.state)
        status = "FINISHED"
    except (Exception, KeyboardInterrupt) as e:
        # on any other way out, keep the last complete step (not one torn by an update in flight)
        if info.rank == 0 and not isinstance(e, TrainingStopped) and not updating and step > saved_step:
            run.save_state(step, history, time.perf_counter() - t0)
        if isinstance(e, KeyboardInterrupt):
            status = "KILLED"
        raise
    finally:
        stop.restore()
        bar.close()
        run.train_step.close()
        if status != "FINISHED":
            tracker.finish(status)
            teardown(info, barrier=False)

    result = summarize(run, cfg.train, step, images_done, time.perf_counter() - t0)
    write_results(run, cfg, result)
    return result


def unlabeled_epochs(run: TrainRun, step: int) -> float:
    """Passes over the pseudo-labeled pool after ``step`` steps."""
    return step * run.n_unlabeled / max(run.train_step.sizes[UNLABELED], 1)


def summarize(run: TrainRun, t, step: int, images_done: int, wall: float) -> Dict:
    """The run's metrics JSON: steps, losses, mixing and throughput. ``wall_s`` is this call's;
    ``train_s`` and the rates cover every step of the run, resumed calls included (a finished run
    resumed reports the figures it was trained with), or, when a resumed state did not record its
    time (``train_s`` None), this call's steps only."""
    history, start_step = run.history, run.step
    train_s = None if run.train_s is None else run.train_s + wall
    if train_s is not None and step > 0 and train_s > 0:
        samples_per_s, steps_per_s = step * t.batch_size / train_s, step / train_s
    else:
        samples_per_s = images_done / wall if images_done else None
        steps_per_s = (step - start_step) / wall if step > start_step else None
    return {
        "method": run.method.name,
        "mode": t.mode,
        "steps": step,
        "resumed_from_step": start_step,
        "final_loss": history[-1] if history else None,
        "loss_mean_last_10": float(np.mean(history[-10:])) if history else None,
        "images_per_step": t.batch_size,
        "labeled_per_step": run.train_step.n_labeled,
        "unlabeled_per_step": run.n_unlabeled,
        "samples_per_s": samples_per_s,
        "steps_per_s": steps_per_s,
        "wall_s": wall,
        "train_s": train_s,
        "world_size": run.info.world_size,
        "unlabeled_epochs": unlabeled_epochs(run, step),
    }


def write_results(run: TrainRun, cfg, result: Dict) -> None:
    """Rank 0: the SUM checkpoint, the metrics JSON and their MLflow artifacts; then every rank
    finishes its tracker and leaves the process group."""
    paths, tracker, step = run.paths, run.tracker, result["steps"]
    if run.info.rank == 0:
        # the method's flags as trained (overrides included), so that evaluation prompts the model
        # the way it was trained even when params/method/ or the evaluating config say otherwise
        save_sum_checkpoint(run.sam, cfg.model, paths.model, meta={"method": run.method.name, "steps": step,
                                                                    "method_config": dataclasses.asdict(run.method),
                                                                    "final_loss": result["final_loss"]})
        atomic_write_text(paths.metrics, json.dumps(result, indent=2) + "\n")
        tracker.log_metrics({"final_loss": result["final_loss"] or 0.0, "samples_per_s": result["samples_per_s"] or 0.0}, step)
        tracker.log_artifact(paths.model, artifact_path="model")
        tracker.log_artifact(paths.metrics, artifact_path="metrics")
        tracker.set_tags({MODEL_MD5_TAG: md5_file(paths.model)})  # how `sumseg register` finds this run
    tracker.finish("FINISHED")
    teardown(run.info)
