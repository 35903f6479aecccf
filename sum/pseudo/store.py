"""Pseudo labels on disk, sharded, and the dataset that reads them (spec §3.3-3.5).

Layout, per dataset, ``<pseudo_dir>/<dataset>/``:

- ``shard-00000.json``: ``{"format", "shard", "config_hash", "dataset", "img_size", "images":
  [{"image_id", "file_name", "height", "width", "annotations": [...]}], "inputs_hash"}``. An annotation is an
  SA-1B record of the automatic mask generator (`sum.pseudo.amg.MaskGenerator`): ``id`` (unique
  in the dataset), ``segmentation`` (COCO RLE at the original resolution), ``area``, ``bbox``
  (XYWH), ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box`` (XYWH), and
  ``logit_index``, its row in the shard's logits.
- ``shard-00000.npz``: ``logits`` float16 (M, 256, 256), SAM's low-res logits ``s`` of each kept
  mask in the padded 1024 frame, in ``logit_index`` order. The spec's release stores 8-bit
  probabilities at full resolution (§3.4); float16 logits are the documented deviation of §13 A7.
  The archive is written with fixed timestamps, so equal arrays give equal bytes.

`write_shard` writes both files under temporary names and renames the npz first and the json
last: a shard whose json exists is complete. Mask ids are ``position * MASK_ID_STRIDE + k + 1``
(``position`` the image's index in its dataset), so they do not depend on how shards are scheduled.

Filters (spec §3.5) are applied **at read time**, as the released loader does, so the stored
shards are the generator's whole output and the filters can change without regenerating:
`keep_by_ratio` (``min_ratio``, ``max_ratio``, the paper's ">= 95 % of the image" rule) when
`PseudoLabelDataset` is built, `select_masks` (at most ``max_masks`` chosen uniformly at random
without replacement, sorted by id) each time a sample is loaded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sum.data import formats
from sum.data.sample import Problem, SegDataset, Sample
from sum.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

SHARD_FORMAT = "sum-pseudo-shard/1"
MASK_ID_STRIDE = 100_000  # > the most masks one image can get (32x32 points x 3 outputs x 21 crops)
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.json$")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# SA-1B record fields kept in the json, in this order; ``low_res_logits`` goes to the npz
RECORD_FIELDS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")


def shard_stem(shard: int) -> str:
    return f"shard-{int(shard):05d}"


def shard_paths(pseudo_dir: str | os.PathLike, dataset: str, shard: int) -> tuple[Path, Path]:
    """(json, npz) of one shard."""
    folder = Path(pseudo_dir) / dataset
    return folder / f"{shard_stem(shard)}.json", folder / f"{shard_stem(shard)}.npz"


def list_shards(pseudo_dir: str | os.PathLike, dataset: str) -> list[int]:
    """Numbers of the complete shards (json present) of a dataset, ascending."""
    folder = Path(pseudo_dir) / dataset
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name)))


@dataclass
class ShardImage:
    """One image of a shard and the generator's records for it.

    Attributes:
      image_id: id in the dataset (str).
      file_name: path relative to the dataset's image folder.
      height, width: original size.
      position: index of the image in its dataset (makes mask ids unique in the dataset).
      records: `MaskGenerator` records, each with ``low_res_logits`` (h, w) float16.
    """

    image_id: str
    file_name: str
    height: int
    width: int
    position: int
    records: list[dict] = field(default_factory=list)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez_compressed`` with fixed zip timestamps (equal arrays, equal bytes), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                zf.writestr(info, buf.getvalue(), compresslevel=1)
    return path


def write_shard(
    pseudo_dir: str | os.PathLike,
    dataset: str,
    shard: int,
    config_hash: str,
    images: Sequence[ShardImage],
    logits_hw: tuple[int, int] = (256, 256),
    img_size: int = 1024,
    inputs_hash: Optional[str] = None,
) -> Path:
    """Write one shard (module docstring): the npz, then the json, each atomically.

    Arguments:
      pseudo_dir, dataset, shard: where (``<pseudo_dir>/<dataset>/shard-XXXXX.*``).
      config_hash: hash of everything the masks depend on (`sum.pseudo.run.config_hash`).
      images: the shard's images with their generator records, in dataset order.
      logits_hw: (h, w) of the low-res logits (4x the embedding; 256x256 for SAM), for empty shards.
      img_size: the model's padded input size the logits are a low-res view of.
      inputs_hash: hash of the shard's images (`sum.pseudo.run.inputs_hash`), stored when given.

    Returns:
      the json path.

    Raises:
      ValueError: naming the image when a record lacks ``low_res_logits`` or has too many masks.
    """
    json_path, npz_path = shard_paths(pseudo_dir, dataset, shard)
    logits, out_images = [], []
    for img in images:
        if len(img.records) >= MASK_ID_STRIDE:
            n = len(img.records)
            raise ValueError(f"{json_path}: image {img.image_id!r} has {n} masks, at most {MASK_ID_STRIDE - 1} fit the id scheme")
        anns = []
        for k, rec in enumerate(img.records):
            if "low_res_logits" not in rec:
                raise ValueError(f"{json_path}: image {img.image_id!r} mask {k} has no 'low_res_logits'")
            s_hw = np.asarray(rec["low_res_logits"], dtype=np.float16)
            if s_hw.shape != tuple(logits_hw):
                raise ValueError(f"{json_path}: image {img.image_id!r} mask {k} logits are {s_hw.shape}, expected {tuple(logits_hw)}")
            ann = {"id": int(img.position) * MASK_ID_STRIDE + k + 1}
            ann.update({key: _plain(rec[key]) for key in RECORD_FIELDS})
            ann["logit_index"] = len(logits)
            logits.append(s_hw)
            anns.append(ann)
        out_images.append(
            {
                "image_id": str(img.image_id),
                "file_name": str(img.file_name),
                "height": int(img.height),
                "width": int(img.width),
                "annotations": anns,
            }
        )
    logits_mhw = np.stack(logits) if logits else np.zeros((0, *logits_hw), np.float16)
    doc = {
        "format": SHARD_FORMAT,
        "shard": int(shard),
        "config_hash": config_hash,
        "dataset": dataset,
        "img_size": int(img_size),
        "images": out_images,
    }
    if inputs_hash is not None:
        doc["inputs_hash"] = inputs_hash
    write_npz(npz_path, logits=logits_mhw)
    atomic_write_text(json_path, json.dumps(doc, separators=(",", ":")) + "\n")  # last: marks the shard complete
    return json_path


def _plain(value: Any) -> Any:
    """JSON-safe copy of a record field (numpy scalars and arrays, bytes RLE counts)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("ascii")
    return value


def read_shard_json(pseudo_dir: str | os.PathLike, dataset: str, shard: int) -> dict:
    """The json of one shard, checked for format and shard number.

    Raises:
      FileNotFoundError, ValueError: naming the file.
    """
    json_path, _ = shard_paths(pseudo_dir, dataset, shard)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: pseudo-label shard not found")
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{json_path}: not a readable pseudo-label shard ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != SHARD_FORMAT:
        raise ValueError(f"{json_path}: not a pseudo-label shard (expected format {SHARD_FORMAT!r})")
    if doc.get("shard") != int(shard):
        raise ValueError(f"{json_path}: holds shard {doc.get('shard')!r}, expected {int(shard)}")
    return doc


def read_logits(pseudo_dir: str | os.PathLike, dataset: str, shard: int) -> np.ndarray:
    """The shard's ``logits`` (M, h, w) float16.

    Raises:
      FileNotFoundError, ValueError: naming the npz.
    """
    _, npz_path = shard_paths(pseudo_dir, dataset, shard)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: pseudo-label logits not found")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            return z["logits"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{npz_path}: not a readable logits archive ({type(e).__name__})") from None


def read_shard(pseudo_dir: str | os.PathLike, dataset: str, shard: int) -> tuple[dict, np.ndarray]:
    """(json document, logits (M, h, w) float16) of one shard; checks that every ``logit_index``
    has its row.

    Raises:
      FileNotFoundError, ValueError: naming the file.
    """
    doc = read_shard_json(pseudo_dir, dataset, shard)
    logits = read_logits(pseudo_dir, dataset, shard)
    n = sum(len(img["annotations"]) for img in doc["images"])
    if logits.ndim != 3 or logits.shape[0] != n:
        _, npz_path = shard_paths(pseudo_dir, dataset, shard)
        raise ValueError(f"{npz_path}: logits have shape {logits.shape}, the shard json lists {n} masks")
    return doc, logits


def iter_pseudo_labels(pseudo_dir: str | os.PathLike, dataset: str) -> Iterator[tuple[dict, list[dict], np.ndarray]]:
    """Every image of every complete shard, in shard order, unfiltered (all generator masks).

    Yields:
      (image record without ``annotations``, its annotations, their logits (M, h, w) float16
      in annotation order).
    """
    for shard in list_shards(pseudo_dir, dataset):
        doc, logits = read_shard(pseudo_dir, dataset, shard)
        for img in doc["images"]:
            anns = img["annotations"]
            record = {k: v for k, v in img.items() if k != "annotations"}
            yield record, anns, logits[[a["logit_index"] for a in anns]]


# ---- spec §3.5: which masks a training sample uses ---------------------------------------------


def keep_by_ratio(area: float, crop_w: float, crop_h: float, min_ratio: float, max_ratio: float, target_length: int = 1024) -> bool:
    """The released loader's mask filter (spec §3.5, ``filter_table``)::

        ratio       = area / (W_c * H_c)
        resize_area = area * (target_length / max(W_c, H_c))**2
        keep  <=>  resize_area >= 100 * min_ratio  and  ratio <= max_ratio

    Arguments:
      area: mask pixels at the original resolution.
      crop_w, crop_h: the crop box size (the image size for crop layer 0).
      min_ratio: 100 in the README's training command (>= 10,000 px at 1024 scale); 1 in code.
      max_ratio: 0.95, the paper's ">= 95 % of the image" rule.
      target_length: the long side of the training resolution, 1024 for SAM.
    """
    ratio = area / float(crop_w * crop_h)
    resize_area = area * (target_length / float(max(crop_w, crop_h))) ** 2
    return resize_area >= 100.0 * min_ratio and ratio <= max_ratio


def select_masks(annotations: Sequence[dict], max_masks: Optional[int], rng: np.random.Generator) -> list[dict]:
    """At most ``max_masks`` annotations, chosen uniformly at random without replacement and
    sorted by id (spec §3.5, ``select_and_sort``); all of them, sorted, when there are fewer."""
    anns = sorted(annotations, key=lambda a: a["id"])
    if max_masks is None or len(anns) <= max_masks:
        return anns
    pick = np.sort(rng.choice(len(anns), size=int(max_masks), replace=False))
    return [anns[j] for j in pick]


def upsample_low_res(maps_mhw: np.ndarray, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Low-res maps in the padded model frame -> original resolution, as ``Sam.postprocess_masks``
    does with logits: bilinear to (img_size, img_size), crop to the input size (the resized image
    before padding), bilinear to the original size (align_corners=False throughout).

    The released loader upsamples refined maps to 1024x1024 without the crop (spec §3.4 (b)) and
    so reads them in the padded frame; here they are put on the image, like the masks.

    Returns:
      (M, H, W) float32.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(maps_mhw, dtype=np.float32))[:, None]
    if x.shape[0] == 0:
        return np.zeros((0, *original_size), np.float32)
    x = F.interpolate(x, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x[:, 0].numpy()


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
            raise FileNotFoundError(f"{self.source}: no pseudo-label shards (run `sum pseudolabel`)")
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
            try:
                with np.load(path, allow_pickle=False) as z:
                    self._u_cache = (shard, z["u"])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                raise ValueError(f"{path}: not a readable uncertainty archive with 'u' ({type(e).__name__})") from None
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
        img = self.images[i]
        image, out = self._image_problem(i)
        if image is None:
            return out
        h, w = image.shape[:2]
        if (h, w) != (int(img["height"]), int(img["width"])):
            detail = f"image is {h}x{w}, {self._json(i).name} says {img['height']}x{img['width']}"
            return [Problem(str(self.image_path(i)), "image_size_mismatch", detail, index=i)]
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
