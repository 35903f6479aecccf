"""The pseudo labels of one dataset as a training dataset (spec §3.3-3.5): the shards of
`sum.pseudo.store` read back with the §3.5 filters applied at read time, and, optionally, the
uncertainty maps of each pseudo label brought to the image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from sum.data import formats
from sum.data.sample import Problem, SegDataset, Sample
from sum.model.lowres import upsample_low_res
from sum.pseudo.store import keep_by_ratio, list_shards, read_npz, read_shard_json, select_masks, shard_paths, shard_stem


def _input_size(h: int, w: int, img_size: int) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape`` (kept here so reading needs no segment_anything)."""
    scale = img_size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class PseudoLabelDataset(SegDataset):
    """The pseudo labels of one dataset as a `SegDataset` (spec §3.3-3.5).

    Samples hold the original image, the binary pseudo labels decoded from RLE at the original
    resolution (``1[s > 0]``, spec §3.3) and, with ``uncertainty_dir``, their uncertainty maps u.

    The §3.5 filters run here, at read time: at construction every mask must pass
    `keep_by_ratio`, and images left without a mask are dropped (the released loader draws
    another image instead); on each `load`, `select_masks` keeps at most ``max_masks``, drawn with
    a generator seeded by (``seed``, epoch, index), so a sample is reproducible and changes with
    `set_epoch`.

    Uncertainty maps are read from ``<uncertainty_dir>/<dataset>/shard-XXXXX.npz`` (``u`` uint8
    (M, h, w) in ``logit_index`` order, u = value / 255) and upsampled by `upsample_low_res`. A
    mask below ``min_refine_ratio`` gets u = 0 (treated as certain, spec §3.5).

    Arguments:
      images_dir: the folder the ``file_name`` fields are relative to.
      pseudo_dir: the pseudo-label folder (``<pseudo_dir>/<dataset>/shard-*.json``).
      dataset: the dataset name.
      task: task name or id of the samples; pseudo labels are task "unspecified" (id 0, §3.3).
      uncertainty_dir: folder of the uncertainty maps, or None (``uncertainty`` stays None).
      min_ratio, max_ratio, max_masks: spec §3.5 (README values 100, 0.95; code default 40 masks).
      min_refine_ratio: spec §3.5, 100.
      seed: seed of the mask selection.

    Raises:
      FileNotFoundError: naming the folder when it holds no complete shard.
      ValueError: naming the file when shards were made under different configs.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        pseudo_dir: str | os.PathLike,
        dataset: str,
        task: str | int = "unspecified",
        uncertainty_dir: str | os.PathLike | None = None,
        min_ratio: float = 100.0,
        max_ratio: float = 0.95,
        max_masks: Optional[int] = 40,
        min_refine_ratio: float = 100.0,
        seed: int = 0,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.pseudo_dir = Path(pseudo_dir)
        self.name = dataset
        self.task = task
        self.source = str(self.pseudo_dir / dataset)
        self.uncertainty_dir = Path(uncertainty_dir) if uncertainty_dir is not None else None
        self.min_ratio, self.max_ratio, self.max_masks = min_ratio, max_ratio, max_masks
        self.min_refine_ratio = min_refine_ratio
        self.seed = int(seed)
        self.epoch = 0
        shards = list_shards(pseudo_dir, dataset)
        if not shards:
            raise FileNotFoundError(f"{self.source}: no pseudo-label shards (run `sumseg pseudolabel`)")
        self.images: list[dict] = []  # image record + "shard", "annotations" (ratio-filtered), "img_size"
        self.n_masks = self.n_kept = 0
        config_hash = None
        for shard in shards:
            doc = read_shard_json(pseudo_dir, dataset, shard)
            if config_hash is not None and doc["config_hash"] != config_hash:
                path, _ = shard_paths(pseudo_dir, dataset, shard)
                raise ValueError(f"{path}: config_hash {doc['config_hash'][:12]}... differs from the other shards' {config_hash[:12]}...")
            config_hash = doc["config_hash"]
            img_size = int(doc.get("img_size", 1024))
            for img in doc["images"]:
                kept = [a for a in img["annotations"] if self._keep(a, img_size)]
                self.n_masks += len(img["annotations"])
                self.n_kept += len(kept)
                if kept:
                    self.images.append({**img, "annotations": kept, "shard": shard, "img_size": img_size})
        self.config_hash = config_hash
        self._u_cache: tuple[int, np.ndarray] | None = None

    def _keep(self, ann: dict, img_size: int) -> bool:
        _, _, cw, ch = ann["crop_box"]
        return keep_by_ratio(ann["area"], cw, ch, self.min_ratio, self.max_ratio, img_size)

    def set_epoch(self, epoch: int) -> None:
        """Draw another selection of ``max_masks`` per image (spec §3.5: re-drawn per access)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[str]:
        return [img["image_id"] for img in self.images]

    def image_path(self, i: int) -> Path:
        return self.images_dir / self.images[i]["file_name"]

    def annotation_ids(self, i: int) -> list[str]:
        """Ids of the masks of image ``i`` that pass the ratio filters (before `select_masks`)."""
        return [str(a["id"]) for a in self.images[i]["annotations"]]

    def selected(self, i: int, skip_ann_ids: Iterable[str] = ()) -> list[dict]:
        """The annotations `load` uses for image ``i`` at the current epoch."""
        skip = set(skip_ann_ids)
        anns = [a for a in self.images[i]["annotations"] if str(a["id"]) not in skip]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return select_masks(anns, self.max_masks, rng)

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        img = self.images[i]
        path = self.image_path(i)
        image = formats.read_image(path)
        h, w = image.shape[:2]
        if (h, w) != (int(img["height"]), int(img["width"])):
            raise ValueError(f"{path}: image is {h}x{w}, {self._json(i)} says {img['height']}x{img['width']}")
        anns = self.selected(i, skip_ann_ids)
        masks = [formats.segmentation_to_mask(a["segmentation"], h, w, where=f"{self._json(i)}: annotation {a['id']}") for a in anns]
        masks_khw = np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), bool)
        sample = Sample(
            image_id=str(img["image_id"]),
            image=image,
            masks=masks_khw,
            boxes=formats.masks_to_boxes(masks_khw),
            ann_ids=[str(a["id"]) for a in anns],
            task_id=self.task_id,
            path=str(path),
        )
        if self.uncertainty_dir is not None:
            sample.uncertainty = self._uncertainty(i, anns, (h, w))
        return sample

    def _json(self, i: int) -> Path:
        return shard_paths(self.pseudo_dir, self.name, self.images[i]["shard"])[0]

    def uncertainty_path(self, shard: int) -> Path:
        return self.uncertainty_dir / self.name / f"{shard_stem(shard)}.npz"

    def _uncertainty(self, i: int, anns: list[dict], size: tuple[int, int]) -> np.ndarray:
        img = self.images[i]
        shard = img["shard"]
        if self._u_cache is None or self._u_cache[0] != shard:
            path = self.uncertainty_path(shard)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: uncertainty maps of pseudo-label shard {shard} not found")
            self._u_cache = (shard, read_npz(path, "uncertainty archive with 'u'", lambda z: z["u"]))
        u_mhw = self._u_cache[1]
        rows = [a["logit_index"] for a in anns]
        if rows and max(rows) >= len(u_mhw):
            worst = anns[rows.index(max(rows))]["id"]
            raise ValueError(f"{self.uncertainty_path(shard)}: {len(u_mhw)} maps, mask {worst} needs row {max(rows)}")
        u = u_mhw[rows].astype(np.float32) / 255.0
        img_size = img["img_size"]
        u = upsample_low_res(u, img_size, _input_size(size[0], size[1], img_size), size)
        for k, a in enumerate(anns):
            _, _, cw, ch = a["crop_box"]
            if not keep_by_ratio(a["area"], cw, ch, self.min_refine_ratio, float("inf"), img_size):
                u[k] = 0.0
        return u

    def problems(self, i: int) -> list[Problem]:
        image, out = self.checked_image(i, self.images[i], self._json(i).name)
        if image is None:
            return out
        img, (h, w) = self.images[i], image.shape[:2]
        for a in img["annotations"]:
            reason = formats.rle_problem(a["segmentation"])
            if reason is None and tuple(a["segmentation"]["size"]) != (h, w):
                reason = f"RLE size {a['segmentation']['size']}, image is {h}x{w}"
            if reason is not None:
                out.append(Problem(str(self._json(i)), "bad_segmentation", reason, index=i, ann_id=str(a["id"])))
        return out

    def dataset_problems(self) -> list[Problem]:
        out = super().dataset_problems()
        seen: set = set()
        for i, img in enumerate(self.images):
            if img["image_id"] in seen:
                out.append(Problem(str(self._json(i)), "duplicate_image_id", f"duplicate image id {img['image_id']}", index=i))
            seen.add(img["image_id"])
        return out
