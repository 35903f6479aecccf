"""The markdown of the ``evaluate`` stage's ``table.md`` (spec §10-11), from `sum.eval.loop.summarise`'s
nested dict (model -> protocol -> per-round aggregates) and the per-mask records:

- `markdown_table`: per protocol and reported round the paper's main-table layout (Tab. 1: metric x
  task + overall, columns = models) with the part task split by the scale rule into ``part
  (resolvable)`` and ``part (sub-resolution)``, then the per-benchmark layout (Tab. 14: cells
  ``mIoU / mBIoU``); for the point protocol NoC@85/90/95 and NoF@95; last, the benchmarks shown as
  examples, outside every mean. In percent; the best value of a row in bold.
- `size_table`: the mean IoU per task and band of target size (a plain mean over masks).
- `delta_table`: each model's mIoU difference to the reference with its bootstrap interval, per
  task (the part split too) and overall.
"""

from __future__ import annotations

from typing import Collection, Dict, List, Optional

import numpy as np

from sum.data.masks import area_band, band_labels
from sum.eval.columns import NOC_THRESHOLDS, NOF_THRESHOLDS, PART_SPLIT, PIOU_SUFFIX, report_rounds

METRIC_LABEL = {"miou": "mIoU", "mbiou": "mBIoU"}
PART_ROWS = {kind: label for kind, (label, _) in PART_SPLIT.items()}
PROTOCOL_TITLE = {
    "point": "Point prompts: first click at the interior-most point, then one corrective click per round",
    "box": "Box prompt: the tight ground-truth box, then one corrective click per round",
    "boundary": "Boundary prompt: one click at the 'median' boundary point (Tab. 5)",
}


def _unit(protocol: str, r: int) -> str:
    unit = "clicks" if protocol == "point" else "rounds"
    return unit if r != 1 else unit[:-1]


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _num(v) -> str:
    return "" if v is None else f"{v:.2f}"


def _dash(fmt):
    return lambda v: "\u2013" if v is None else fmt(v)


def _row(label: List[str], values: List, higher_better: bool = True, fmt=_pct) -> str:
    shown = [fmt(v) for v in values]
    present = [v for v in values if v is not None]
    if len(present) > 1:
        best = max(present) if higher_better else min(present)
        shown = [f"**{s}**" if v is not None and fmt(v) == fmt(best) else s for s, v in zip(shown, values)]
    return "| " + " | ".join(label + shown) + " |"


def _get(entry: Dict, metric: str, r: int, scope: str, name: str | None = None):
    series = entry[metric]
    if r > len(series):
        return None
    agg = series[r - 1][scope]
    return agg if name is None else agg.get(name)


def _masks(n: int) -> str:
    return f"{n} mask{'s' if n != 1 else ''}"


def _part_label(entry: Dict, kind: str) -> str:
    return f"{PART_ROWS[kind]}, {_masks(entry['part_resolution'][kind]['n_masks'])}"


def _part_value(entry: Dict, kind: str, key: str, r: Optional[int] = None):
    row = entry.get("part_resolution", {}).get(kind)
    if row is None:
        return None
    value = row[key]
    if r is None:
        return value
    return value[r - 1] if r <= len(value) else None


def markdown_table(
    summary: Dict,
    dataset_task: Dict[str, str],
    selection: str,
    examples: Collection[str] = (),
    noc_budget: Optional[int] = None,
    min_images: int = 1,
) -> str:
    """The paper-style tables (module docstring) as markdown.

    Arguments:
      summary: `sum.eval.loop.summarise`'s output.
      dataset_task: benchmark name -> task, every benchmark evaluated (examples too).
      selection: ``eval.selection``, named in the header.
      examples: benchmarks outside the means (`sum.eval.protocol.example_benchmarks`).
      noc_budget: NoC / NoF click budget (`sum.eval.protocol.noc_budget`); None: the rounds.
      min_images: ``eval.min_images``, named in the examples' section.
    """
    models = list(summary)
    protocols = list(dict.fromkeys(p for m in models for p in summary[m]))
    pooled = {d: t for d, t in dataset_task.items() if d not in set(examples)}
    tasks = list(dict.fromkeys(pooled.values()))
    lines = [
        "# Interactive segmentation benchmarks (spec §10)",
        "",
        f"Scores in percent; output selection `{selection}` (spec §10.3); a `<model>{PIOU_SUFFIX}` column "
        "takes, where one prompt gives three outputs, the one of highest predicted IoU (what an "
        "interactive tool shows). Task rows are the mean of their benchmarks' means; Overall is the "
        "mean of all benchmark means (spec §10.2); benchmarks of fewer than "
        f"{min_images} images are examples, listed apart and outside every mean. `part (resolvable)` "
        "and `part (sub-resolution)` split the part targets by the model's scale rule "
        "(`sum.eval.protocol.target_scale`: narrower than one low-res cell, 4 px at the 1024 input, "
        "or under 0.1% of the image, is sub-resolution), each aggregated like a task; the `part` row "
        "is over all part targets. Best value of a row in bold.",
        "",
    ]
    for protocol in protocols:
        cols = [m for m in models if protocol in summary[m]]
        rounds = report_rounds(max(summary[m][protocol]["rounds"] for m in cols))
        lines += [f"## {protocol}", "", PROTOCOL_TITLE[protocol] + ".", ""]
        for r in rounds:
            lines += _round_tables(summary, protocol, cols, r, tasks, pooled)
        if protocol == "point" and "noc85" in summary[cols[0]][protocol]:
            budget = noc_budget or summary[cols[0]][protocol]["rounds"]
            lines += _noc_table(summary, protocol, cols, pooled, budget)
        if any(d in summary[cols[0]][protocol]["n_masks"] for d in examples):
            lines += _examples_table(summary, protocol, cols, rounds, dataset_task, examples, min_images)
    return "\n".join(lines)


def table_header(cells: List[str]) -> List[str]:
    """A markdown table's header line and rule line."""
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def _round_tables(summary: Dict, protocol: str, cols: List[str], r: int, tasks: List[str], pooled: Dict) -> List[str]:
    """The task table and the per-benchmark table of one protocol after round ``r``."""
    first = summary[cols[0]][protocol]
    lines = [f"### {protocol}, {r} {_unit(protocol, r)}", ""]
    lines += table_header(["Metric", "Task", *cols])
    for metric in ("miou", "mbiou"):
        for t in tasks:
            vals = [_get(summary[m][protocol], metric, r, "tasks", t) for m in cols]
            lines.append(_row([METRIC_LABEL[metric], t], vals))
            if t == "part" and "part_resolution" in first:
                for kind in PART_ROWS:
                    vals = [_part_value(summary[m][protocol], kind, metric, r) for m in cols]
                    lines.append(_row([METRIC_LABEL[metric], _part_label(first, kind)], vals, fmt=_dash(_pct)))
        vals = [_get(summary[m][protocol], metric, r, "overall") for m in cols]
        lines.append(_row([METRIC_LABEL[metric], "**Overall**"], vals))
    lines.append("")
    lines += [f"Per benchmark, `mIoU / mBIoU` after {r} {_unit(protocol, r)}:", ""]
    lines += table_header(["Benchmark", "Task", "masks", *cols])
    for t in tasks:
        for d in [d for d, dt in pooled.items() if dt == t]:
            lines.append("| " + " | ".join([d, t, str(first["n_masks"].get(d, 0)), *_cells(summary, protocol, cols, d, [r], both=True)]) + " |")
    return lines + [""]


def _cells(summary: Dict, protocol: str, cols: List[str], d: str, rounds: List[int], both: bool = False) -> List[str]:
    """Per model, ``mIoU / mBIoU`` of benchmark ``d`` after one round (``both``), or its mIoU
    after each of ``rounds``."""
    cells = []
    for m in cols:
        e = summary[m][protocol]
        if both:
            a, b = _get(e, "miou", rounds[0], "datasets", d), _get(e, "mbiou", rounds[0], "datasets", d)
            cells.append("" if a is None else f"{_pct(a)} / {_pct(b)}")
        else:
            cells.append(" / ".join(_pct(_get(e, "miou", r, "datasets", d)) for r in rounds))
    return cells


def _noc_table(summary: Dict, protocol: str, cols: List[str], pooled: Dict[str, str], budget: int) -> List[str]:
    """NoC@85/90/95 (mean clicks) and NoF@95 (objects never reaching the IoU) per task and overall."""
    first = summary[cols[0]][protocol]
    tasks = list(dict.fromkeys(pooled.values()))
    nof_key = next(iter(NOF_THRESHOLDS))
    lines = [
        f"### {protocol}, NoC and NoF ({budget}-click budget)",
        "",
        f"NoC@k: mean clicks to reach IoU k% ({budget} when never reached); NoF@95: objects that do not "
        f"reach 95% within {budget} clicks (RITM), of the row's masks.",
        "",
        *table_header(["Metric", "Task", *cols]),
    ]
    for key in NOC_THRESHOLDS:
        label = f"NoC@{key[3:]}"
        for t in tasks:
            vals = [summary[m][protocol][key]["tasks"].get(t) for m in cols]
            lines.append(_row([label, t], vals, higher_better=False, fmt=_num))
            if t == "part" and "part_resolution" in first:
                for kind in PART_ROWS:
                    vals = [_part_value(summary[m][protocol], kind, key) for m in cols]
                    lines.append(_row([label, _part_label(first, kind)], vals, higher_better=False, fmt=_dash(_num)))
        vals = [summary[m][protocol][key]["overall"] for m in cols]
        lines.append(_row([label, "**Overall**"], vals, higher_better=False, fmt=_num))
    n_task = {t: sum(n for d, n in first["n_masks"].items() if pooled.get(d) == t) for t in tasks}
    for t in tasks:
        vals = [summary[m][protocol][nof_key]["tasks"].get(t) for m in cols]
        lines.append(_row(["NoF@95", f"{t}, {_masks(n_task[t])}"], vals, higher_better=False, fmt=str))
        if t == "part" and "part_resolution" in first:
            for kind in PART_ROWS:
                vals = [_part_value(summary[m][protocol], kind, nof_key) for m in cols]
                lines.append(_row(["NoF@95", _part_label(first, kind)], vals, higher_better=False, fmt=_dash(str)))
    vals = [summary[m][protocol][nof_key]["overall"] for m in cols]
    lines.append(_row(["NoF@95", f"**Overall**, {_masks(sum(n_task.values()))}"], vals, higher_better=False, fmt=str))
    return lines + [""]


def _examples_table(
    summary: Dict, protocol: str, cols: List[str], rounds: List[int], dataset_task: Dict[str, str],
    examples: Collection[str], min_images: int,
) -> List[str]:
    """The benchmarks shown as examples: mIoU after the reported rounds, outside every mean."""
    first = summary[cols[0]][protocol]
    shown = [d for d in dataset_task if d in set(examples) and d in first["n_masks"]]
    lines = [
        f"### {protocol}, examples (outside the means)",
        "",
        f"Benchmarks of fewer than {min_images} images: mIoU after {' / '.join(map(str, rounds))} "
        f"{_unit(protocol, 2)}, in no task or overall mean and no comparison (one image says nothing "
        "about the next).",
        "",
        *table_header(["Benchmark", "Task", "masks", *cols]),
    ]
    for d in shown:
        lines.append("| " + " | ".join([d, dataset_task[d], str(first["n_masks"][d]), *_cells(summary, protocol, cols, d, rounds)]) + " |")
    return lines + [""]


def size_table(records, dataset_task: Dict[str, str], protocol: str = "point", examples: Collection[str] = ()) -> str:
    """Markdown: mean IoU per task and band of target size (the target's area as a fraction of its
    image, ``AREA_BANDS``) after the reported rounds of ``protocol``, one column per model: a plain
    mean over the masks of the band, to show where a model gains or loses (small parts against
    whole objects), not the paper's aggregation. Benchmarks in ``examples`` are left out. ''
    when no record has its image size."""
    recs = [r for r in records if r.protocol == protocol and r.image_area > 0 and r.dataset not in set(examples)]
    if not recs:
        return ""
    models = list(dict.fromkeys(r.model for r in recs))
    rounds = report_rounds(max(len(r.iou) for r in recs))
    cells: Dict[tuple, List[List[float]]] = {}
    for r in recs:
        key = (dataset_task[r.dataset], area_band(r.area / r.image_area), r.model)
        cells.setdefault(key, []).append(r.iou)
    unit = "clicks" if protocol == "point" else "rounds"
    lines = [
        f"### {protocol}, mIoU by target size",
        "",
        f"Mean IoU over the targets of a task whose area is the given fraction of the image, after "
        f"{' / '.join(str(r) for r in rounds)} {unit} (a plain mean over masks, not the paper's aggregation).",
        "",
        *table_header(["Task", "area / image", "masks", *models]),
    ]
    for t in dict.fromkeys(t for d, t in dataset_task.items() if d not in set(examples)):
        for b in band_labels():
            per_model = [cells.get((t, b, m)) for m in models]
            if not any(per_model):
                continue
            n = max(len(v) for v in per_model if v)
            shown = [
                "" if not v else " / ".join(_pct(float(np.mean([x[min(r, len(x)) - 1] for x in v]))) for r in rounds)
                for v in per_model
            ]
            lines.append("| " + " | ".join([t, b, str(n), *shown]) + " |")
    return "\n".join(lines + [""])


def _signed(v: float) -> str:
    """Points with their sign (a true minus); 0.0 for what rounds to zero."""
    text = f"{100 * v:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text.replace("-", "\u2212")


def delta_table(deltas: Dict[str, Dict[str, Dict[str, list]]], reference: str, level: float, samples: int) -> str:
    """Markdown: per protocol, each model's mIoU minus the reference's with its bootstrap interval
    (`sum.eval.stats.paired_deltas`), per task and overall after the reported rounds; '' when
    there is nothing to compare."""
    if not any(deltas.values()):
        return ""
    lines = [
        f"## Against {reference}: mIoU difference, {100 * level:.0f}% interval",
        "",
        f"Each cell is the model's mIoU minus {reference}'s, in points, aggregated as above, then a "
        f"percentile interval from {samples} bootstrap redraws of each benchmark's images (the masks "
        "of an image move together; both models scored on the same draw; widened by sqrt(n/(n-1)) "
        "for a benchmark of n images, see `sum.eval.stats`). \u2193: the interval is wholly below 0 "
        "(a loss the choice of images does not explain); \u2191: wholly above; neither: the "
        "benchmarks cannot tell; n/a: a benchmark of the row has one image. With a few images per "
        f"benchmark the intervals are rough. `masks` counts the targets of the row. A `<model>{PIOU_SUFFIX}` "
        f"column is compared with `{reference}{PIOU_SUFFIX}` (the same selection), when that was run.",
        "",
    ]
    for protocol, per_model in deltas.items():
        if not per_model:
            continue
        models = list(per_model)
        scopes = list(per_model[models[0]])
        rounds = report_rounds(len(per_model[models[0]][scopes[0]]))
        unit = "clicks" if protocol == "point" else "rounds"
        lines += [f"### {protocol}", ""]
        lines += table_header(["Task", unit, "masks", *models])
        for scope in scopes:
            for r in rounds:
                cells = []
                for m in models:
                    d = per_model[m][scope][r - 1]
                    if d.verdict == "unknown":
                        cells.append(f"{_signed(d.delta)} [n/a]")
                        continue
                    mark = {"below": " \u2193", "above": " \u2191"}.get(d.verdict, "")
                    cells.append(f"{_signed(d.delta)} [{_signed(d.lo)}, {_signed(d.hi)}]{mark}")
                label = "**Overall**" if scope == "overall" else scope
                n = per_model[models[0]][scope][0].n_masks
                lines.append("| " + " | ".join([label, str(r), str(n), *cells]) + " |")
        lines.append("")
    return "\n".join(lines)
