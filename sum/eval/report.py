"""Reports of the ``evaluate`` stage: metrics JSON, curves, the paper-style table, panels (spec §10-11).

Everything here turns `sum.eval.loop.summarise`'s nested dict (model -> protocol -> per-round
aggregates) into files, written atomically:

- ``eval.metrics`` (DVC metrics): ``{model: {protocol: {"overall": {...}, "tasks": {task: {...}},
  "part_resolution": {"resolvable": {...}, "sub_resolution": {...}}, "nof95": {"overall": k,
  "tasks": {task: k}}, "n_masks": {"overall": n, "tasks": {task: n}}, "datasets": {name: {...}},
  "examples": {name: {...}}}}}`` where ``{...}`` holds ``miou_<n>`` and ``mbiou_<n>`` after
  rounds n = 1, 3, 5 and the last (fractions in [0, 1], 4 decimals) and, for the point protocol,
  ``noc85``, ``noc90`` and ``noc95`` (mean number of clicks to reach IoU 0.85 / 0.90 / 0.95, the
  click budget ``eval.noc_max_clicks`` when never). ``nof95`` counts the objects that do not
  reach 0.95 within that budget (RITM's NoF). ``datasets`` are the benchmarks in the means,
  ``examples`` (present when there are any) those of fewer than ``eval.min_images`` images, in no
  mean (a dataset entry adds its ``n_masks`` and ``nof95``). ``part_resolution`` (when a part
  benchmark is in the means) splits the part task by the model's scale rule
  (`sum.eval.protocol.target_scale`), each row with its ``n_masks`` and, when that is not 0, its
  means; the ``part`` task itself stays the mean over all its targets.
- ``<plots_dir>/{point,box}_{miou,mbiou}.csv``: the overall score after each reported round, one
  column per model (``clicks`` or ``round``, then the models), for one DVC plot with a line per
  model.
- ``<out_dir>/table.md`` (`sum.eval.tables`): the paper's main-table layout (Tab. 1: metric x
  task + overall, columns = models, the part split as two more rows) per protocol and round, then
  the per-benchmark layout (Tab. 14: cells ``mIoU / mBIoU``), in percent; NoC and NoF; the
  examples; the best value of a row in bold. Then, for the point protocol, the mean IoU per task
  and band of target size (`sum.eval.tables.size_table`). Last, against the reference model
  (``eval.reference``, default the first of ``eval.models``, the foundation model; ``@piou``
  columns against its ``@piou``): each other model's mIoU difference per task (the part split
  too) and overall with an image-bootstrap interval (`sum.eval.stats`), marked where the interval
  excludes 0.
- ``<out_dir>/deltas.csv``: those differences for IoU and boundary IoU, every protocol, scope of
  the metrics JSON (tasks, overall) and round (``eval.bootstrap: 0`` leaves out the section and
  the file).
- ``<out_dir>/panels/<benchmark>.png``: image, ground truth, each model's masks after rounds 1
  and 3 with its clicks (green positive, red negative).
- ``<out_dir>/per_mask.csv``: one row per target, model and protocol (debugging).
- ``<out_dir>/run.json``: the models (checkpoint, method, task prompt per benchmark, encoder),
  the benchmarks (task, images, whether an example, images and masks evaluated, part targets by
  scale), the eval config and the timings.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

from sum.eval.columns import NOC_THRESHOLDS, NOF_THRESHOLDS, PART_SPLIT, PIOU_SUFFIX, noc_budget, report_rounds
from sum.eval.panels import save_panels
from sum.eval.stats import paired_deltas
from sum.eval.tables import delta_table, markdown_table, size_table
from sum.io import atomic_write_text

CURVE_X = {"point": "clicks", "box": "round"}


def _values(entry: Dict, pick) -> Dict[str, float]:
    rounds = report_rounds(entry["rounds"])
    out = {}
    for metric in ("miou", "mbiou"):
        for r in rounds:
            out[f"{metric}_{r}"] = round(float(pick(entry[metric][r - 1])), 4)
    for key in NOC_THRESHOLDS:
        if key in entry:
            out[key] = round(float(pick(entry[key])), 4)
    return out


def _part_values(row: Dict, rounds: List[int]) -> Dict[str, float]:
    """One ``part_resolution`` row: ``n_masks``, then (when it has targets) the means and NoF."""
    out: Dict[str, float] = {"n_masks": row["n_masks"]}
    if row["n_masks"]:
        for metric in ("miou", "mbiou"):
            for r in rounds:
                out[f"{metric}_{r}"] = round(float(row[metric][r - 1]), 4)
        for key in NOC_THRESHOLDS:
            if key in row:
                out[key] = round(float(row[key]), 4)
    for key in NOF_THRESHOLDS:
        if key in row:
            out[key] = int(row[key])
    return out


def metrics_json(summary: Dict, dataset_task: Dict[str, str], examples: Sequence[str] = ()) -> Dict:
    """The compact DVC metrics (module docstring) of `summarise`'s output."""
    out: Dict = {}
    for model, protocols in summary.items():
        out[model] = {}
        for protocol, e in protocols.items():
            first = e["miou"][0]
            pooled = [d for d in first["datasets"] if d not in set(examples)]
            entry = {
                "overall": _values(e, lambda a: a["overall"]),
                "tasks": {t: _values(e, lambda a, t=t: a["tasks"][t]) for t in first["tasks"]},
            }
            if "part_resolution" in e:
                rounds = report_rounds(e["rounds"])
                entry["part_resolution"] = {k: _part_values(row, rounds) for k, row in e["part_resolution"].items()}
            for key in NOF_THRESHOLDS:
                if key in e:
                    entry[key] = {"overall": e[key]["overall"], "tasks": dict(e[key]["tasks"])}
            entry["n_masks"] = {
                "overall": sum(e["n_masks"][d] for d in pooled),
                "tasks": {t: sum(e["n_masks"][d] for d in pooled if dataset_task[d] == t) for t in first["tasks"]},
            }
            entry["datasets"] = {d: _dataset_values(e, d) for d in pooled}
            shown = [d for d in first["datasets"] if d in set(examples)]
            if shown:
                entry["examples"] = {d: _dataset_values(e, d) for d in shown}
            out[model][protocol] = entry
    return out


def _dataset_values(e: Dict, d: str) -> Dict[str, float]:
    out = _values(e, lambda a: a["datasets"][d])
    out["n_masks"] = e["n_masks"][d]
    for key in NOF_THRESHOLDS:
        if key in e:
            out[key] = e[key]["datasets"][d]
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


def delta_rows(deltas_by_metric: Dict[str, Dict[str, Dict[str, Dict[str, list]]]]) -> tuple[List[str], List[List]]:
    """The CSV of every paired difference: one row per metric, protocol, model, scope and round
    (fractions, 6 decimals); the scopes of ``metrics/eval.json`` (tasks and overall), so the part
    split's rows are in ``table.md`` only."""
    split = {label for label, _ in PART_SPLIT.values()}
    header = ["metric", "protocol", "model", "scope", "round", "delta", "lo", "hi", "verdict", "images", "masks"]
    rows = []
    for metric, by_protocol in deltas_by_metric.items():
        for protocol, per_model in by_protocol.items():
            for model, scopes in per_model.items():
                for scope, series in ((s, v) for s, v in scopes.items() if s not in split):
                    for r, d in enumerate(series, start=1):
                        rows.append([metric, protocol, model, scope, r, round(d.delta, 6), round(d.lo, 6),
                                     round(d.hi, 6), d.verdict, d.n_images, d.n_masks])
    return header, rows


def per_mask_rows(records) -> tuple[List[str], List[List]]:
    """The per-mask CSV: identifiers, area (and its image's), task prompt, NoC and NoF, the target's
    width at the model's input scale and its scale verdict, IoU and boundary IoU per reported round,
    and the clicks of those rounds as ``x:y:label`` separated by spaces."""
    max_r = max(len(r.iou) for r in records)
    header = ["model", "protocol", "dataset", "image_id", "ann_id", "area", "image_area", "task_prompt",
              *NOC_THRESHOLDS, *NOF_THRESHOLDS, "width_px", "resolvable"]
    header += [f"iou_{r + 1}" for r in range(max_r)] + [f"biou_{r + 1}" for r in range(max_r)] + ["clicks"]
    rows = []
    for rec in records:
        pad = [""] * (max_r - len(rec.iou))
        rows.append(
            [rec.model, rec.protocol, rec.dataset, rec.image_id, rec.ann_id, rec.area, rec.image_area, rec.task_prompt]
            + [rec.noc.get(k, "") for k in NOC_THRESHOLDS] + [rec.nof.get(k, "") for k in NOF_THRESHOLDS]
            + [round(rec.width_px, 2), int(rec.resolvable)]
            + [round(v, 6) for v in rec.iou] + pad
            + [round(v, 6) for v in rec.biou] + pad
            + [" ".join(f"{c.x}:{c.y}:{c.label}" for c in rec.clicks)]
        )
    return header, rows


def reference_model(ev) -> str:
    """The model the others are compared with: ``eval.reference``, or the first of ``eval.models``."""
    return ev.reference or next(iter(ev.models))


def compare_to_reference(records, dataset_task: Dict[str, str], ev, examples: Sequence[str] = ()) -> Dict:
    """``{metric: {protocol: paired_deltas(...)}}`` for IoU and boundary IoU on every protocol the
    reference ran; {} when ``eval.bootstrap`` is 0 or only the reference was scored.

    The ``<model>@piou`` columns are compared with ``<reference>@piou`` (the same selection), the
    others with the reference; benchmarks in ``examples`` enter no comparison. The part task's
    resolvable and sub-resolution targets are two more scopes after ``part`` (`_with_part_split`).
    """
    reference = reference_model(ev)
    if ev.bootstrap == 0 or not any(r.model != reference for r in records):
        return {}
    pooled = {d: t for d, t in dataset_task.items() if d not in set(examples)}
    groups = [(reference, [r for r in records if not r.model.endswith(PIOU_SUFFIX)])]
    if reference + PIOU_SUFFIX in {r.model for r in records}:
        groups.append((reference + PIOU_SUFFIX, [r for r in records if r.model.endswith(PIOU_SUFFIX)]))
    protocols = list(dict.fromkeys(r.protocol for r in records if r.model == reference))
    out: Dict = {}
    for metric in ("iou", "biou"):
        out[metric] = {}
        for p in protocols:
            merged: Dict = {}
            for ref, recs in groups:
                if any(r.model == ref and r.protocol == p for r in recs):
                    merged.update(_with_part_split(recs, pooled, ref, p, metric, ev.bootstrap, ev.ci_level))
            out[metric][p] = merged
    return out


def _with_part_split(records, pooled: Dict[str, str], reference: str, protocol: str, metric: str, samples: int,
                     level: float) -> Dict:
    """`paired_deltas`, with ``part (resolvable)`` and ``part (sub-resolution)`` after ``part``:
    the same comparison on the part benchmarks' targets of that kind alone (each benchmark's
    images that hold such targets redrawn), for kinds that have targets."""
    out = paired_deltas(records, pooled, reference, protocol, metric=metric, samples=samples, level=level)
    parts = [d for d, t in pooled.items() if t == "part"]
    split: Dict[str, Dict] = {}
    for label, flag in PART_SPLIT.values():
        kind = []
        for r in records:
            if r.protocol == protocol and r.dataset in parts and getattr(r, "resolvable", None) == flag:
                kind.append(copy.copy(r))
                kind[-1].dataset = f"{r.dataset} [{label}]"
        if any(r.model == reference for r in kind):
            tasks = {f"{d} [{label}]": label for d in parts if any(r.dataset == f"{d} [{label}]" for r in kind)}
            split[label] = paired_deltas(kind, tasks, reference, protocol, metric=metric, samples=samples, level=level)
    for model, scopes in out.items():
        merged = {}
        for scope, series in scopes.items():
            merged[scope] = series
            if scope == "part":
                merged.update({label: d[model][label] for label, d in split.items() if model in d})
        out[model] = merged
    return out


def write_outputs(cfg, summary, metrics, records, panels, dataset_task, info, examples: Sequence[str] = ()) -> Dict:
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
    table = markdown_table(summary, dataset_task, ev.selection, examples, noc_budget(ev), ev.min_images) + "\n"
    sizes = size_table(records, dataset_task, examples=examples)
    deltas = compare_to_reference(records, dataset_task, ev, examples)
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
