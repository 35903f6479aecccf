"""The HQSeg-44K mask-folder reader (spec §3.1): image + binary mask pairs matched by file stem,
one target mask per image, foreground ``> 128``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sum.data import formats
from sum.data.image_files import find_images, read_binary_mask
from sum.data.sample import FileListDataset, Problem, Sample, make_sample


MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


class MaskFolderDataset(FileListDataset):
    """Image + binary-mask pairs matched by file stem; one target mask per image (spec §3.1).

    Layouts: DIS5K ``im/`` + ``gt/``; ThinObject5K ``images_*`` + ``masks_*``; cascade_psp, where
    ``images_dir == masks_dir`` and image ``x.jpg`` sits beside mask ``x.png`` (then every PNG is a
    mask). Folders are not searched recursively. Foreground is ``> 128``. ``files`` are the images.
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
        self.files = find_images(self.images_dir, image_exts)
        mask_files = find_images(self.masks_dir, (".png",) if same else MASK_EXTENSIONS)
        self.masks: dict[str, Path] = {}
        for p in sorted(mask_files, key=lambda p: MASK_EXTENSIONS.index(p.suffix.lower())):
            self.masks.setdefault(p.stem, p)  # x.png wins over x.jpg when both are there
        self.name = name or (self.images_dir.name if same else self.images_dir.parent.name)

    def image_path(self, i: int) -> Path:
        return self.files[i]

    def mask_path(self, i: int) -> Path | None:
        return self.masks.get(self.files[i].stem)

    def annotation_ids(self, i: int) -> list[str]:
        return [self.files[i].stem] if self.mask_path(i) is not None else []

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
            m = read_binary_mask(mpath, self.threshold)
            if m.shape != (h, w):
                raise ValueError(f"{mpath}: mask is {m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
            masks, ids = [m], [sid]
        return make_sample(sid, image, masks, ids, self.task_id, path)

    def problems(self, i: int) -> list[Problem]:
        image, out = self._image_problem(i)
        if image is None:
            return out
        h, w = image.shape[:2]
        path, sid = self.image_path(i), self.files[i].stem
        mpath = self.mask_path(i)
        if mpath is None:
            return [Problem(str(path), "missing_mask", f"no mask {sid}.* in {self.masks_dir}", index=i)]
        try:
            m = read_binary_mask(mpath, self.threshold)
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
        for i, p in enumerate(self.files):
            if p.stem in seen:
                out.append(Problem(str(p), "duplicate_image_id", f"duplicate image id {p.stem!r}", index=i))
            seen.add(p.stem)
        return out
