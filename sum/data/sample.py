"""What every dataset reader yields and shares (spec §3): a `Sample` (image, target masks, boxes,
ids, task), a `Problem` (what is wrong with a dataset, sample or annotation), the reader interface
`SegDataset` with its image checks, `DatasetView` (a dataset without some samples or
annotations), and the checks of one COCO or SA-1B annotation. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def make_sample(
    image_id: str, image: np.ndarray, masks: list[np.ndarray], ann_ids: list[str], task: int, path
) -> Sample:
    """A `Sample` of ``masks`` (none: a (0, H, W) stack) with their tight boxes."""
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


def bbox_problem(bbox, h: int, w: int, tol: float = 1.0) -> str | None:
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
    skipped: Sequence[Problem] = ()  # the problems whose samples a validated view leaves out

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

    def checked_image(self, i: int, declared: Mapping, described_by: str) -> tuple[np.ndarray | None, list[Problem]]:
        """Sample ``i``'s image and the problems found so far, or None with the problems when the
        image is missing, unreadable, or not the ``height`` x ``width`` that ``declared`` (the
        image record of ``described_by``, a file name) says."""
        image, out = self._image_problem(i)
        if image is None:
            return None, out
        h, w = image.shape[:2]
        if (int(declared["height"]), int(declared["width"])) != (h, w):
            detail = f"image is {h}x{w}, {described_by} says {declared['height']}x{declared['width']}"
            return None, [Problem(str(self.image_path(i)), "image_size_mismatch", detail, index=i)]
        return image, out


class FileListDataset(SegDataset):
    """A reader with one file per sample (``files``), whose stem is the sample's image id."""

    files: list[Path]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_ids(self) -> list[str]:
        return [p.stem for p in self.files]


class DatasetView(SegDataset):
    """A dataset without some samples and some annotations (what validation in skip mode returns,
    `sum.data.skipped.without_problems`); ``skipped`` holds the problems that left them out."""

    def __init__(
        self,
        base: SegDataset,
        keep: Sequence[int],
        drop_ann_ids: dict[int, set[str]] | None = None,
        skipped: Sequence[Problem] = (),
    ):
        self.base = base
        self.keep = list(keep)
        self.drop = drop_ann_ids or {}
        self.skipped = list(skipped)
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


def annotation_problems(ann: dict, h: int, w: int, file: str, i: int, check_bbox: bool) -> list[Problem]:
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
        problem = bbox_problem(ann["bbox"], h, w)
        if problem:
            return [Problem(file, "bbox_outside_image", problem, index=i, ann_id=aid)]
    return []
