"""The samples validation leaves out, and the one way every stage opens a dataset (spec §3, §13 A8).

``sumseg validate`` writes one skip list, ``data.validate.skip_list`` (`write_skip_list`): per
dataset its source, its number of samples and every problem validation found, each with its
reason (`sum.data.validate.REASONS`) and the image id of its sample. `without_problems` turns
problems into the dataset without the bad samples and annotations; validation's report and
`open_dataset` both apply it, so the samples a stage leaves out are exactly those validate reported.

`open_dataset` is how the stages that read datasets (embed, pseudolabel, refine, uncertainty,
finetune, evaluate, demo) open one: in ``data.validate.mode=skip`` it reads the skip list and
leaves out what it names (a list written for another version of the dataset is refused); in
``fail`` mode validation passed (or was not run) and the dataset is read as it is. `left_out`
says what a reader leaves out, for the stages that report it (evaluate).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from sum.data.dataset import build_dataset
from sum.data.sample import DatasetView, Problem, SegDataset
from sum.io import atomic_write_text, check_format

log = logging.getLogger(__name__)

SKIP_LIST_FORMAT = "sum-skip-list/1"
UNREADABLE = "unreadable_dataset"


class EmptyDataset(SegDataset):
    """A dataset with no samples: what skip mode reads of a dataset validation could not open."""

    def __init__(self, name: str, source: str, task: str | int = "unspecified"):
        self.name, self.source, self.task = name, source, task

    def __len__(self) -> int:
        return 0

    @property
    def image_ids(self) -> list[str]:
        return []

    def annotation_ids(self, i: int) -> list[str]:
        raise IndexError(f"{self.source}: index {i} out of range for 0 samples")

    def problems(self, i: int) -> list[Problem]:
        raise IndexError(f"{self.source}: index {i} out of range for 0 samples")


def without_problems(ds: SegDataset, problems: Sequence[Problem]) -> SegDataset:
    """``ds`` without the samples and annotations that ``problems`` name (``ds`` itself when none).

    A problem of a sample (``index`` set, ``ann_id`` None) leaves the sample out; a problem of an
    annotation leaves the annotation out, and the sample too when none of its annotations is
    left; a dataset-level ``unknown_task`` leaves every sample out. Annotations of no sample
    (``unknown_image_id``) are read by no reader anyway.

    Returns:
      `DatasetView` of the kept samples, its ``skipped`` the ``problems``.
    """
    if not problems:
        return ds
    bad_samples = {p.index for p in problems if p.index is not None and p.ann_id is None}
    drop: dict[int, set[str]] = defaultdict(set)
    for p in problems:
        if p.index is not None and p.ann_id is not None:
            drop[p.index].add(p.ann_id)
    unusable = any(p.reason == "unknown_task" for p in problems)
    keep = []
    for i in range(len(ds)):
        if unusable or i in bad_samples:
            continue
        if i in drop:  # annotation ids are read only where some are dropped (SA-1B: a JSON each)
            ann_ids = ds.annotation_ids(i)
            if ann_ids and all(a in drop[i] for a in ann_ids):
                continue
        keep.append(i)
    return DatasetView(ds, keep, dict(drop), skipped=problems)


def skip_entry(ds: SegDataset | None, problems: Sequence[Problem], source: str = "") -> dict:
    """One dataset's entry of the skip list: its source, size and problems (each with the image
    id of its sample, so that a list written for another version of the dataset is noticed).
    ``ds`` None: the dataset could not be opened (its one problem says why)."""
    ids = ds.image_ids if ds is not None else []
    return {
        "source": ds.source if ds is not None else source,
        "n_images": len(ids),
        "problems": [
            {
                "file": p.file,
                "reason": p.reason,
                "detail": p.detail,
                "index": p.index,
                "image_id": str(ids[p.index]) if p.index is not None else None,
                "ann_id": p.ann_id,
            }
            for p in problems
        ],
    }


def write_skip_list(path: str | os.PathLike, entries: Mapping[str, dict]) -> Path:
    """Write the skip list (dataset name -> `skip_entry`) atomically."""
    doc = {"format": SKIP_LIST_FORMAT, "datasets": dict(entries)}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return Path(path)


def read_skip_list(path: str | os.PathLike) -> dict:
    """The skip list's datasets (name -> entry).

    Raises:
      FileNotFoundError: naming the file when validate has not written it.
      ValueError: naming the file when it is not a skip list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no skip list (data.validate.mode=skip reads the one `sumseg validate` writes)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable skip list ({type(e).__name__})") from None
    return check_format(doc, SKIP_LIST_FORMAT, path, "a skip list")["datasets"]


def open_dataset(data_cfg, name: str) -> SegDataset:
    """Dataset ``name`` of ``data_cfg.datasets`` (a `DataConfig`) as every stage reads it.

    ``data.validate.mode=fail``: the dataset as it is (`build_dataset`). ``skip``: without the
    samples and annotations of the skip list ``data.validate.skip_list`` (`without_problems`), or
    with no sample when validation could not open it; one log line says what is left out.

    Raises:
      FileNotFoundError: naming the skip list when it is missing (skip mode).
      ValueError: naming the skip list when it lacks the dataset or was written for another
        version of it (re-run ``sumseg validate``).
    """
    dcfg = data_cfg.datasets[name]
    if data_cfg.validate.mode != "skip":
        return build_dataset(dcfg, name)
    path = data_cfg.validate.skip_list
    entry = read_skip_list(path).get(name)
    if entry is None:
        raise ValueError(f"{path}: no entry for dataset {name!r} (re-run `sumseg validate`)")
    problems = [Problem(p["file"], p["reason"], p["detail"], p["index"], p["ann_id"]) for p in entry["problems"]]
    if any(p.reason == UNREADABLE for p in problems):
        log.warning("dataset %s: skipped: validation could not read it (%s)", name, path)
        return without_problems(EmptyDataset(name, entry["source"], dcfg.task), problems)
    ds = build_dataset(dcfg, name)
    ids = ds.image_ids
    stale = len(ids) != entry["n_images"] or any(
        p["index"] is not None and (p["index"] >= len(ids) or str(ids[p["index"]]) != p["image_id"])
        for p in entry["problems"]
    )
    if stale:
        raise ValueError(f"{path}: written for another version of dataset {name!r} ({ds.source}); re-run `sumseg validate`")
    view = without_problems(ds, problems)
    if problems:
        log.warning("dataset %s: %d of %d images left out, %d problems (%s)", name, len(ds) - len(view), len(ds), len(problems), path)
    return view


def left_out(ds: SegDataset) -> dict:
    """What reading ``ds`` leaves out: ``images``, the samples a view opened in skip mode lacks,
    and ``problems``, reason -> count, the skip list's problems of it; for a dataset read as it is,
    the annotations whose image is not in the dataset (which no reader reads)."""
    problems = ds.skipped or [p for p in ds.dataset_problems() if p.reason == "unknown_image_id"]
    images = len(ds.base) - len(ds) if isinstance(ds, DatasetView) else 0
    return {"images": images, "problems": dict(sorted(Counter(p.reason for p in problems).items()))}
