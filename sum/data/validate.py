"""Dataset validation before any stage reads a set (spec §3; ``sumseg validate``).

Every sample is checked: the image decodes (once), each mask has the image's size, no mask is
empty (spec §13 A8), RLE is well formed (size field; counts decode to runs covering h*w pixels,
checked without building the mask), polygons have >= 3 points, the bbox lies inside the image,
the task is known, and image and annotation ids are unique.

``mode="fail"`` raises one `DataValidationError` line naming the first bad file, annotation and
reason, with the count of further problems. ``mode="skip"`` returns the report with every problem
and a view of the dataset without the bad samples and annotations (`sum.data.skipped`).
`ValidationReport.to_json` writes the counts as a DVC metrics file; `validate_config` also writes
the skip list that the other stages read in skip mode.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sum.data.dataset import build_dataset
from sum.data.sample import Problem, SegDataset
from sum.data.skipped import UNREADABLE, skip_entry, without_problems, write_skip_list
from sum.io import atomic_write_text, remove_temporaries

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
    """Every problem of ``ds`` and the view without the bad items (`without_problems`)."""
    problems = list(ds.dataset_problems())
    n = len(ds)
    ann_ids = []
    for i in range(n):
        problems += ds.problems(i)
        ann_ids.append(ds.annotation_ids(i))
    view = without_problems(ds, problems)
    keep, drop = (range(n), {}) if view is ds else (view.keep, view.drop)
    return ValidationReport(
        name=ds.name,
        source=ds.source,
        n_images=n,
        n_masks=sum(len(a) for a in ann_ids),
        n_images_kept=len(keep),
        n_masks_kept=sum(len([a for a in ann_ids[i] if a not in drop.get(i, ())]) for i in keep),
        problems=problems,
        dataset=view,
    )


def validate_config(
    data_cfg,
    out: str | os.PathLike | None = "metrics/validate.json",
    skip_list: str | os.PathLike | None = None,
) -> dict[str, ValidationReport]:
    """Validate every dataset of ``data_cfg.datasets`` (a `DataConfig`); write one metrics JSON
    and the skip list the other stages read (`sum.data.skipped`).

    Both files (and temporaries of a killed run) are removed first, so that a run that stops (an
    error, a kill) leaves neither behind from an earlier run: an old report of 0 problems, or an
    old list, never stands for data that failed. The JSON holds totals and, under ``datasets``, each report's `to_dict`; it is
    written before fail mode raises (a dataset that cannot be opened counts as a problem), so that
    the counts of a failing run can be read. The skip list (`sum.data.skipped.write_skip_list`) is
    written only when validation passes: in skip mode it names every sample and annotation the
    stages leave out, in fail mode none.

    Arguments:
      out: the metrics JSON (None: not written).
      skip_list: the skip list (``data.validate.skip_list``; None: not written).

    Raises:
        DataValidationError: in fail mode, naming the first bad file of the first bad dataset.
    """
    mode = data_cfg.validate.mode
    if mode not in MODES:
        raise ValueError(f"data.validate.mode {mode!r}: expected one of {list(MODES)}")
    for stale in (out, skip_list):
        if stale is not None:
            Path(stale).unlink(missing_ok=True)
            remove_temporaries(stale)  # of a killed run
    reports: dict[str, ValidationReport] = {}
    entries: dict[str, dict] = {}
    for name, dcfg in data_cfg.datasets.items():
        reports[name], entries[name] = _validate_one(name, dcfg)
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
        for name, r in reports.items():
            if r.problems and r.dataset is None:
                raise DataValidationError(f"dataset {name}: {r.problems[0].detail}")
            if r.problems:
                raise DataValidationError(r.error_line())
    if skip_list is not None:
        write_skip_list(skip_list, entries)
    return reports


def _validate_one(name: str, dcfg) -> tuple[ValidationReport, dict]:
    """The report of one configured dataset and its skip-list entry (`skip_entry`); a dataset
    that cannot be opened is one ``unreadable_dataset`` problem."""
    try:
        ds = build_dataset(dcfg, name=name)
    except (ValueError, FileNotFoundError) as e:
        problem = Problem(dcfg.annotations, UNREADABLE, str(e))
        log.warning("dataset %s: cannot be read: %s", name, e)
        return ValidationReport(name, dcfg.annotations, problems=[problem]), skip_entry(None, [problem], dcfg.annotations)
    report = _scan(ds)
    log.info("dataset %s: %d images, %d masks, %d problems", name, report.n_images, report.n_masks, len(report.problems))
    for p in report.problems:
        log.warning("dataset %s: %s", name, p)
    return report, skip_entry(ds, report.problems)
