"""Pseudo labels on disk, sharded (spec §3.3-3.5); `sum.pseudo.dataset.PseudoLabelDataset` reads
them as a training dataset.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from sum.io import atomic_path, atomic_write_text, check_format

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


def read_tagged_json(path: Path, expected: str, readable: str, what: str) -> dict:
    """The JSON document at ``path``, checked for its format tag ``expected``.

    Raises:
      ValueError: "{path}: not a readable {readable} (...)" when it does not parse, else
        `sum.io.check_format`'s error saying it is not ``what``.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable {readable} ({type(e).__name__})") from None
    return check_format(doc, expected, path, what)


def read_npz(path: Path, what: str, read: Callable[[Any], Any]) -> Any:
    """``read`` of the npz archive at ``path`` (opened without pickles).

    Raises:
      ValueError: "{path}: not a readable {what} (...)" when it does not open or lacks a key.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__})") from None


def read_shard_json(pseudo_dir: str | os.PathLike, dataset: str, shard: int) -> dict:
    """The json of one shard, checked for format and shard number.

    Raises:
      FileNotFoundError, ValueError: naming the file.
    """
    json_path, _ = shard_paths(pseudo_dir, dataset, shard)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: pseudo-label shard not found")
    doc = read_tagged_json(json_path, SHARD_FORMAT, "pseudo-label shard", "a pseudo-label shard")
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
    return read_npz(npz_path, "logits archive", lambda z: z["logits"])


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
