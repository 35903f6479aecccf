"""Reports of the ``evaluate`` stage: metrics JSON, curves, the paper-style table, panels (spec §10-11).

Everything here turns `sum.eval.loop.summarise`'s nested dict (model -> protocol -> per-round
aggregates) into files, written atomically:

- ``eval.metrics`` (DVC metrics): ``{model: {protocol: {"overall": {...}, "tasks": {task: {...}},
  "datasets": {name: {...}}}}}`` where ``{...}`` holds ``miou_<n>`` and ``mbiou_<n>`` after rounds
  n = 1, 3 and the last (fractions in [0, 1], 4 decimals) and, for the point protocol, ``noc85``
  and ``noc90`` (mean number of clicks to reach IoU 0.85 / 0.90, the round budget when never).
- ``<plots_dir>/{point,box}_{miou,mbiou}.csv``: the overall score after each round, one column
  per model (``clicks`` or ``round``, then the models), for one DVC plot with a line per model.
- ``<out_dir>/table.md``: the paper's main-table layout (Tab. 1: metric x task + overall,
  columns = models) per protocol and round, then the per-benchmark layout (Tab. 14: cells
  ``mIoU / mBIoU``), in percent; the best value of a row in bold.
  Then, for the point protocol, the mean IoU per task and band of target size (``AREA_BANDS``:
  the target's area as a fraction of its image) after the first, third and last click: a plain
  mean over the masks of the band, to show where a model gains or loses (small parts against
  whole objects), not the paper's aggregation.
  Last, against the reference model (``eval.reference``, default the first of ``eval.models``,
  the foundation model): each other model's mIoU difference per task and overall with an
  image-bootstrap interval (`sum.eval.stats`), marked where the interval excludes 0.
- ``<out_dir>/deltas.csv``: those differences for IoU and boundary IoU, every protocol, scope and
  round (``eval.bootstrap: 0`` leaves out the section and the file).
- ``<out_dir>/panels/<benchmark>.png``: image, ground truth, each model's masks after rounds 1
  and 3 with its clicks (green positive, red negative).
- ``<out_dir>/per_mask.csv``: one row per target, model and protocol (debugging).
- ``<out_dir>/run.json``: the models (checkpoint, method, task prompt per benchmark, encoder),
  the benchmarks (task, images and masks evaluated), the eval config and the timings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from sum.data.masks import area_band, band_labels
from sum.eval.panels import save_panels
from sum.eval.stats import paired_deltas
from sum.io import atomic_write_text

CURVE_X = {"point": "clicks", "box": "round"}
METRIC_LABEL = {"miou": "mIoU", "mbiou": "mBIoU"}
PROTOCOL_TITLE = {
    "point": "Point prompts: first click at the interior-most point, then one corrective click per round",
    "box": "Box prompt: the tight ground-truth box, then one corrective click per round",
    "boundary": "Boundary prompt: one click at the 'median' boundary point (Tab. 5)",
}


def report_rounds(rounds: int) -> List[int]:
    """The rounds reported in the JSON and the table: 1, 3 and the last (those that exist)."""
    return sorted({1, min(3, rounds), rounds})


def _values(entry: Dict, pick) -> Dict[str, float]:
    rounds = report_rounds(entry["rounds"])
    out = {}
    for metric in ("miou", "mbiou"):
        for r in rounds:
            out[f"{metric}_{r}"] = round(float(pick(entry[metric][r - 1])), 4)
    for key in ("noc85", "noc90"):
        if key in entry:
            out[key] = round(float(pick(entry[key])), 4)
    return out


def metrics_json(summary: Dict, dataset_task: Dict[str, str]) -> Dict:
    """The compact DVC metrics (module docstring) of `summarise`'s output."""
    out: Dict = {}
    for model, protocols in summary.items():
        out[model] = {}
        for protocol, e in protocols.items():
            last = e["miou"][0]
            out[model][protocol] = {
                "overall": _values(e, lambda a: a["overall"]),
                "tasks": {t: _values(e, lambda a, t=t: a["tasks"][t]) for t in last["tasks"]},
                "datasets": {d: _values(e, lambda a, d=d: a["datasets"][d]) for d in last["datasets"]},
            }
    return out


def curves(summary: Dict, protocol: str, metric: str) -> tuple[List[str], List[List]]:
    """Header and rows of a per-round curve: ``clicks`` (or ``round``), then one column per model
    that ran ``protocol``, overall ``metric`` after each round."""
    models = [m for m, ps in summary.items() if protocol in ps]
    rounds = max(summary[m][protocol]["rounds"] for m in models)
    header = [CURVE_X.get(protocol, "round"), *models]
    rows = []
    for r in range(rounds):
        row = [r + 1]
        for m in models:
            series = summary[m][protocol][metric]
            row.append(round(series[r]["overall"], 4) if r < len(series) else "")
        rows.append(row)
    return header, rows


def _csv_text(header: Sequence, rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _row(label: List[str], values: List, higher_better: bool = True, fmt=_pct) -> str:
    shown = [fmt(v) for v in values]
    present = [v for v in values if v is not None]
    if len(present) > 1:
        best = max(present) if higher_better else min(present)
        shown = [f"**{s}**" if v is not None and fmt(v) == fmt(best) else s for s, v in zip(shown, values)]
    return "| " + " | ".join(label + shown) + " |"


def markdown_table(summary: Dict, dataset_task: Dict[str, str], selection: str) -> str:
    """The paper-style tables (module docstring) as markdown."""
    models = list(summary)
    protocols = list(dict.fromkeys(p for m in models for p in summary[m]))
    tasks = list(dict.fromkeys(dataset_task.values()))
    lines = [
        "# Interactive segmentation benchmarks (spec §10)",
        "",
        f"Scores in percent; output selection `{selection}` (spec §10.3). Task rows are the mean of "
        "their benchmarks' means; Overall is the mean of all benchmark means (spec §10.2). "
        "Best value of a row in bold.",
        "",
    ]
    for protocol in protocols:
        cols = [m for m in models if protocol in summary[m]]
        rounds = report_rounds(max(summary[m][protocol]["rounds"] for m in cols))
        unit = "clicks" if protocol == "point" else "rounds"
        lines += [f"## {protocol}", "", PROTOCOL_TITLE[protocol] + ".", ""]
        for r in rounds:
            lines += [f"### {protocol}, {r} {unit if r > 1 else unit[:-1]}", ""]
            lines.append("| Metric | Task | " + " | ".join(cols) + " |")
            lines.append("|---|---|" + "---|" * len(cols))
            for metric in ("miou", "mbiou"):
                for t in tasks:
                    vals = [_get(summary[m][protocol], metric, r, "tasks", t) for m in cols]
                    lines.append(_row([METRIC_LABEL[metric], t], vals))
                vals = [_get(summary[m][protocol], metric, r, "overall") for m in cols]
                lines.append(_row([METRIC_LABEL[metric], "**Overall**"], vals))
            lines.append("")
            lines += [f"Per benchmark, `mIoU / mBIoU` after {r} {unit if r > 1 else unit[:-1]}:", ""]
            lines.append("| Benchmark | Task | masks | " + " | ".join(cols) + " |")
            lines.append("|---|---|---|" + "---|" * len(cols))
            for t in tasks:
                for d in [d for d, dt in dataset_task.items() if dt == t]:
                    cells = []
                    for m in cols:
                        a = _get(summary[m][protocol], "miou", r, "datasets", d)
                        b = _get(summary[m][protocol], "mbiou", r, "datasets", d)
                        cells.append("" if a is None else f"{_pct(a)} / {_pct(b)}")
                    n = summary[cols[0]][protocol]["n_masks"].get(d, 0)
                    lines.append("| " + " | ".join([d, t, str(n), *cells]) + " |")
            lines.append("")
        if protocol == "point" and "noc85" in summary[cols[0]][protocol]:
            budget = summary[cols[0]][protocol]["rounds"]
            lines += [f"### point, NoC (mean clicks to reach the IoU; {budget} when never reached)", ""]
            lines.append("| Metric | Task | " + " | ".join(cols) + " |")
            lines.append("|---|---|" + "---|" * len(cols))
            for key, label in (("noc85", "NoC@85"), ("noc90", "NoC@90")):
                for t in tasks:
                    vals = [summary[m][protocol][key]["tasks"].get(t) for m in cols]
                    lines.append(_row([label, t], vals, higher_better=False, fmt=_num))
                vals = [summary[m][protocol][key]["overall"] for m in cols]
                lines.append(_row([label, "**Overall**"], vals, higher_better=False, fmt=_num))
            lines.append("")
    return "\n".join(lines)


def size_table(records, dataset_task: Dict[str, str], protocol: str = "point") -> str:
    """Markdown: mean IoU per task and target-size band (module docstring) after the first, third
    and last round of ``protocol``, one column per model; '' when no record has its image size."""
    recs = [r for r in records if r.protocol == protocol and r.image_area > 0]
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
        "| Task | area / image | masks | " + " | ".join(models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    for t in dict.fromkeys(dataset_task.values()):
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
        "benchmark the intervals are rough. `masks` counts the targets of the row.",
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
        lines.append(f"| Task | {unit} | masks | " + " | ".join(models) + " |")
        lines.append("|---|---|---|" + "---|" * len(models))
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


def delta_rows(deltas_by_metric: Dict[str, Dict[str, Dict[str, Dict[str, list]]]]) -> tuple[List[str], List[List]]:
    """The CSV of every paired difference: one row per metric, protocol, model, scope and round
    (fractions, 6 decimals)."""
    header = ["metric", "protocol", "model", "scope", "round", "delta", "lo", "hi", "verdict", "images", "masks"]
    rows = []
    for metric, by_protocol in deltas_by_metric.items():
        for protocol, per_model in by_protocol.items():
            for model, scopes in per_model.items():
                for scope, series in scopes.items():
                    for r, d in enumerate(series, start=1):
                        rows.append([metric, protocol, model, scope, r, round(d.delta, 6), round(d.lo, 6),
                                     round(d.hi, 6), d.verdict, d.n_images, d.n_masks])
    return header, rows


def _num(v) -> str:
    return "" if v is None else f"{v:.2f}"


def _get(entry: Dict, metric: str, r: int, scope: str, name: str | None = None):
    series = entry[metric]
    if r > len(series):
        return None
    agg = series[r - 1][scope]
    return agg if name is None else agg.get(name)


def per_mask_rows(records) -> tuple[List[str], List[List]]:
    """The per-mask CSV: identifiers, area (and its image's), task prompt, NoC, IoU and boundary IoU per round,
    and the clicks as ``x:y:label`` separated by spaces."""
    max_r = max(len(r.iou) for r in records)
    header = ["model", "protocol", "dataset", "image_id", "ann_id", "area", "image_area", "task_prompt", "noc85", "noc90"]
    header += [f"iou_{r + 1}" for r in range(max_r)] + [f"biou_{r + 1}" for r in range(max_r)] + ["clicks"]
    rows = []
    for rec in records:
        pad = [""] * (max_r - len(rec.iou))
        rows.append(
            [rec.model, rec.protocol, rec.dataset, rec.image_id, rec.ann_id, rec.area, rec.image_area, rec.task_prompt,
             rec.noc.get("noc85", ""), rec.noc.get("noc90", "")]
            + [round(v, 6) for v in rec.iou] + pad
            + [round(v, 6) for v in rec.biou] + pad
            + [" ".join(f"{c.x}:{c.y}:{c.label}" for c in rec.clicks)]
        )
    return header, rows


def reference_model(ev) -> str:
    """The model the others are compared with: ``eval.reference``, or the first of ``eval.models``."""
    return ev.reference or next(iter(ev.models))


def compare_to_reference(records, dataset_task: Dict[str, str], ev) -> Dict:
    """``{metric: {protocol: paired_deltas(...)}}`` for IoU and boundary IoU on every protocol the
    reference ran; {} when ``eval.bootstrap`` is 0 or only the reference was scored."""
    reference = reference_model(ev)
    if ev.bootstrap == 0 or not any(r.model != reference for r in records):
        return {}
    protocols = list(dict.fromkeys(r.protocol for r in records if r.model == reference))
    return {
        metric: {
            p: paired_deltas(records, dataset_task, reference, p, metric=metric, samples=ev.bootstrap, level=ev.ci_level)
            for p in protocols
        }
        for metric in ("iou", "biou")
    }


def write_outputs(cfg, summary, metrics, records, panels, dataset_task, info) -> Dict:
    """Write every output of the stage (module docstring); return their paths by key."""
    ev = cfg.eval
    out_dir, plots_dir = Path(ev.out_dir), Path(ev.plots_dir)
    paths: Dict = {"metrics": Path(ev.metrics)}
    atomic_write_text(ev.metrics, json.dumps(metrics, indent=2) + "\n")
    for protocol in ("point", "box"):
        if not any(protocol in ps for ps in summary.values()):
            continue
        for metric in ("miou", "mbiou"):
            path = plots_dir / f"{protocol}_{metric}.csv"
            atomic_write_text(path, _csv_text(*curves(summary, protocol, metric)))
            paths[f"{protocol}_{metric}"] = path
    paths["table"] = out_dir / "table.md"
    table = markdown_table(summary, dataset_task, ev.selection) + "\n"
    sizes = size_table(records, dataset_task)
    deltas = compare_to_reference(records, dataset_task, ev)
    shown = delta_table(deltas.get("iou", {}), reference_model(ev), ev.ci_level, ev.bootstrap) if deltas else ""
    atomic_write_text(paths["table"], table + ("\n" + sizes if sizes else "") + ("\n" + shown if shown else ""))
    if deltas:
        paths["deltas"] = out_dir / "deltas.csv"
        atomic_write_text(paths["deltas"], _csv_text(*delta_rows(deltas)))
    else:
        (out_dir / "deltas.csv").unlink(missing_ok=True)  # not one of an earlier run's settings
    paths["per_mask"] = out_dir / "per_mask.csv"
    atomic_write_text(paths["per_mask"], _csv_text(*per_mask_rows(records)))
    paths["panels"] = save_panels(panels, out_dir) if panels else []
    paths["run"] = out_dir / "run.json"
    return paths


def write_run_json(path: Path, info: Dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")


_MLFLOW_BAD = re.compile(r"[^/\w.\- ]")


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / space``): ``sum@tp0`` -> ``sum_tp0``."""
    return _MLFLOW_BAD.sub("_", key)


def mlflow_metrics(metrics: Dict, prefix: str = "") -> Dict[str, float]:
    """The metrics JSON flattened to ``model/protocol/scope[/name]/metric`` MLflow keys."""
    out: Dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(mlflow_metrics(v, key))
        else:
            out[mlflow_key(key)] = float(v)
    return out


def mlflow_curves(summary: Dict) -> Dict[int, Dict[str, float]]:
    """Overall mIoU / mBIoU per round as MLflow step metrics: step -> ``curve/model/protocol/metric``."""
    steps: Dict[int, Dict[str, float]] = {}
    for model, protocols in summary.items():
        for protocol, e in protocols.items():
            for metric in ("miou", "mbiou"):
                for r, agg in enumerate(e[metric]):
                    steps.setdefault(r + 1, {})[mlflow_key(f"curve/{model}/{protocol}/{metric}")] = agg["overall"]
    return steps
