"""Training batches: labeled/pseudo-labeled mixing, mask selection and the frames targets live in
(spec §3.5, §3.7, §8.1, §13 A1, A9, A10).

**Mixing (spec §8.1, A1).** Every step draws a *global* batch of ``batch_size`` images: the first
``n_labeled = batch_size − n_unlabeled`` slots from the labeled pool, the rest from the
pseudo-labeled pool, ``n_unlabeled = round(batch_size · unlabeled_fraction)`` (1:1 mixing is
0.5). Each pool is read in epochs, each epoch a fresh permutation. Which image fills slot ``j`` of
step ``t`` is a pure function of ``(seed, t, j)``, and so is the generator that draws its masks
and prompts (`slot_generator`): a step computes the same thing on 1 process or on many, and a
resumed run continues exactly where it stopped without any sampler state. Rank ``r`` of ``W``
takes slots ``r, r + W, ...`` (`rank_slots`), so with 1:1 mixing every rank sees both kinds.

**Frames (spec §3.5, §3.7, A10, A14).** The image is resized as SAM does (``ResizeLongestSide``
to the model's ``img_size``, no augmentation) and the prompts live in that input frame. Targets,
certainty and the loss live in the *loss frame*: the padded ``loss_size²`` square
(``img_size`` by default: 1024² for SAM, A10) cropped to the valid (un-padded) region, so the
padding is never scored and no click lands in it (§6.4 [REC]). Masks are resized with nearest
neighbour (the released loader's ``F.interpolate(mode='nearest')``), u bilinearly; c = 1 − u.

**A rank's step.** `load_items` reads a rank's slots, `to_device` moves them to its device and
`cached_features` reads their image embeddings (decoder mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

LABELED = "labeled"
UNLABELED = "unlabeled"


@dataclass
class Pool:
    """The datasets of one source kind, read as one list of images.

    Attributes:
      kind: ``labeled`` (human masks, their dataset's task id) or ``unlabeled`` (pseudo labels,
        task id 0, spec §3.6).
      datasets: (name, `SegDataset`) pairs; the name keys the embedding cache.
    """

    kind: str
    datasets: List[Tuple[str, object]]

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(ds) for _, ds in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> Tuple[str, object, int]:
        """(dataset name, dataset, index in it) of pool image ``i``."""
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        name, ds = self.datasets[d]
        return name, ds, i - int(self.offsets[d])


@dataclass(frozen=True)
class Slot:
    """One image of a global batch: which pool, which pool image, which epoch of that pool."""

    slot: int
    kind: str
    index: int
    epoch: int


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


_KIND_SALT = {LABELED: 1, UNLABELED: 2}


@lru_cache(maxsize=16)
def _permutation(seed: int, kind: str, epoch: int, n: int) -> Tuple[int, ...]:
    g = torch.Generator().manual_seed(_seed(seed, _KIND_SALT[kind], epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


def split_batch(batch_size: int, unlabeled_fraction: float, has_unlabeled: bool) -> Tuple[int, int]:
    """(labeled, unlabeled) images per global batch (spec §8.1, A1: 20 + 20 of 40 for 1:1)."""
    if batch_size < 1:
        raise ValueError(f"train.batch_size={batch_size}: expected at least 1 image per step")
    if not 0.0 <= unlabeled_fraction <= 1.0:
        raise ValueError(f"train.unlabeled_fraction={unlabeled_fraction}: expected a fraction in [0, 1]")
    n_unl = int(round(batch_size * unlabeled_fraction)) if has_unlabeled else 0
    return batch_size - n_unl, n_unl


def global_batch(
    step: int, batch_size: int, n_labeled: int, pool_sizes: dict, seed: int
) -> List[Slot]:
    """The slots of step ``step`` (0-based): ``n_labeled`` labeled then the rest unlabeled, each
    pool read in per-epoch permutations (module docstring)."""
    out = []
    per_step = {LABELED: n_labeled, UNLABELED: batch_size - n_labeled}
    for j in range(batch_size):
        kind = LABELED if j < n_labeled else UNLABELED
        n = pool_sizes[kind]
        if n == 0:
            raise ValueError(f"step {step}: the {kind} pool is empty but the batch asks for {kind} images")
        position = step * per_step[kind] + (j if kind == LABELED else j - n_labeled)
        epoch, offset = divmod(position, n)
        out.append(Slot(j, kind, _permutation(seed, kind, epoch, n)[offset], epoch))
    return out


def rank_slots(slots: Sequence[Slot], rank: int, world_size: int) -> List[Slot]:
    """This rank's share of a global batch: slots ``rank, rank + W, ...``."""
    return list(slots[rank::world_size])


def slot_generator(seed: int, step: int, slot: int, device="cpu") -> torch.Generator:
    """The generator of one image of one step: mask selection, prompt type, jitter, clicks.

    A function of (seed, step, slot) only, never of the rank, so that W processes draw what one
    process draws for the same global batch, and a resumed run draws what it would have drawn.
    """
    return torch.Generator(device=device).manual_seed(_seed(seed, step, slot, 0x5EED))


@dataclass
class TrainItem:
    """One image of a step, ready for the interactive rounds.

    Attributes:
      slot: position in the global batch.
      dataset, image_id: where it comes from (keys the embedding cache).
      task_id: task prompt id of round 1 (source dataset's id; 0 for pseudo labels, spec §3.6).
      is_pseudo: True for pseudo-labeled images.
      original_hw: (H, W) of the image.
      input_hw: (h, w) after ``ResizeLongestSide(img_size)``, the frame of the prompts.
      image_3hw: the resized uint8 image (3, h, w), only when the encoder runs (full mode).
      masks_k1hw: bool targets in the loss frame, cropped to the valid region, (K, 1, hl, wl).
      certainty_k1hw: c = 1 − u in the loss frame (K, 1, hl, wl) float32, or None (labeled data,
        or pseudo labels without uncertainty maps).
      boxes_k4: tight boxes of the targets in the input frame, xyxy float32 (K, 4).
      ann_ids: the K annotation ids.
      frame_scale: input-frame pixels per loss-frame pixel (img_size / loss_size).
    """

    slot: int
    dataset: str
    image_id: str
    task_id: int
    is_pseudo: bool
    original_hw: Tuple[int, int]
    input_hw: Tuple[int, int]
    image_3hw: Optional[torch.Tensor]
    masks_k1hw: torch.Tensor
    certainty_k1hw: Optional[torch.Tensor]
    boxes_k4: torch.Tensor
    ann_ids: List[str]
    frame_scale: float

    @property
    def n_masks(self) -> int:
        return int(self.masks_k1hw.shape[0])

    def pin_memory(self) -> "TrainItem":
        """The item with its tensors in page-locked memory (the DataLoader's ``pin_memory``)."""
        return dataclasses.replace(
            self,
            image_3hw=None if self.image_3hw is None else self.image_3hw.pin_memory(),
            masks_k1hw=self.masks_k1hw.pin_memory(),
            certainty_k1hw=None if self.certainty_k1hw is None else self.certainty_k1hw.pin_memory(),
            boxes_k4=self.boxes_k4.pin_memory(),
        )


def choose_masks(k: int, max_masks: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``max_masks`` of K mask indices, uniformly without replacement, sorted (spec A9, §3.5
    ``select_and_sort``; the paper's main recipe: up to 30 per image)."""
    if max_masks <= 0 or k <= max_masks:
        return torch.arange(k)
    return torch.randperm(k, generator=generator)[:max_masks].sort().values


def to_loss_frame(maps_khw: np.ndarray, valid_hw: Tuple[int, int], mode: str) -> torch.Tensor:
    """(K, H, W) maps at the original resolution -> (K, 1, hl, wl) on the valid region of the loss
    frame; ``nearest`` for masks, ``bilinear`` for u."""
    x = torch.from_numpy(np.ascontiguousarray(maps_khw, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) == tuple(valid_hw):
        return x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=tuple(valid_hw), mode=mode, **kwargs)


def prepare_item(
    sample,
    *,
    slot: int,
    dataset: str,
    is_pseudo: bool,
    img_size: int,
    loss_size: int,
    max_masks: int,
    generator: torch.Generator,
    keep_image: bool,
) -> TrainItem:
    """A `sum.data.sample.Sample` -> a `TrainItem` (module docstring, spec §3.5, §3.7, A9, A10).

    Masks beyond ``max_masks`` are dropped at random (`choose_masks`); masks that are empty in the
    loss frame are dropped too (they cannot be prompted, spec A8).
    """
    h0, w0 = (int(s) for s in sample.image.shape[:2])
    if sample.masks.shape[1:] != (h0, w0):
        raise ValueError(f"{sample.path}: masks are {sample.masks.shape[1:]}, image is {h0}x{w0}")
    if sample.uncertainty is not None and sample.uncertainty.shape != sample.masks.shape:
        raise ValueError(
            f"{sample.path}: uncertainty has shape {sample.uncertainty.shape}, masks {sample.masks.shape}"
        )
    keep = choose_masks(len(sample.masks), max_masks, generator).numpy()
    input_hw = ResizeLongestSide.get_preprocess_shape(h0, w0, img_size)
    valid_hw = ResizeLongestSide.get_preprocess_shape(h0, w0, loss_size)
    masks_k1hw = to_loss_frame(sample.masks[keep], valid_hw, "nearest") > 0.5
    certainty = None
    if is_pseudo and sample.uncertainty is not None:
        u_k1hw = to_loss_frame(sample.uncertainty[keep], valid_hw, "bilinear")
        certainty = (1.0 - u_k1hw).clamp(0.0, 1.0)
    boxes = ResizeLongestSide(img_size).apply_boxes(np.asarray(sample.boxes, np.float32)[keep].reshape(-1, 4), (h0, w0))
    nonempty = masks_k1hw.flatten(1).any(dim=1)
    image = None
    if keep_image:
        resized = ResizeLongestSide(img_size).apply_image(sample.image)
        image = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).contiguous()
    return TrainItem(
        slot=slot,
        dataset=dataset,
        image_id=str(sample.image_id),
        task_id=0 if is_pseudo else int(sample.task_id),
        is_pseudo=is_pseudo,
        original_hw=(h0, w0),
        input_hw=tuple(int(s) for s in input_hw),
        image_3hw=image,
        masks_k1hw=masks_k1hw[nonempty],
        certainty_k1hw=None if certainty is None else certainty[nonempty],
        boxes_k4=torch.as_tensor(boxes, dtype=torch.float32)[nonempty],
        ann_ids=[sample.ann_ids[j] for j, ok in zip(keep, nonempty.tolist()) if ok],
        frame_scale=img_size / loss_size,
    )


def load_items(
    slots: Sequence[Slot],
    pools: dict,
    *,
    step: int,
    seed: int,
    img_size: int,
    loss_size: int,
    max_masks: int,
    keep_images: bool,
) -> List[Tuple[TrainItem, torch.Generator]]:
    """Load and prepare this rank's images of a step; each with its slot generator, which the
    interactive rounds go on drawing from."""
    out = []
    for s in slots:
        name, ds, i = pools[s.kind].locate(s.index)
        if hasattr(ds, "set_epoch"):  # PseudoLabelDataset re-draws its mask selection per epoch
            ds.set_epoch(s.epoch)
        generator = slot_generator(seed, step, s.slot)
        item = prepare_item(
            ds[i],
            slot=s.slot,
            dataset=name,
            is_pseudo=s.kind == UNLABELED,
            img_size=img_size,
            loss_size=loss_size,
            max_masks=max_masks,
            generator=generator,
            keep_image=keep_images,
        )
        out.append((item, generator))
    return out


def to_device(items: Sequence[Tuple[TrainItem, torch.Generator]], device: torch.device):
    """Move the items' tensors to ``device`` (asynchronously from pinned memory); a CUDA run draws
    from a CUDA generator seeded by the image's CPU generator."""
    if device.type == "cpu":
        return list(items)
    out = []
    for item, g in items:
        moved = dataclasses.replace(
            item,
            masks_k1hw=item.masks_k1hw.to(device, non_blocking=True),
            certainty_k1hw=None if item.certainty_k1hw is None else item.certainty_k1hw.to(device, non_blocking=True),
            boxes_k4=item.boxes_k4.to(device, non_blocking=True),
        )
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        out.append((moved, torch.Generator(device=device).manual_seed(seed)))
    return out


def cached_features(embeddings, items: Sequence[Tuple[TrainItem, torch.Generator]], device) -> torch.Tensor:
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
