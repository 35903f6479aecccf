"""The ``finetune`` stage: SUM's interactive fine-tuning of SAM (spec §5-§9).

`finetune` is the one library call the CLI, DVC and Prefect reach. Its loop reads top to bottom
(nanoGPT's ``train.py`` is the model): data, forward under autocast, backward, optimizer step,
metrics, checkpoint. DDP, autocast and checkpointing are in the loop, not in callbacks. The
SUM-specific work is in named functions it calls:

- `first_prompts`: round 1's box (jittered, §6.1) or certainty-weighted point (§6.2), p = 0.5 each;
- `prompt_round`: one prompt-encoder + mask-decoder call on the shared image embedding, with the
  task prompt (§2.2) and the previous round's logits as mask input (§7, A5);
- `interactive_rounds`: the 7-round schedule of §7 for all masks of one image, the loss of §5 at
  every round, summed (A4), the error click of §6.3 between rounds;
- `forward_backward`: one rank's share of a step, back-propagated one round at a time.

Methods (spec §9, A13): ``sum`` uses pseudo labels with the uncertainty-aware focal/Dice losses
(§5.3-5.4) and certainty-weighted clicks (§6.2-6.3) and task prompts; ``vanilla`` takes pseudo
labels as ground truth (certainty None everywhere) without task prompts; ``hq_only`` trains on the
labeled data alone, without task prompts. Labeled data always gets the plain SAM loss (§5.5).

Engineering:

- **Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised from
  the environment: NCCL on GPUs, Gloo on CPU. One code path from 1 CPU process to many GPUs. Each
  rank takes its slice of the global batch (`sum.train.data.rank_slots`); the loss is scaled by
  W / batch_size so that the gradient averaged over ranks equals the 1-process mean over the
  global batch. The data-parallel logic is DDP's, written out in the loop: weights broadcast from
  rank 0 at the start (`broadcast_parameters`), one bucketed gradient all-reduce per step
  (`sync_gradients`). The ``DistributedDataParallel`` wrapper is not used because its reducer
  expects one backward per forward, and the rounds back-propagate one at a time: seven rounds of
  up to 30 masks each would otherwise hold seven decoder graphs at once (measured on MobileSAM at
  4 images x ~18 masks: 20 GB RSS for one step).
  All randomness of a step comes from per-image generators seeded by (seed, step, slot), never by
  the rank, so W processes compute what one process computes (tests check 1e-5); the global RNGs
  are seeded with seed + rank.
- **Precision.** bf16 autocast (spec A2) on CUDA, with the encoder fast path (`sum.model.fast`),
  and in decoder mode on CPUs with native bf16 (`forward_autocast`, ``train.precision``); losses
  in fp32.
- **Checkpoints.** ``<run_dir>/<method>/train_state.pt`` every ``checkpoint_every`` steps, at the
  end and when SIGTERM/SIGINT arrives (the step in flight finishes first), written atomically:
  model, optimizer, scheduler, step, loss history, RNG states, the MLflow run id. A later call
  resumes from it automatically, exactly: batches and prompts are functions of the step. A state
  made under another config (anything but the iteration count, checkpoint cadence and paths) or
  on other inputs (pseudo labels, uncertainty maps, embeddings, datasets, checkpoint: their file
  sizes and times, `input_fingerprint`) is not resumed: training starts afresh.
- **Outputs.** A SUM checkpoint (`save_sum_checkpoint`) at ``<model_dir>/<method>.pt`` and a
  metrics JSON at ``<metrics_dir>/<method>.json``; MLflow run (rank 0) with the flattened config,
  per-step metrics, system metrics and the checkpoint as an artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sum.io import atomic_write_text, atomic_torch_save
from sum.model.folded_decoder import folded_decode, upscaling_is_sam
from sum.train.data import (
    LABELED,
    UNLABELED,
    Pool,
    TrainItem,
    global_batch,
    load_items,
    rank_slots,
    split_batch,
)
from sum.model.losses import combined_loss
from sum.train.optim import build_optimizer, build_scheduler, set_trainable
from sum.data.prompts import sample_first_points
from sum.train.sampling import (
    PROMPT_ERROR_POINT,
    RoundSpec,
    add_jitter_to_boxes,
    round_schedule,
    sample_error_clicks,
    sample_first_prompt_is_box,
)

log = logging.getLogger(__name__)

Tensor = torch.Tensor
STATE_FORMAT = "sum-train-state/1"


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT stopped the training; the state of ``step`` is saved for resuming."""

    def __init__(self, step: int, signum: int, state_path: Path):
        super().__init__(f"training stopped by signal {signum} after step {step}; state saved to {state_path}")
        self.step, self.signum, self.state_path = step, signum, state_path


# ---------------------------------------------------------------------------------------------
# SUM: prompts, rounds, losses (spec §5-§7)


@dataclass(frozen=True)
class RoundOptions:
    """What the interactive rounds need besides the model and the data (spec §5-§7)."""

    loss_size: int  # side of the padded loss frame (spec A10: the input size)
    box_probability: float = 0.5  # round 1: box with p, else one point (spec §7)
    jitter: str = "sum_code"  # box jitter mode (spec §6.1, D2)
    dice_threshold: float = 0.6  # θ of the uncertainty-aware Dice (spec §5.4)
    use_uncertainty_loss: bool = True  # c = 1 − u weights the losses of pseudo labels (§5.3-5.4)
    use_uncertainty_sampling: bool = True  # c weights the clicks on pseudo labels (§6.2-6.3)


@dataclass
class Prompts:
    """The prompts of K masks, the box-prompted ones first (spec §6.1-6.3).

    Box-prompted masks (the first ``n_box``) carry their jittered box and the clicks of later
    rounds; point-prompted ones their first point and later clicks. SAM's prompt encoder pads a
    point-only prompt with one empty token, so both kinds have the same token count every round
    and go through one decoder call.
    """

    n_box: int
    boxes_b4: Optional[Tensor]  # (Kb, 4) xyxy, input frame
    box_clicks: Optional[Tuple[Tensor, Tensor]]  # coords (Kb, n, 2), labels (Kb, n)
    points: Optional[Tuple[Tensor, Tensor]]  # coords (Kp, n + 1, 2), labels (Kp, n + 1)

    def add_click(self, coords_k12: Tensor, labels_k1: Tensor) -> "Prompts":
        """Append one click per mask to every mask's prompt set (spec §6.3: points accumulate)."""
        kb = self.n_box

        def cat(prev, c, l):
            return (c, l) if prev is None else (torch.cat([prev[0], c], 1), torch.cat([prev[1], l], 1))

        box_clicks = cat(self.box_clicks, coords_k12[:kb], labels_k1[:kb]) if kb else None
        points = cat(self.points, coords_k12[kb:], labels_k1[kb:]) if coords_k12.shape[0] > kb else None
        return Prompts(kb, self.boxes_b4, box_clicks, points)


def to_input_frame(xy: Tensor, scale: float) -> Tensor:
    """Loss-frame pixel indices -> input-frame coordinates at the pixel centre (spec §6.4: ×4 + 1.5
    for 256² -> 1024²; the prompt encoder adds the last 0.5)."""
    return xy * scale + (scale - 1.0) / 2.0


def first_prompts(
    item: TrainItem, generator: torch.Generator, opts: RoundOptions, certainty_k1hw: Optional[Tensor]
) -> Tuple[Tensor, Prompts]:
    """Round 1's prompt per mask: a jittered box (§6.1) or one point (§6.2), p = 0.5 each (§7).

    Arguments:
      item: the image and its K targets (loss frame), boxes (input frame).
      generator: the image's generator.
      opts: box probability, jitter mode.
      certainty_k1hw: c for certainty-weighted points (pseudo labels with uncertainty sampling),
        or None for uniform points.
    Returns:
      ``(order_k, prompts)``: the permutation putting box-prompted masks first, and their prompts.
    """
    device = item.masks_k1hw.device
    is_box_k = sample_first_prompt_is_box(
        item.n_masks, generator=generator, box_probability=opts.box_probability, device=device
    )
    order_k = torch.cat([is_box_k.nonzero()[:, 0], (~is_box_k).nonzero()[:, 0]])
    kb = int(is_box_k.sum())
    boxes = None
    if kb:
        boxes = add_jitter_to_boxes(item.boxes_k4[order_k[:kb]], item.input_hw, generator=generator, mode=opts.jitter)
    points = None
    if kb < item.n_masks:
        rest = order_k[kb:]
        first = sample_first_points(
            item.masks_k1hw[rest], None if certainty_k1hw is None else certainty_k1hw[rest], generator=generator
        )
        points = (to_input_frame(first.coords, item.frame_scale), first.labels)
    return order_k, Prompts(kb, boxes, None, points)


def prompt_round(
    sam: nn.Module,
    features_1chw: Tensor,
    prompts: Prompts,
    mask_input_k1hw: Optional[Tensor],
    task_prompt: int,
    multimask: bool,
) -> Tuple[Tensor, Tensor]:
    """One round's forward for K masks of one image, sharing its embedding (spec §2.2, §7, §14.2).

    Calls ``prompt_encoder(points, boxes, masks, task_prompt)`` for the box-prompted and the
    point-prompted masks, then the mask decoder once on both (not ``Sam.forward``: it is no_grad
    and has no task prompt), computed by `sum.model.folded_decoder.folded_decode` when the
    decoder's layout is SAM's.

    Arguments:
      sam: the SUM model.
      features_1chw: the image embedding (1, C, He, We).
      prompts: the prompt sets, box-prompted masks first.
      mask_input_k1hw: previous low-res logits (K, 1, 4He, 4We), detached, or None (no_mask_embed).
      task_prompt: task id for every mask of the round (0 = none).
      multimask: 3 outputs (single-prompt round) or token 0 only.
    Returns:
      low-res logits (K, M, 4He, 4We) and predicted IoUs (K, M), M = 3 or 1.
    """
    kb = prompts.n_box
    sparse, dense = [], []
    groups = [(slice(0, kb), prompts.box_clicks, prompts.boxes_b4), (slice(kb, None), prompts.points, None)]
    for rows, points, boxes in groups:
        if points is None and boxes is None:
            continue
        masks = None if mask_input_k1hw is None else mask_input_k1hw[rows]
        s, d = sam.prompt_encoder(points=points, boxes=boxes, masks=masks, task_prompt=task_prompt)
        sparse.append(s)
        dense.append(d)
    if upscaling_is_sam(sam.mask_decoder):
        # the same function as SAM's decoder, ~2x faster forward and backward (each mask has its
        # own dense prompt from round 2 on, so SAM would project K copies of the image tokens)
        return folded_decode(
            sam.mask_decoder, features_1chw, sam.prompt_encoder.get_dense_pe(), torch.cat(sparse), torch.cat(dense), multimask
        )
    return sam.mask_decoder(
        image_embeddings=features_1chw,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat(sparse),
        dense_prompt_embeddings=torch.cat(dense),
        multimask_output=multimask,
    )


def to_loss_frame(low_res_kmhw: Tensor, loss_size: int, valid_hw: Tuple[int, int]) -> Tensor:
    """Low-res logits -> the loss frame: bilinear to ``loss_size²`` (as ``postprocess_masks``), then
    the padding cropped off (spec A10), fp32."""
    x = low_res_kmhw.float()
    if x.shape[-1] != loss_size:
        x = F.interpolate(x, (loss_size, loss_size), mode="bilinear", align_corners=False)
    return x[..., : valid_hw[0], : valid_hw[1]]


def _pick(x_kmhw: Tensor, index_k: Tensor) -> Tensor:
    return x_kmhw[torch.arange(x_kmhw.shape[0], device=x_kmhw.device), index_k][:, None]


def interactive_rounds(
    sam: nn.Module,
    features_1chw: Tensor,
    item: TrainItem,
    generator: torch.Generator,
    schedule: Sequence[RoundSpec],
    opts: RoundOptions,
    backward: Optional[Callable[[Tensor], None]] = None,
) -> Dict[str, Tensor]:
    """The interactive schedule of spec §7 for all K masks of one image, one shared embedding.

    Round 1: box or point (`first_prompts`), the image's task prompt (labeled: its dataset's id;
    pseudo labels: 0), 3 outputs with min-loss. Rounds 2-6: one click from the error region of
    the previous prediction (§6.3, certainty-weighted for pseudo labels with uncertainty sampling),
    appended to the prompts; task prompt 0. Round 7: no new prompt. From round 2 on, the previous
    round's low-res logits of the output with the highest predicted IoU are the mask input,
    detached (A5); the error region is that output binarised in the loss frame (A14). The loss of
    §5 (`combined_loss`: uncertainty-aware for pseudo labels when on, plain for labeled data; mean
    over the image's masks) is computed at every round and summed (A4).

    Rounds depend on each other only through detached inputs (mask input, clicks) and the shared
    embedding, so ``backward``, when given, is called on each round's loss as soon as it exists:
    the gradient is that of the sum, and memory holds one round's graph instead of seven.

    Returns:
      ``loss`` (scalar, summed over rounds; detached when ``backward`` is given) and detached
      ``loss_first``, ``loss_last`` (rounds 1 and last) and ``iou_last`` (mean IoU of the last
      round's masks with their targets).
    """
    pseudo = item.is_pseudo
    c = item.certainty_k1hw
    c_loss = c if (pseudo and opts.use_uncertainty_loss) else None
    c_click = c if (pseudo and opts.use_uncertainty_sampling) else None
    order_k, prompts = first_prompts(item, generator, opts, c_click)
    target_k1hw = item.masks_k1hw[order_k].float()
    c_loss = None if c_loss is None else c_loss[order_k]
    c_click = None if c_click is None else c_click[order_k]
    valid_hw = tuple(target_k1hw.shape[-2:])
    total, losses = 0.0, []
    mask_input_k1hw = pred_k1hw = None
    for spec in schedule:
        if spec.new_prompt == PROMPT_ERROR_POINT:
            click = sample_error_clicks(pred_k1hw, target_k1hw, c_click, generator=generator)
            prompts = prompts.add_click(to_input_frame(click.coords, item.frame_scale), click.labels)
        task = item.task_id if spec.task_prompt_on else 0
        low_res_kmhw, iou_km = prompt_round(
            sam, features_1chw, prompts, mask_input_k1hw if spec.mask_input else None, task, spec.multimask
        )
        logits_kmhw = to_loss_frame(low_res_kmhw, opts.loss_size, valid_hw)
        loss = combined_loss(logits_kmhw, iou_km.float(), target_k1hw, c_loss, threshold=opts.dice_threshold)["loss"]
        if backward is not None:
            backward(loss)
            loss = loss.detach()
        total = total + loss
        losses.append(loss.detach())
        best_k = iou_km.detach().argmax(dim=1)
        mask_input_k1hw = _pick(low_res_kmhw.detach(), best_k)
        pred_k1hw = _pick(logits_kmhw.detach(), best_k) > 0
    inter = (pred_k1hw & (target_k1hw > 0)).flatten(1).sum(1)
    union = (pred_k1hw | (target_k1hw > 0)).flatten(1).sum(1)
    iou_last = (inter / union.clamp(min=1)).mean()
    return {"loss": total, "loss_first": losses[0], "loss_last": losses[-1], "iou_last": iou_last}


def encode(sam: nn.Module, items: Sequence[TrainItem]) -> Tensor:
    """Full mode: the image encoder on this rank's images, with grad (spec §8.1)."""
    device = sam.pixel_mean.device
    x = torch.cat([sam.preprocess(it.image_3hw[None].to(device, torch.float32)) for it in items])
    return sam.image_encoder(x)


def forward_backward(
    sam: nn.Module,
    batch: Sequence[Tuple[TrainItem, torch.Generator]],
    features_nchw: Optional[Tensor],
    schedule: Sequence[RoundSpec],
    opts: RoundOptions,
    loss_scale: float,
    autocast,
) -> Dict[str, Tensor]:
    """Forward and backward of this rank's images, one round at a time (spec §7, A4).

    Each image's round losses are summed (A4) and scaled by ``loss_scale`` (= W / global batch
    size), so that the gradient averaged over ranks is that of the mean over the global batch.
    Backward runs after every round (`interactive_rounds`), which keeps one round's graph in
    memory. In full mode the encoder runs once on the rank's images and its output enters the
    rounds as a leaf: the rounds accumulate the embedding's gradient there, and the encoder's
    backward runs once at the end.

    Arguments:
      sam: the SUM model.
      batch: (item, generator) per image.
      features_nchw: cached embeddings (decoder mode), or None to run the encoder (full mode).
      schedule, opts: the rounds and their options.
      loss_scale: W / global batch size.
      autocast: the forward's autocast context (bf16 on CUDA); backward runs outside it.
    Returns:
      detached sums over the images: ``loss_sum``, ``loss_first``, ``loss_last``, ``iou_last``,
      ``images``, ``masks``.
    """
    encoded = None
    if features_nchw is None:
        with autocast:
            encoded = encode(sam, [it for it, _ in batch])
        features_nchw = encoded.detach().requires_grad_()
    device = features_nchw.device
    no_autocast = torch.autocast(device.type, enabled=False)

    def backward(loss: Tensor) -> None:
        with no_autocast:
            (loss * loss_scale).backward()

    sums = {k: torch.zeros((), device=device) for k in ("loss_sum", "loss_first", "loss_last", "iou_last", "images", "masks")}
    for i, (item, generator) in enumerate(batch):
        if item.n_masks == 0:
            continue
        with autocast:
            out = interactive_rounds(sam, features_nchw[i : i + 1], item, generator, schedule, opts, backward=backward)
        sums["loss_sum"] += out["loss"]
        for k in ("loss_first", "loss_last", "iou_last"):
            sums[k] += out[k]
        sums["images"] += 1
        sums["masks"] += item.n_masks
    if encoded is not None and features_nchw.grad is not None:
        with no_autocast:
            encoded.backward(features_nchw.grad)
    return sums


def broadcast_parameters(sam: nn.Module, info: "DistInfo") -> None:
    """Start every rank from rank 0's weights (what DDP does at construction)."""
    if info.world_size > 1:
        for t in sam.state_dict().values():
            dist.broadcast(t, src=0)


def sync_gradients(params: Sequence[nn.Parameter], info: "DistInfo", bucket_numel: int = 2**24) -> None:
    """DDP's gradient all-reduce, once per step, after the rank's per-round backwards: every
    trainable parameter's gradient averaged over ranks, in buckets. A parameter no image of a rank
    reached (e.g. the task prompt of a task absent from its slice) counts as a zero gradient, on
    every world size alike, so that 1 and W processes take the same optimizer step."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if info.world_size == 1:
        return
    bucket: List[Tensor] = []
    numel = 0
    for p in list(params) + [None]:
        if p is not None:
            bucket.append(p.grad)
            numel += p.numel()
        if bucket and (p is None or numel >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(info.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, numel = [], 0


def to_device(items: Sequence[Tuple[TrainItem, torch.Generator]], device: torch.device):
    """Move the items' tensors to ``device``; a CUDA run draws from a CUDA generator seeded by the
    image's CPU generator."""
    if device.type == "cpu":
        return list(items)
    out = []
    for item, g in items:
        moved = dataclasses.replace(
            item,
            masks_k1hw=item.masks_k1hw.to(device),
            certainty_k1hw=None if item.certainty_k1hw is None else item.certainty_k1hw.to(device),
            boxes_k4=item.boxes_k4.to(device),
        )
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        out.append((moved, torch.Generator(device=device).manual_seed(seed)))
    return out


def cached_features(embeddings, items: Sequence[Tuple[TrainItem, torch.Generator]], device) -> Tensor:
    """Decoder mode: the images' embeddings from the cache (spec §8.1: the encoder never runs)."""
    feats = []
    for item, _ in items:
        emb = embeddings.load(item.dataset, item.image_id)
        if tuple(emb.input_size) != tuple(item.input_hw):
            raise ValueError(
                f"embedding of {item.dataset}/{item.image_id}: input size {tuple(emb.input_size)}, "
                f"the image resizes to {item.input_hw}"
            )
        feats.append(emb.features)
    return torch.cat(feats).to(device, torch.float32)


# ---------------------------------------------------------------------------------------------
# Engineering: distribution, seeding, signals, state


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call initialised the process group (and so tears it down)


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Init the process group from ``torchrun``'s environment (NCCL on GPU, Gloo on CPU); 1 process
    without it."""
    from sum.model.checkpoint import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, resolve_device(device_name), False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict:
    """Global RNG states (torch, CUDA, numpy, python) as plain data (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """SIGTERM and SIGINT set a flag: the loop finishes its step, saves and stops. A second SIGINT
    interrupts at once. Only installed in the main thread; restored by `restore`."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after this step", signum)
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


@dataclass
class RunPaths:
    state: Path  # resumable training state
    model: Path  # final SUM checkpoint
    metrics: Path  # final metrics JSON


def run_paths(train_cfg, method: str) -> RunPaths:
    return RunPaths(
        state=Path(train_cfg.run_dir) / method / "train_state.pt",
        model=Path(train_cfg.model_dir) / f"{method}.pt",
        metrics=Path(train_cfg.metrics_dir) / f"{method}.json",
    )


_NOT_IN_KEY = {"iterations", "checkpoint_every", "log_every", "run_dir", "model_dir", "metrics_dir"}


def input_paths(cfg, method) -> List[str]:
    """What a run reads from disk under ``cfg``: the labeled datasets, and with unlabeled data the
    images, pseudo labels (and uncertainty maps when used) of the unlabeled ones, the embedding
    cache (decoder mode) and the foundation checkpoint."""
    t = cfg.train
    paths = [cfg.model.checkpoint or ""]
    for name, d in sorted(cfg.data.datasets.items()):
        if d.role == "labeled":
            paths += [d.images, d.annotations]
        elif d.role == "unlabeled" and method.use_unlabeled:
            paths += [d.images, str(Path(t.pseudo_dir) / name)]
            if method.uses_uncertainty:
                paths.append(str(Path(t.uncertainty_dir) / name))
        else:
            continue
        if t.mode == "decoder":
            paths.append(str(Path(cfg.embed.out_dir) / name))
    return [p for p in paths if p]


def input_fingerprint(paths: Sequence[str]) -> str:
    """sha256 of (path, size, mtime) of every file under ``paths`` (files or folders; a missing or
    remote path counts by its name). Like DVC's own change check, it reads no file contents: a
    new pseudo-labeling, uncertainty map, embedding or checkpoint changes it, an unchanged tree
    (a killed run started again) does not."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0".encode())
        root = Path(p)
        if "://" in p or not root.exists():
            continue
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else ''}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resume_key(cfg, method) -> str:
    """sha256 of everything a resumed run must share with the saved one (module docstring): the
    config but the iteration count, cadence and output paths, and the inputs (`input_fingerprint`
    of `input_paths`), so that a stage re-run on new pseudo labels trains afresh instead of
    resuming the finished run."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IN_KEY}
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("device", "fast_path")}
    text = json.dumps(
        {
            "train": train,
            "model": model,
            "method": dataclasses.asdict(method),
            "inputs": input_fingerprint(input_paths(cfg, method)),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def save_train_state(path: Path, *, sam, optimizer, scheduler, step: int, key: str, history: List[float], run_id) -> None:
    """The resumable state, atomically (module docstring)."""
    state = {
        "format": STATE_FORMAT,
        "key": key,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in sam.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": list(history),
        "mlflow_run_id": run_id,
    }
    atomic_torch_save(state, path)
    log.info("saved training state %s (step %d)", path, step)


def load_train_state(path: Path, key: str, *, sam, optimizer, scheduler) -> Tuple[int, List[float], Optional[str]]:
    """Resume from ``path`` if it holds a state of this config: (step, loss history, MLflow run id);
    (0, [], None) otherwise."""
    if not path.is_file():
        return 0, [], None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a SUM training state (expected format {STATE_FORMAT!r})")
    if state["key"] != key:
        log.warning("%s: saved under another config or on other inputs; training starts afresh", path)
        return 0, [], None
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), list(state["history"]), state.get("mlflow_run_id")


def reduce_metrics(out: Dict[str, Tensor], stop: bool, info: DistInfo) -> Tuple[Dict[str, float], bool]:
    """Sum the step's statistics and the stop flag over ranks (one all-reduce; also the point where
    every rank agrees to stop at the same step)."""
    keys = ("loss_sum", "loss_first", "loss_last", "iou_last", "images", "masks")
    vec = torch.stack([out[k].detach().float() for k in keys] + [torch.tensor(float(stop), device=out["images"].device)])
    if info.world_size > 1:
        dist.all_reduce(vec)
    vals = dict(zip(keys + ("stop",), vec.tolist()))
    n = max(vals["images"], 1.0)
    metrics = {
        "loss": vals["loss_sum"] / n,
        "loss_round_first": vals["loss_first"] / n,
        "loss_round_last": vals["loss_last"] / n,
        "iou_round_last": vals["iou_last"] / n,
        "masks_per_image": vals["masks"] / n,
    }
    return metrics, vals["stop"] > 0


# ---------------------------------------------------------------------------------------------
# Building the run


def resolve_method(cfg, method_name: Optional[str]):
    """The `MethodConfig` to train: ``cfg.method`` when ``method_name`` is None or its name, else
    ``cfg.methods[method_name]`` where the config has such a map, else
    ``params/method/<method_name>.yaml`` (the DVC stage trains several methods from one params.yaml).

    Raises:
      ValueError: naming the method and the known ones.
    """
    if method_name is None or method_name == cfg.method.name:
        return cfg.method
    methods = getattr(cfg, "methods", None) or {}
    if method_name in methods:
        return methods[method_name]
    from omegaconf import OmegaConf

    from sum.config import PARAMS_DIR

    path = PARAMS_DIR / "method" / f"{method_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (PARAMS_DIR / "method").glob("*.yaml"))
        raise ValueError(f"method {method_name!r}: no {path}; known methods: {known}")
    return _method_config(OmegaConf.load(path))


def _method_config(raw):
    """A `MethodConfig` from a mapping (a params/method file or a checkpoint's stored flags),
    checked against the schema: unknown keys and bad values raise OmegaConf's errors."""
    from omegaconf import OmegaConf

    from sum.config import MethodConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MethodConfig), raw))


def checkpoint_method(cfg, meta: Dict[str, Any]):
    """The `MethodConfig` a SUM checkpoint was trained with: its ``meta.method_config`` (what
    `finetune` stores, overrides included), else, for checkpoints written before it was stored,
    ``resolve_method(cfg, meta.method)``; None when the meta names no method.

    Raises:
      ValueError: a stored method config with unknown keys or bad values, or an unknown method name.
    """
    stored = meta.get("method_config")
    if stored is None:
        name = meta.get("method")
        return resolve_method(cfg, name) if name else None
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _method_config(dict(stored))
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise ValueError(f"meta.method_config {stored!r}: {str(e).splitlines()[0]}") from None


def build_pools(cfg, method) -> Dict[str, Pool]:
    """Labeled datasets (role ``labeled``, their task ids) and, when the method uses them, the
    pseudo labels of the unlabeled ones (role ``unlabeled``; u only when the method uses it)."""
    from sum.data.dataset import build_dataset

    t = cfg.train
    labeled = [(n, build_dataset(d, n)) for n, d in cfg.data.datasets.items() if d.role == "labeled"]
    unlabeled = []
    if method.use_unlabeled:
        from sum.pseudo.dataset import PseudoLabelDataset

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


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=True if disable else None)


# ---------------------------------------------------------------------------------------------
# The stage


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
      embeddings: an object with ``load(dataset, image_id) -> ImageEmbedding`` instead of
        ``EmbeddingCache(cfg.embed.out_dir)`` (decoder mode only).
      on_step: called as ``on_step(step, metrics)`` after every step, on every rank.
    Returns:
      the metrics written to ``<metrics_dir>/<method>.json`` (also on ranks > 0, unwritten).
    Raises:
      TrainingStopped: after SIGTERM/SIGINT, once the state is saved.
    """
    from sum.io import S3Options
    from sum.model.checkpoint import build_model, save_sum_checkpoint
    from sum.io import md5_file
    from sum.tracking import MODEL_MD5_TAG, NullTracker, flatten, start_run

    method = resolve_method(cfg, method_name)
    t = cfg.train
    info = setup_distributed(cfg.model.device)
    paths = run_paths(t, method.name)
    torch.manual_seed(t.seed)  # the same initial weights on every rank even without a checkpoint

    # Model: foundation weights; what trains is the mode's (spec §8.1).
    sam = build_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3)).to(info.device)
    set_trainable(sam, t.mode)
    set_train_modes(sam, t.mode)
    if info.device.type == "cuda" and t.mode == "full":
        from sum.model.fast import enable_fast_path

        enable_fast_path(sam, cfg.model.fast_path, device=info.device)
    seed_everything(t.seed + info.rank)

    # Data: labeled + pseudo-labeled pools, mixed per step (spec §8.1, A1).
    pools = pools if pools is not None else build_pools(cfg, method)
    if not method.use_unlabeled:
        pools = {LABELED: pools[LABELED], UNLABELED: Pool(UNLABELED, [])}
    sizes = {k: len(p) for k, p in pools.items()}
    n_labeled, n_unlabeled = split_batch(t.batch_size, t.unlabeled_fraction, sizes[UNLABELED] > 0)
    img_size = sam.image_encoder.img_size
    loss_size = t.loss_size or img_size
    if t.mode == "decoder" and embeddings is None:
        from sum.model.embeddings import EmbeddingCache
        from sum.model.predictor import encoder_fingerprint

        embeddings = EmbeddingCache(cfg.embed.out_dir, fingerprint=encoder_fingerprint(sam))

    schedule = round_schedule(
        t.rounds, use_task_prompt=method.use_task_prompt, continuous_task_prompt=method.continuous_task_prompt
    )
    opts = RoundOptions(
        loss_size=loss_size,
        box_probability=t.box_probability,
        jitter=t.jitter,
        dice_threshold=t.dice_threshold,
        use_uncertainty_loss=method.use_uncertainty_loss,
        use_uncertainty_sampling=method.use_uncertainty_sampling,
    )
    broadcast_parameters(sam, info)
    trainable = [p for p in sam.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        sam, mode=t.mode, lr=t.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay, betas=t.betas,
        task_prompt_lr_scale=t.task_prompt_lr_scale,
    )
    scheduler = build_scheduler(optimizer, t.warmup_iters)
    key = resume_key(cfg, method)
    step, history, run_id = load_train_state(paths.state, key, sam=sam, optimizer=optimizer, scheduler=scheduler)
    start_step = step

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
    autocast = forward_autocast(t.precision, info.device, t.mode)
    stop = StopSignals()
    bar = _progress(t.iterations, step, disable=info.rank != 0)
    t0, images_done, status = time.perf_counter(), 0, "FAILED"
    saved_step, updating = step, False
    try:
        while step < t.iterations:
            # this rank's slice of the global batch, and its image embeddings
            slots = rank_slots(global_batch(step, t.batch_size, n_labeled, sizes, t.seed), info.rank, info.world_size)
            keep_images = t.mode == "full"
            batch = load_items(slots, pools, step=step, seed=t.seed, img_size=img_size, loss_size=loss_size,
                               max_masks=t.max_masks, keep_images=keep_images)
            batch = to_device(batch, info.device)
            features = cached_features(embeddings, batch, info.device) if t.mode == "decoder" else None

            # forward + backward (7 interactive rounds per image), gradient all-reduce, step
            optimizer.zero_grad(set_to_none=True)
            out = forward_backward(sam, batch, features, schedule, opts, info.world_size / t.batch_size, autocast)
            sync_gradients(trainable, info)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            updating = True  # parameters and step disagree until the three lines below are done
            optimizer.step()
            scheduler.step()
            step += 1
            updating = False

            # metrics (all ranks agree on stopping here), logging, checkpoint
            metrics, stopping = reduce_metrics(out, stop.signum is not None, info)
            images_done += t.batch_size
            metrics.update(
                lr=optimizer.param_groups[0]["lr"],
                images_per_s=images_done / (time.perf_counter() - t0),
                unlabeled_epochs=step * n_unlabeled / max(sizes[UNLABELED], 1),
            )
            history.append(metrics["loss"])
            if step % t.log_every == 0 or step == t.iterations:
                tracker.log_metrics(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.2f}")
            if on_step is not None:
                on_step(step, metrics)
            if info.rank == 0 and (stopping or step % t.checkpoint_every == 0 or step == t.iterations):
                save_train_state(paths.state, sam=sam, optimizer=optimizer, scheduler=scheduler, step=step,
                                 key=key, history=history, run_id=tracker.run_id)
                saved_step = step
            if stopping:
                status = "KILLED"
                raise TrainingStopped(step, stop.signum or signal.SIGTERM, paths.state)
        status = "FINISHED"
    except (Exception, KeyboardInterrupt) as e:
        # on any other way out, keep the last complete step (not one torn by an update in flight)
        if info.rank == 0 and not isinstance(e, TrainingStopped) and not updating and step > saved_step:
            save_train_state(paths.state, sam=sam, optimizer=optimizer, scheduler=scheduler, step=step,
                             key=key, history=history, run_id=tracker.run_id)
        if isinstance(e, KeyboardInterrupt):
            status = "KILLED"
        raise
    finally:
        stop.restore()
        bar.close()
        if status != "FINISHED":
            tracker.finish(status)
            _teardown(info, barrier=False)

    wall = time.perf_counter() - t0
    result = {
        "method": method.name,
        "mode": t.mode,
        "steps": step,
        "resumed_from_step": start_step,
        "final_loss": history[-1] if history else None,
        "loss_mean_last_10": float(np.mean(history[-10:])) if history else None,
        "images_per_step": t.batch_size,
        "labeled_per_step": n_labeled,
        "unlabeled_per_step": n_unlabeled,
        "samples_per_s": images_done / wall if images_done else None,
        "steps_per_s": (step - start_step) / wall if step > start_step else None,
        "wall_s": wall,
        "world_size": info.world_size,
        "unlabeled_epochs": step * n_unlabeled / max(sizes[UNLABELED], 1),
    }
    if info.rank == 0:
        # the method's flags as trained (overrides included), so that evaluation prompts the model
        # the way it was trained even when params/method/ or the evaluating config say otherwise
        save_sum_checkpoint(sam, cfg.model, paths.model, meta={"method": method.name, "steps": step,
                                                                "method_config": dataclasses.asdict(method),
                                                                "final_loss": result["final_loss"]})
        atomic_write_text(paths.metrics, json.dumps(result, indent=2) + "\n")
        tracker.log_metrics({"final_loss": result["final_loss"] or 0.0, "samples_per_s": result["samples_per_s"] or 0.0}, step)
        tracker.log_artifact(paths.model, artifact_path="model")
        tracker.log_artifact(paths.metrics, artifact_path="metrics")
        tracker.set_tags({MODEL_MD5_TAG: md5_file(paths.model)})  # how `sum register` finds this run
    tracker.finish("FINISHED")
    _teardown(info)
    return result


def forward_autocast(precision: str, device: torch.device, mode: str):
    """The forward's autocast context (spec A2: bf16; losses stay fp32, see `to_loss_frame`).

    ``auto``: bf16 on CUDA, and on a CPU with native bf16 (avx512_bf16 / AMX) in ``decoder``
    mode, where the decoder's matmuls run 1.6x faster (measured on MobileSAM's decoder, 4 masks,
    forward + backward: 0.50 s fp32, 0.31 s bf16); fp32 elsewhere. ``bf16`` / ``fp32`` force it.

    Raises:
      ValueError: naming ``train.precision`` for another value.
    """
    from sum.model.fast import _cpu_has_native_bf16

    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision: {precision!r} is not one of auto, bf16, fp32")
    bf16 = precision == "bf16" or (
        precision == "auto" and (device.type == "cuda" or (mode == "decoder" and _cpu_has_native_bf16()))
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _teardown(info: DistInfo, barrier: bool = True) -> None:
    if info.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
