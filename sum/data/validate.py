"""Dataset validation before any stage reads a set (spec §3; ``sumseg validate``).

Every sample is checked: the image decodes (once), each mask has the image's size, no mask is
empty (spec §13 A8), RLE is well formed (size field; counts decode to runs covering h*w pixels,
checked without building the mask), polygons have >= 3 points, the bbox lies inside the image,
the task is known, and image and annotation ids are unique.

``mode="fail"`` raises one `DataValidationError` line naming the first bad file, annotation and
reason, with the count of further problems. ``mode="skip"`` returns the report with every problem
and a view of the dataset without the bad samples and annotations. `ValidationReport.to_json`
writes the counts as a DVC metrics file.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sum.data.dataset import build_dataset
from sum.data.sample import DatasetView, Problem, SegDataset
from sum.io import atomic_write_text

log = logging.getLogger(__name__)

MODES = ("fail", "skip")

# every reason a Problem can carry; the metrics JSON lists them all so that keys stay stable
REASONS = (
    "unknown_task",
    "duplicate_image_id",
    "duplicate_ann_id",
    "unknown_image_id",
    "missing_image",
    "image_unreadable",
    "image_size_mismatch",
    "malformed_json",
    "missing_mask",
    "mask_unreadable",
    "malformed_rle",
    "malformed_polygon",
    "malformed_segmentation",
    "mask_size_mismatch",
    "empty_mask",
    "bbox_outside_image",
    "unreadable_dataset",
)


class DataValidationError(ValueError):
    """A dataset failed validation; the message is one line naming the first bad file."""


@dataclass
class ValidationReport:
    """The outcome of `validate_dataset`.

    Attributes:
      n_images, n_masks: samples and target annotations scanned.
      n_images_kept, n_masks_kept: what the view without bad items holds.
      problems: every problem found, in scan order (dataset-level first).
      dataset: the view without bad items (skip mode), else the dataset itself.
    """

    name: str
    source: str
    n_images: int = 0
    n_masks: int = 0
    n_images_kept: int = 0
    n_masks_kept: int = 0
    problems: list[Problem] = field(default_factory=list)
    dataset: SegDataset | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts_by_reason(self) -> dict[str, int]:
        counts = Counter(p.reason for p in self.problems)
        return {r: counts.get(r, 0) for r in sorted(set(REASONS) | set(counts))}

    def error_line(self) -> str:
        """One line: the first problem and how many more there are."""
        first = str(self.problems[0]).replace("\n", " ")
        more = len(self.problems) - 1
        return first + (
            f" (and {more} more problem{'s' if more != 1 else ''} in {self.name or self.source})" if more else ""
        )

    def to_dict(self) -> dict:
        """Counts only (numbers), as DVC metrics want them."""
        return {
            "n_images": self.n_images,
            "n_masks": self.n_masks,
            "n_images_kept": self.n_images_kept,
            "n_masks_kept": self.n_masks_kept,
            "n_problems": len(self.problems),
            "problems": self.counts_by_reason(),
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict` as JSON atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def validate_dataset(ds: SegDataset, mode: str = "fail") -> ValidationReport:
    """Check every sample of ``ds`` (see the module docstring for the checks).

    Arguments:
      mode: ``fail`` raises on any problem (after the scan, so the message can count them);
        ``skip`` returns the report whose ``dataset`` leaves out bad samples and bad annotations.
        A sample whose every annotation is bad is left out too; an unknown task leaves out all.

    Raises:
        DataValidationError: in fail mode, one line naming the file, annotation and reason.
    """
    if mode not in MODES:
        raise ValueError(f"validate mode {mode!r}: expected one of {list(MODES)}")
    report = _scan(ds)
    if report.problems and mode == "fail":
        raise DataValidationError(report.error_line())
    for p in report.problems:
        log.warning("%s: skipped: %s", ds.name or ds.source, p)
    return report


def _scan(ds: SegDataset) -> ValidationReport:
    """Every problem of ``ds`` and the view without the bad items."""
    problems = list(ds.dataset_problems())
    n = len(ds)
    ann_ids = []
    for i in range(n):
        problems += ds.problems(i)
        ann_ids.append(ds.annotation_ids(i))

    bad_samples = {p.index for p in problems if p.index is not None and p.ann_id is None}
    drop: dict[int, set[str]] = defaultdict(set)
    for p in problems:
        if p.index is not None and p.ann_id is not None:
            drop[p.index].add(p.ann_id)
    unusable = any(p.reason == "unknown_task" for p in problems)
    keep = []
    for i in range(n):
        left = [a for a in ann_ids[i] if a not in drop.get(i, ())]
        if unusable or i in bad_samples or (ann_ids[i] and not left):
            continue
        keep.append(i)

    report = ValidationReport(
        name=ds.name,
        source=ds.source,
        n_images=n,
        n_masks=sum(len(a) for a in ann_ids),
        n_images_kept=len(keep),
        n_masks_kept=sum(len([a for a in ann_ids[i] if a not in drop.get(i, ())]) for i in keep),
        problems=problems,
        dataset=DatasetView(ds, keep, dict(drop)) if problems else ds,
    )
    return report


def validate_config(data_cfg, out: str | os.PathLike | None = "metrics/validate.json") -> dict[str, ValidationReport]:
    """Validate every dataset of ``data_cfg.datasets`` (a `DataConfig`) and write one metrics JSON.

    The JSON holds totals and, under ``datasets``, each report's `to_dict`. It is written before
    fail mode raises, so that the counts of a failing run can be read.

    Raises:
        DataValidationError: in fail mode, naming the first bad file of the first bad dataset.
    """
    mode = data_cfg.validate.mode
    if mode not in MODES:
        raise ValueError(f"data.validate.mode {mode!r}: expected one of {list(MODES)}")
    reports: dict[str, ValidationReport] = {}
    for name, dcfg in data_cfg.datasets.items():
        try:
            ds = build_dataset(dcfg, name=name)
        except (ValueError, FileNotFoundError) as e:
            if mode == "fail":
                raise DataValidationError(f"dataset {name}: {e}") from None
            reports[name] = ValidationReport(
                name, dcfg.annotations, problems=[Problem(dcfg.annotations, "unreadable_dataset", str(e))]
            )
            log.warning("dataset %s: skipped: %s", name, e)
            continue
        reports[name] = _scan(ds)
        log.info(
            "dataset %s: %d images, %d masks, %d problems",
            name,
            reports[name].n_images,
            reports[name].n_masks,
            len(reports[name].problems),
        )
        for p in reports[name].problems:
            log.warning("dataset %s: %s", name, p)
    if not reports:
        log.warning("no datasets configured under data.datasets: nothing to validate")
    doc = {
        "n_images": sum(r.n_images for r in reports.values()),
        "n_masks": sum(r.n_masks for r in reports.values()),
        "n_problems": sum(len(r.problems) for r in reports.values()),
        "datasets": {name: r.to_dict() for name, r in reports.items()},
    }
    if out is not None:
        atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    if mode == "fail":
        for r in reports.values():
            if r.problems:
                raise DataValidationError(r.error_line())
    return reports
