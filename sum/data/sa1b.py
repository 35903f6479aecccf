"""The SA-1B reader (spec §3): one ``<stem>.json`` per image (``{"image": {...}, "annotations":
[...]}``) beside, or apart from, the image of the same stem.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from sum.data import formats
from sum.data.image_files import find_images
from sum.data.sa1b_json import read_sa1b_json
from sum.data.sample import FileListDataset, Problem, Sample, annotation_problems, make_sample


class Sa1bDataset(FileListDataset):
    """SA-1B: one ``<stem>.json`` per image (``{"image": {...}, "annotations": [...]}``) paired
    with the image file of the same stem in ``images_dir`` (which may be the JSON folder).

    Annotation ids need only be unique within an image. ``files`` are the JSON files.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike, json_dir: str | os.PathLike, task: str | int = "unspecified", name: str = "",
    ):
        self.images_dir = Path(images_dir)
        self.json_dir = Path(json_dir)
        self.source = str(self.json_dir)
        self.task = task
        if not self.json_dir.is_dir():
            raise FileNotFoundError(f"{self.json_dir}: SA-1B JSON folder not found")
        self.files = sorted(p for p in self.json_dir.iterdir() if p.is_file() and p.suffix.lower() == ".json")
        self._images: dict[str, list[Path]] = defaultdict(list)
        for p in find_images(self.images_dir):
            self._images[p.stem].append(p)
        self.name = name or self.json_dir.name
        self._cache: tuple[int, tuple[dict, list[dict]]] | None = None

    def image_path(self, i: int) -> Path:
        found = self._images.get(self.files[i].stem)
        return found[0] if found else self.images_dir / f"{self.files[i].stem}.jpg"

    def record(self, i: int) -> tuple[dict, list[dict]]:
        """(image info, annotations) of sample ``i`` (the last one read is cached)."""
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, read_sa1b_json(self.files[i]))
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
            m = formats.segmentation_to_mask(ann["segmentation"], h, w, where=f"{self.files[i]}: annotation {aid}")
            if m.shape != (h, w):
                raise ValueError(
                    f"{self.files[i]}: annotation {aid}: mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}"
                )
            masks.append(m)
            ids.append(aid)
        return make_sample(self.files[i].stem, image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        jpath = self.files[i]
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
            out += annotation_problems(ann, h, w, str(jpath), i, check_bbox="bbox" in ann)
        return out

    def dataset_problems(self) -> list[Problem]:
        out = super().dataset_problems()
        for i, p in enumerate(self.files):
            found = self._images.get(p.stem, [])
            if len(found) > 1:
                detail = f"duplicate image id {p.stem!r}: {', '.join(f.name for f in found)}"
                out.append(Problem(str(p), "duplicate_image_id", detail, index=i))
        return out
