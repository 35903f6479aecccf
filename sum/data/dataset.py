"""The one dataset interface for training and evaluation (spec §3).

A `SegDataset` yields `Sample`s: an RGB image, its K binary target masks, their tight boxes, the
annotation ids and the task id of the source (spec §3.6: tasks are assigned per source dataset).
Three readers cover the formats the data arrives in:

- `CocoDataset`: COCO instance JSON (polygons or RLE); ``iscrowd`` annotations are not targets;
- `MaskFolderDataset`: image + binary mask pairs of the HQSeg-44K folders (DIS5K ``im/``+``gt/``,
  ThinObject5K ``images_*``+``masks_*``, cascade_psp ``x.jpg``+``x.png`` in one folder), one
  mask per image, foreground ``> 128``;
- `Sa1bDataset`: SA-1B per-image JSON beside (or apart from) the images.

`build_dataset` turns a `DatasetConfig` into one of them. Each reader also says what is wrong
with a sample without building it (`problems`, `dataset_problems`), which `sum.data.validate`
uses, and can load a sample while skipping named annotations (`load`), which the validated view
of a dataset uses. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sum.config import DatasetConfig
from sum.data import formats
from sum.tasks import TASK_IDS
from sum.tasks import task_id as to_task_id


@dataclass
class Sample:
    """One image with its target masks.

    Attributes:
      image_id: unique within the dataset.
      image: (H, W, 3) uint8 RGB.
      masks: (K, H, W) bool.
      boxes: (K, 4) float32 xyxy tight boxes of ``masks`` (inclusive max pixel indices).
      ann_ids: K annotation ids, as strings.
      task_id: task prompt id of the source (0 unspecified, 1 salient, 2 entity, 3 part).
      path: the image file.
      uncertainty: (K, H, W) float32 uncertainty maps u, added by the uncertainty stage; None here.
    """

    image_id: str
    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    ann_ids: list[str]
    task_id: int
    path: str
    uncertainty: np.ndarray | None = None


@dataclass
class Problem:
    """Something wrong with a dataset, a sample or one annotation.

    ``index`` is the sample index (None: the whole dataset); ``ann_id`` None: the whole sample.
    """

    file: str
    reason: str  # a stable code: counts per reason go to the metrics JSON
    detail: str
    index: int | None = None
    ann_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: annotation {self.ann_id}" if self.ann_id is not None else self.file
        return f"{where}: {self.detail}"


def _sample(image_id: str, image: np.ndarray, masks: list[np.ndarray], ann_ids: list[str], task: int, path) -> Sample:
    h, w = image.shape[:2]
    masks_khw = np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), bool)
    return Sample(
        image_id=image_id,
        image=image,
        masks=masks_khw,
        boxes=formats.masks_to_boxes(masks_khw),
        ann_ids=list(ann_ids),
        task_id=task,
        path=str(path),
    )


def _bbox_problem(bbox, h: int, w: int, tol: float = 1.0) -> str | None:
    """xywh ``bbox`` field inside an h x w image (``tol`` px of float slack), else the reason."""
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not [x, y, w, h]"
    if not all(np.isfinite([x, y, bw, bh])) or bw < 0 or bh < 0:
        return f"bbox {bbox!r} has a negative or non-finite size"
    if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
        return f"bbox {[x, y, bw, bh]} lies outside the {h}x{w} image"
    return None


class SegDataset:
    """Base of every dataset reader: ``len``, indexing to `Sample`, ids, paths, task.

    Subclasses implement `__len__`, `image_ids`, `image_path`, `load`, `problems` and
    `dataset_problems`.
    """

    name: str = ""
    task: str | int = "unspecified"
    source: str = ""  # the file or folder that names this dataset in error messages

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.source}: index {i} out of range for {len(self)} samples")
        return self.load(i % len(self))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def image_ids(self) -> list[str]:
        raise NotImplementedError

    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    @property
    def task_id(self) -> int:
        """The task prompt id; ValueError naming the source when the task is unknown."""
        try:
            return to_task_id(self.task)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        """Sample ``i`` without the annotations named in ``skip_ann_ids``."""
        raise NotImplementedError

    def problems(self, i: int) -> list[Problem]:
        """What is wrong with sample ``i``: decodes the image once, checks annotation encodings."""
        raise NotImplementedError

    def dataset_problems(self) -> list[Problem]:
        """Problems of the whole set: unknown task, duplicate image or annotation ids."""
        out = []
        if self.task not in TASK_IDS and self.task not in TASK_IDS.values():
            out.append(
                Problem(self.source, "unknown_task", f"unknown task {self.task!r}: expected one of {sorted(TASK_IDS)}")
            )
        return out

    def annotation_ids(self, i: int) -> list[str]:
        """Ids of the annotations of sample ``i``, before any filtering (cheap: no decoding)."""
        raise NotImplementedError

    def _image_problem(self, i: int) -> tuple[np.ndarray | None, list[Problem]]:
        path = self.image_path(i)
        try:
            return formats.read_image(path), []
        except formats.ImageReadError as e:
            reason = "missing_image" if not Path(path).is_file() else "image_unreadable"
            return None, [Problem(str(path), reason, str(e).split(": ", 1)[-1], index=i)]


class DatasetView(SegDataset):
    """A dataset without some samples and some annotations (what validation in skip mode returns)."""

    def __init__(self, base: SegDataset, keep: Sequence[int], drop_ann_ids: dict[int, set[str]] | None = None):
        self.base = base
        self.keep = list(keep)
        self.drop = drop_ann_ids or {}
        self.name, self.task, self.source = base.name, base.task, base.source

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def image_ids(self) -> list[str]:
        ids = self.base.image_ids
        return [ids[j] for j in self.keep]

    def image_path(self, i: int) -> Path:
        return self.base.image_path(self.keep[i])

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        j = self.keep[i]
        return self.base.load(j, set(skip_ann_ids) | self.drop.get(j, set()))

    def problems(self, i: int) -> list[Problem]:
        j = self.keep[i]
        return [p for p in self.base.problems(j) if p.ann_id is None or p.ann_id not in self.drop.get(j, set())]

    def annotation_ids(self, i: int) -> list[str]:
        j = self.keep[i]
        return [a for a in self.base.annotation_ids(j) if a not in self.drop.get(j, set())]

    def dataset_problems(self) -> list[Problem]:
        return []


# ---------------------------------------------------------------------------------------------
# COCO


class CocoDataset(SegDataset):
    """COCO instance JSON (polygons, compressed or uncompressed RLE) over an image folder.

    Arguments:
      images_dir: folder the ``file_name`` fields are relative to.
      annotations_json: the COCO JSON.
      task: task name or id; None (or "unspecified" when the JSON's ``info.task`` names one) takes
        ``info.task`` from the JSON.
      include_crowd: ``iscrowd=1`` annotations mark groups, not instances; off by default.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_json: str | os.PathLike,
        task: str | int | None = None,
        name: str = "",
        include_crowd: bool = False,
    ):
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        self.source = str(self.annotations_json)
        self.coco = formats.load_coco(self.annotations_json)
        doc = self.coco.dataset
        file_task = (doc.get("info") or {}).get("task") if isinstance(doc.get("info"), dict) else None
        if task is None or (task == "unspecified" and file_task is not None):
            task = file_task if file_task is not None else "unspecified"
        self.task = task
        self.name = name or self.annotations_json.parent.name
        self.include_crowd = include_crowd
        self.images: list[dict] = list(doc["images"])
        self._anns: dict = defaultdict(list)  # image id -> annotations in file order
        for ann in doc["annotations"]:
            self._anns[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[str]:
        return [str(img["id"]) for img in self.images]

    def image_path(self, i: int) -> Path:
        return self.images_dir / self.images[i]["file_name"]

    def annotations(self, i: int) -> list[dict]:
        """The raw annotations of sample ``i`` (crowd annotations only if ``include_crowd``)."""
        anns = self._anns.get(self.images[i]["id"], [])
        return [a for a in anns if self.include_crowd or not a.get("iscrowd", 0)]

    def annotation_ids(self, i: int) -> list[str]:
        return [str(a["id"]) for a in self.annotations(i)]

    def _where(self, ann: dict) -> str:
        return f"{self.annotations_json}: annotation {ann['id']}"

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        skip = set(skip_ann_ids)
        img = self.images[i]
        path = self.image_path(i)
        image = formats.read_image(path)
        h, w = image.shape[:2]
        if (int(img["height"]), int(img["width"])) != (h, w):
            raise ValueError(f"{path}: image is {h}x{w}, {self.annotations_json} says {img['height']}x{img['width']}")
        masks, ids = [], []
        for ann in self.annotations(i):
            if str(ann["id"]) in skip:
                continue
            m = formats.segmentation_to_mask(ann.get("segmentation"), h, w, where=self._where(ann))
            if m.shape != (h, w):
                raise ValueError(f"{self._where(ann)}: mask is {m.shape[0]}x{m.shape[1]}, image {path} is {h}x{w}")
            masks.append(m)
            ids.append(str(ann["id"]))
        return _sample(str(img["id"]), image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        img = self.images[i]
        image, out = self._image_problem(i)
        if image is None:
            return out
        h, w = image.shape[:2]
        path = self.image_path(i)
        if (int(img["height"]), int(img["width"])) != (h, w):
            detail = f"image is {h}x{w}, {self.annotations_json.name} says {img['height']}x{img['width']}"
            return [Problem(str(path), "image_size_mismatch", detail, index=i)]
        for ann in self.annotations(i):
            out += _annotation_problems(ann, h, w, str(self.annotations_json), i, check_bbox="bbox" in ann)
        return out

    def dataset_problems(self) -> list[Problem]:
        out = super().dataset_problems()
        src = str(self.annotations_json)
        seen: set = set()
        for i, img in enumerate(self.images):
            if img["id"] in seen:
                detail = f"duplicate image id {img['id']} ({img['file_name']})"
                out.append(Problem(src, "duplicate_image_id", detail, index=i))
            seen.add(img["id"])
        seen_ann: set = set()
        index = {img["id"]: i for i, img in reversed(list(enumerate(self.images)))}
        for ann in self.coco.dataset["annotations"]:
            i = index.get(ann["image_id"])
            if ann["id"] in seen_ann:
                out.append(
                    Problem(
                        src, "duplicate_ann_id", f"duplicate annotation id {ann['id']}", index=i, ann_id=str(ann["id"])
                    )
                )
            seen_ann.add(ann["id"])
            if i is None:
                detail = f"refers to image id {ann['image_id']}, which is not in 'images'"
                out.append(Problem(src, "unknown_image_id", detail, ann_id=str(ann["id"])))
        return out


def _annotation_problems(ann: dict, h: int, w: int, file: str, i: int, check_bbox: bool) -> list[Problem]:
    """Encoding, size, emptiness and bbox of one COCO or SA-1B annotation, without decoding RLE."""
    aid = str(ann.get("id"))
    segm = ann.get("segmentation")
    if segm is None:
        return [Problem(file, "malformed_segmentation", "has no segmentation", index=i, ann_id=aid)]
    problem = formats.segmentation_problem(segm)
    if problem:
        reason = "malformed_polygon" if isinstance(segm, list) else "malformed_rle"
        return [Problem(file, reason, problem, index=i, ann_id=aid)]
    if isinstance(segm, dict):
        mh, mw = (int(v) for v in segm["size"])
        if (mh, mw) != (h, w):
            return [Problem(file, "mask_size_mismatch", f"mask is {mh}x{mw}, image is {h}x{w}", index=i, ann_id=aid)]
    if formats.segmentation_area(segm, h, w) == 0:
        return [Problem(file, "empty_mask", "mask is empty", index=i, ann_id=aid)]
    if check_bbox:
        problem = _bbox_problem(ann["bbox"], h, w)
        if problem:
            return [Problem(file, "bbox_outside_image", problem, index=i, ann_id=aid)]
    return []


# ---------------------------------------------------------------------------------------------
# mask folders (HQSeg-44K)


MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


class MaskFolderDataset(SegDataset):
    """Image + binary-mask pairs matched by file stem; one target mask per image (spec §3.1).

    Layouts: DIS5K ``im/`` + ``gt/``; ThinObject5K ``images_*`` + ``masks_*``; cascade_psp, where
    ``images_dir == masks_dir`` and image ``x.jpg`` sits beside mask ``x.png`` (then every PNG is a
    mask). Folders are not searched recursively. Foreground is ``> 128``.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        task: str | int = "salient",
        name: str = "",
        threshold: int = formats.MASK_THRESHOLD,
    ):
        self.images_dir = Path(images_dir)
        self.masks_dir = Path(masks_dir)
        self.source = str(self.masks_dir)
        self.task = task
        self.threshold = threshold
        same = self.images_dir.resolve() == self.masks_dir.resolve()
        image_exts = tuple(e for e in formats.IMAGE_EXTENSIONS if not (same and e == ".png"))
        self.images = formats.find_images(self.images_dir, image_exts)
        mask_files = formats.find_images(self.masks_dir, (".png",) if same else MASK_EXTENSIONS)
        self.masks: dict[str, Path] = {}
        for p in sorted(mask_files, key=lambda p: MASK_EXTENSIONS.index(p.suffix.lower())):
            self.masks.setdefault(p.stem, p)  # x.png wins over x.jpg when both are there
        self.name = name or (self.images_dir.name if same else self.images_dir.parent.name)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[str]:
        return [p.stem for p in self.images]

    def image_path(self, i: int) -> Path:
        return self.images[i]

    def mask_path(self, i: int) -> Path | None:
        return self.masks.get(self.images[i].stem)

    def annotation_ids(self, i: int) -> list[str]:
        return [self.images[i].stem] if self.mask_path(i) is not None else []

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        path = self.image_path(i)
        image = formats.read_image(path)
        h, w = image.shape[:2]
        sid = path.stem
        masks, ids = [], []
        mpath = self.mask_path(i)
        if mpath is None:
            raise FileNotFoundError(f"{path}: no mask {sid}.png in {self.masks_dir}")
        if sid not in set(skip_ann_ids):
            m = formats.read_binary_mask(mpath, self.threshold)
            if m.shape != (h, w):
                raise ValueError(f"{mpath}: mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
            masks, ids = [m], [sid]
        return _sample(sid, image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        image, out = self._image_problem(i)
        if image is None:
            return out
        h, w = image.shape[:2]
        path, sid = self.image_path(i), self.images[i].stem
        mpath = self.mask_path(i)
        if mpath is None:
            return [Problem(str(path), "missing_mask", f"no mask {sid}.* in {self.masks_dir}", index=i)]
        try:
            m = formats.read_binary_mask(mpath, self.threshold)
        except formats.ImageReadError as e:
            return [Problem(str(mpath), "mask_unreadable", str(e).split(": ", 1)[-1], index=i, ann_id=sid)]
        if m.shape != (h, w):
            detail = f"mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}"
            return [Problem(str(mpath), "mask_size_mismatch", detail, index=i, ann_id=sid)]
        if not m.any():
            return [Problem(str(mpath), "empty_mask", f"mask has no pixel > {self.threshold}", index=i, ann_id=sid)]
        return []

    def dataset_problems(self) -> list[Problem]:
        out = super().dataset_problems()
        seen: set = set()
        for i, p in enumerate(self.images):
            if p.stem in seen:
                out.append(Problem(str(p), "duplicate_image_id", f"duplicate image id {p.stem!r}", index=i))
            seen.add(p.stem)
        return out


# ---------------------------------------------------------------------------------------------
# SA-1B


class Sa1bDataset(SegDataset):
    """SA-1B: one ``<stem>.json`` per image (``{"image": {...}, "annotations": [...]}``) paired
    with the image file of the same stem in ``images_dir`` (which may be the JSON folder).

    Annotation ids need only be unique within an image.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        json_dir: str | os.PathLike,
        task: str | int = "unspecified",
        name: str = "",
    ):
        self.images_dir = Path(images_dir)
        self.json_dir = Path(json_dir)
        self.source = str(self.json_dir)
        self.task = task
        if not self.json_dir.is_dir():
            raise FileNotFoundError(f"{self.json_dir}: SA-1B JSON folder not found")
        self.jsons = sorted(p for p in self.json_dir.iterdir() if p.is_file() and p.suffix.lower() == ".json")
        self._images: dict[str, list[Path]] = defaultdict(list)
        for p in formats.find_images(self.images_dir):
            self._images[p.stem].append(p)
        self.name = name or self.json_dir.name
        self._cache: tuple[int, tuple[dict, list[dict]]] | None = None

    def __len__(self) -> int:
        return len(self.jsons)

    @property
    def image_ids(self) -> list[str]:
        return [p.stem for p in self.jsons]

    def image_path(self, i: int) -> Path:
        found = self._images.get(self.jsons[i].stem)
        return found[0] if found else self.images_dir / f"{self.jsons[i].stem}.jpg"

    def record(self, i: int) -> tuple[dict, list[dict]]:
        """(image info, annotations) of sample ``i`` (the last one read is cached)."""
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, formats.read_sa1b_json(self.jsons[i]))
        return self._cache[1]

    def annotation_ids(self, i: int) -> list[str]:
        try:
            return [str(a.get("id")) for a in self.record(i)[1]]
        except (ValueError, FileNotFoundError):
            return []

    def load(self, i: int, skip_ann_ids: Iterable[str] = ()) -> Sample:
        skip = set(skip_ann_ids)
        _, anns = self.record(i)
        path = self.image_path(i)
        image = formats.read_image(path)
        h, w = image.shape[:2]
        masks, ids = [], []
        for ann in anns:
            aid = str(ann.get("id"))
            if aid in skip:
                continue
            m = formats.segmentation_to_mask(ann["segmentation"], h, w, where=f"{self.jsons[i]}: annotation {aid}")
            if m.shape != (h, w):
                raise ValueError(
                    f"{self.jsons[i]}: annotation {aid}: mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}"
                )
            masks.append(m)
            ids.append(aid)
        return _sample(self.jsons[i].stem, image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        jpath = self.jsons[i]
        try:
            info, anns = self.record(i)
        except (ValueError, FileNotFoundError) as e:
            return [Problem(str(jpath), "malformed_json", str(e).split(": ", 1)[-1], index=i)]
        image, out = self._image_problem(i)
        if image is None:
            return out
        h, w = image.shape[:2]
        if "height" in info and "width" in info and (int(info["height"]), int(info["width"])) != (h, w):
            detail = f"image {self.image_path(i).name} is {h}x{w}, the JSON says {info['height']}x{info['width']}"
            return [Problem(str(jpath), "image_size_mismatch", detail, index=i)]
        seen: set = set()
        for ann in anns:
            aid = str(ann.get("id"))
            if aid in seen:
                out.append(
                    Problem(str(jpath), "duplicate_ann_id", f"duplicate annotation id {aid}", index=i, ann_id=aid)
                )
                continue
            seen.add(aid)
            out += _annotation_problems(ann, h, w, str(jpath), i, check_bbox="bbox" in ann)
        return out

    def dataset_problems(self) -> list[Problem]:
        out = super().dataset_problems()
        for i, p in enumerate(self.jsons):
            found = self._images.get(p.stem, [])
            if len(found) > 1:
                detail = f"duplicate image id {p.stem!r}: {', '.join(f.name for f in found)}"
                out.append(Problem(str(p), "duplicate_image_id", detail, index=i))
        return out


# ---------------------------------------------------------------------------------------------


FORMATS = ("coco", "mask_folder", "sa1b")


def build_dataset(cfg: DatasetConfig, name: str = "") -> SegDataset:
    """The reader for ``cfg.format`` over ``cfg.images`` and ``cfg.annotations``.

    Raises:
        ValueError: naming the format when it is unknown.
    """
    if cfg.format == "coco":
        return CocoDataset(cfg.images, cfg.annotations, task=cfg.task, name=name)
    if cfg.format == "mask_folder":
        return MaskFolderDataset(cfg.images, cfg.annotations, task=cfg.task, name=name)
    if cfg.format == "sa1b":
        return Sa1bDataset(cfg.images, cfg.annotations, task=cfg.task, name=name)
    raise ValueError(f"dataset {name or cfg.annotations!r}: format {cfg.format!r}: expected one of {list(FORMATS)}")


def select_datasets(known: Mapping[str, object], names: Sequence[str], key: str) -> list[str]:
    """The dataset names a stage runs over: ``names``, or every known dataset when ``names`` is empty.

    Arguments:
      known: name -> dataset config (``cfg.data.datasets``).
      names: the names the stage's config lists.
      key: the config key that lists them (``"embed.datasets"``), for the error message.

    Raises:
      ValueError: naming ``key`` and the unknown names.
    """
    chosen = list(names) or list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"{key}: unknown dataset(s) {unknown}; known: {sorted(known)}")
    return chosen
