"""Training batches decoded ahead of the step: a ``torch.utils.data.DataLoader`` over steps.

`StepData` is what a rank loads for one step (its slots of the global batch, decoded, resized and
cropped by `sum.train.data.load_items`); `StepLoader` runs it in ``train.loader_workers`` worker
processes (0: on the main thread, when asked), with pinned memory on CUDA and persistent
workers, so that decoding the next batches overlaps the current step.

A batch is a pure function of (seed, step, slot) (`sum.train.data`), so the loader changes only
where it is computed: a worker hands back the items and the *state* of each image's generator,
and the main process rebuilds the generators from it; the masks, prompts and clicks drawn
downstream are those of the main-thread path (a test compares them). Steps are asked for in
order; asking for another step (a resumed run, a benchmark repeating a step) restarts the
workers' queue there. The loader's own random seed comes from a private generator, so the
global RNGs stay as they were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sum.train.data import Pool, TrainItem, global_batch, load_items, rank_slots

Batch = List[Tuple[TrainItem, torch.Generator]]


def loader_workers(asked: Optional[int], device: torch.device) -> int:
    """Worker processes for ``train.loader_workers``: the number asked (0 = the main thread), or
    `default_workers` for None.

    Raises:
      ValueError: naming ``train.loader_workers`` for a negative number.
    """
    if asked is None:
        return default_workers(os.cpu_count() or 1, device)
    if int(asked) < 0:
        raise ValueError(f"train.loader_workers={asked}: expected 0 (main thread), a positive count or null (auto)")
    return int(asked)


def default_workers(cpus: int, device: torch.device) -> int:
    """``train.loader_workers: null``: min(2, CPUs - 1) workers (none on a 1-core machine)."""
    return max(0, min(2, cpus - 1))


@dataclass
class StepData:
    """One rank's images of a step, loaded and prepared on the host (`load_items`)."""

    pools: Dict[str, Pool]
    batch_size: int
    n_labeled: int
    sizes: Dict[str, int]
    seed: int
    img_size: int
    loss_size: int
    max_masks: int
    keep_images: bool
    rank: int = 0
    world_size: int = 1

    def load(self, step: int) -> Batch:
        """This rank's (item, generator) pairs of ``step``, on the host."""
        slots = rank_slots(global_batch(step, self.batch_size, self.n_labeled, self.sizes, self.seed),
                           self.rank, self.world_size)
        return load_items(slots, self.pools, step=step, seed=self.seed, img_size=self.img_size,
                          loss_size=self.loss_size, max_masks=self.max_masks, keep_images=self.keep_images)


class _StepsDataset(Dataset):
    """step -> (items, their generators' states): what crosses from a worker to the trainer."""

    def __init__(self, data: StepData):
        self.data = data

    def __getitem__(self, step: int):
        batch = self.data.load(step)
        return [item for item, _ in batch], [g.get_state() for _, g in batch]


class _Steps(Sampler):
    """The steps ``start, start + 1, ..., end - 1``; ``start`` moves when the trainer jumps."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def _as_is(batch):
    return batch


class StepLoader:
    """`StepData` batches of steps ``0 .. end - 1`` from ``workers`` processes (module docstring);
    with 0 workers, or for a step past ``end``, loaded on the calling thread."""

    def __init__(self, data: StepData, end: int, workers: int, pin_memory: bool = False, prefetch: int = 2):
        self.data, self.end, self.workers = data, int(end), int(workers)
        self._steps = _Steps(0, self.end)
        self._loader = None
        if self.workers > 0:
            self._loader = DataLoader(
                _StepsDataset(data), batch_size=None, sampler=self._steps, num_workers=self.workers,
                collate_fn=_as_is, pin_memory=pin_memory, persistent_workers=True, prefetch_factor=prefetch,
                generator=torch.Generator().manual_seed(data.seed),
            )
        self._it = None
        self._next: Optional[int] = None

    def get(self, step: int) -> Batch:
        """This rank's (item, generator) pairs of ``step`` on the host (pinned on CUDA)."""
        if self._loader is None or not 0 <= step < self.end:
            return self.data.load(step)
        if self._it is None or step != self._next:
            self._steps.start = step
            self._it = iter(self._loader)  # persistent workers: the queue restarts at ``step``
        items, states = next(self._it)
        self._next = step + 1
        return [(item, torch.Generator().set_state(state)) for item, state in zip(items, states)]

    def close(self) -> None:
        """Stop the workers (the iterator's finaliser shuts them down)."""
        self._it = None
        self._loader = None
