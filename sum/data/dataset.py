"""The one dataset interface for training and evaluation (spec §3).

A `SegDataset` yields `Sample`s: an RGB image, its K binary target masks, their tight boxes, the
annotation ids and the task id of the source (spec §3.6: tasks are assigned per source dataset).
Three readers cover the formats the data arrives in:

- `CocoDataset`: COCO instance JSON (polygons or RLE); ``iscrowd`` annotations are not targets;
- `MaskFolderDataset`: image + binary mask pairs of the HQSeg-44K folders (DIS5K ``im/``+``gt/``,
  ThinObject5K ``images_*``+``masks_*``, cascade_psp ``x.jpg``+``x.png`` in one folder), one
  mask per image, foreground ``> 128``;
- `Sa1bDataset`: SA-1B per-image JSON beside (or apart from) the images.

`build_dataset` turns a `DatasetConfig` into one of them; `select_datasets` picks a stage's
datasets by name. `CocoDataset` lives here; `MaskFolderDataset` in `sum.data.mask_folder`,
`Sa1bDataset` in `sum.data.sa1b`, and what they share (`Sample`, `Problem`, `SegDataset`) in
`sum.data.sample`. Each reader also says what is wrong
with a sample without building it (`problems`, `dataset_problems`), which `sum.data.validate`
uses, and can load a sample while skipping named annotations (`load`), which the validated view
of a dataset uses. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sum.config import DatasetConfig
from sum.data import formats
from sum.data.mask_folder import MaskFolderDataset
from sum.data.sa1b import Sa1bDataset
from sum.data.sample import Problem, Sample, SegDataset, annotation_problems, make_sample


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
        return make_sample(str(img["id"]), image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        image, out = self.checked_image(i, self.images[i], self.annotations_json.name)
        if image is None:
            return out
        h, w = image.shape[:2]
        for ann in self.annotations(i):
            out += annotation_problems(ann, h, w, str(self.annotations_json), i, check_bbox="bbox" in ann)
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
