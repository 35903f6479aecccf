"""Data-parallel training under ``torchrun``: process group, rank helpers, all-reduces.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised from the environment:
NCCL on GPUs, Gloo on CPU; one code path from 1 CPU process to many GPUs. The data-parallel logic
is DDP's, written out: weights broadcast from rank 0 at the start (`broadcast_parameters`), one
bucketed gradient all-reduce per step (`sync_gradients`), the step's statistics and the stop flag
summed in one all-reduce (`reduce_metrics`). The ``DistributedDataParallel`` wrapper is not used
because its reducer expects one backward per forward, and the rounds back-propagate one at a time
(`sum.train.rounds.forward_backward`): seven rounds of up to 30 masks each would otherwise hold
seven decoder graphs at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from sum.model.checkpoint import resolve_device

Tensor = torch.Tensor


@dataclass
class DistInfo:
    """Where this process stands: its rank of ``world_size``, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this call initialised the process group (and so tears it down)


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Init the process group from ``torchrun``'s environment (NCCL on GPU, Gloo on CPU); 1 process
    without it."""
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


def broadcast_parameters(sam: nn.Module, info: DistInfo) -> None:
    """Start every rank from rank 0's weights (what DDP does at construction)."""
    if info.world_size > 1:
        for t in sam.state_dict().values():
            dist.broadcast(t, src=0)


def sync_gradients(params: Sequence[nn.Parameter], info: DistInfo, bucket_numel: int = 2**24) -> None:
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


def teardown(info: DistInfo, barrier: bool = True) -> None:
    """Leave the process group if this run initialised it (``barrier``: after every rank)."""
    if info.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
