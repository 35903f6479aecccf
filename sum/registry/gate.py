"""The no-forgetting champion gate: may a new model version take the ``champion`` alias?

A pure function of the evaluation's outputs (spec §10: ``metrics/eval.json`` and the paired
differences of ``deltas.csv``, `sum.eval.stats`) and of the current champion's recorded score:

- **Headline score** (`headline_score`): the mean over task types of the model's mean
  ``metric`` after the headline rounds (default: point-protocol mIoU after 1 and 3 clicks), each
  task type the mean of its benchmarks (spec §10.2).
- **Forgetting** (`forgetting_checks`): for every task type and gate round, the paired difference
  to the reference (the foundation model). A check fails when the model is below the reference by
  more than ``tolerance`` points *and* the image-bootstrap interval says the loss is real (it lies
  wholly below 0). Where the evaluation gives no interval (bootstrap off, or a task holding a
  benchmark of one image) the point estimate alone decides: a gate that cannot tell must not
  promote a loss it cannot rule out.
- **Decision** (`decide`): a version that forgets any task is never champion; otherwise it is
  champion when there is none, or when its headline score beats the champion's.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# eval.json's metric names and their names in deltas.csv
DELTA_METRIC = {"miou": "iou", "mbiou": "biou"}
DeltaKey = Tuple[str, str, str, str, int]  # (metric, protocol, model, scope, round)


@dataclass(frozen=True)
class Check:
    """One forgetting check: the model minus the reference on one task after one round (points)."""

    task: str
    round: int
    delta: float  # points
    lo: float  # interval ends, points; NaN without an interval
    hi: float
    verdict: str  # below | above | tie | unknown (sum.eval.stats.Delta.verdict)
    forgets: bool


@dataclass
class Judgement:
    """What the gate knows of one model before it looks at the champion."""

    model: str  # the eval.json column
    headline: float  # fraction
    checks: List[Check] = field(default_factory=list)

    @property
    def forgets(self) -> List[str]:
        """Task types with at least one failed check, in the evaluation's order."""
        return list(dict.fromkeys(c.task for c in self.checks if c.forgets))


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def _metric_key(metric: str, r: int) -> str:
    return f"{metric}_{r}"


def protocol_entry(metrics: Mapping, model: str, protocol: str, where: str) -> Mapping:
    """``metrics[model][protocol]``, or a ValueError naming what is missing."""
    if model not in metrics:
        raise ValueError(f"{where}: no model {model!r} (has {sorted(metrics)})")
    if protocol not in metrics[model]:
        raise ValueError(f"{where}: model {model!r} has no protocol {protocol!r} (has {sorted(metrics[model])})")
    return metrics[model][protocol]


def headline_score(metrics: Mapping, model: str, protocol: str, metric: str, rounds: Sequence[int], where: str) -> float:
    """Mean over task types of the mean of ``<metric>_<r>`` over ``rounds`` (a fraction).

    Raises:
      ValueError: naming ``where`` (the metrics file) and the missing model, protocol or round.
    """
    tasks = protocol_entry(metrics, model, protocol, where)["tasks"]
    if not tasks or not rounds:
        raise ValueError(f"{where}: {model}/{protocol} has no task scores to rank on")
    per_task = []
    for task, values in tasks.items():
        missing = [r for r in rounds if _metric_key(metric, r) not in values]
        if missing:
            raise ValueError(
                f"{where}: {model}/{protocol}/{task} has no {metric} after round(s) {missing} "
                f"(reported: {sorted(values)})"
            )
        per_task.append(sum(values[_metric_key(metric, r)] for r in rounds) / len(rounds))
    return sum(per_task) / len(per_task)


def read_deltas(path: str | Path) -> Dict[DeltaKey, Tuple[float, float, float, str]]:
    """``deltas.csv`` of `sum.eval.report` as ``{(metric, protocol, model, scope, round): (delta,
    lo, hi, verdict)}`` (fractions); {} when the file does not exist (bootstrap off)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            key = (row["metric"], row["protocol"], row["model"], row["scope"], int(row["round"]))
            out[key] = (float(row["delta"]), float(row["lo"]), float(row["hi"]), row["verdict"])
    return out


def reported_rounds(metrics: Mapping, model: str, protocol: str, metric: str, where: str) -> List[int]:
    """The rounds after which ``metrics`` reports ``metric`` for the model (1, 3, the last)."""
    overall = protocol_entry(metrics, model, protocol, where)["overall"]
    prefix = f"{metric}_"
    return sorted(int(k[len(prefix):]) for k in overall if k.startswith(prefix) and k[len(prefix):].isdigit())


def forgetting_checks(
    metrics: Mapping,
    deltas: Mapping[DeltaKey, Tuple[float, float, float, str]],
    model: str,
    reference: str,
    protocol: str,
    metric: str,
    rounds: Sequence[int],
    tolerance: float,
    where: str,
) -> List[Check]:
    """Every (task type, round) check of the module docstring, in the reference's task order.

    Arguments:
      metrics: ``metrics/eval.json``; deltas: `read_deltas` of its ``deltas.csv`` (may be empty).
      model, reference: eval.json columns (the candidate and the foundation model).
      protocol, metric, rounds: what is compared (``point``, ``miou``, ``[1, 3, 6]``).
      tolerance: the loss in points the gate lets pass.
    """
    ref_tasks = protocol_entry(metrics, reference, protocol, where)["tasks"]
    own_tasks = protocol_entry(metrics, model, protocol, where)["tasks"]
    checks = []
    for task in ref_tasks:
        for r in rounds:
            found = deltas.get((DELTA_METRIC.get(metric, metric), protocol, model, task, r))
            if found is not None:
                delta, lo, hi, verdict = found
            else:
                key = _metric_key(metric, r)
                if task not in own_tasks or key not in own_tasks[task] or key not in ref_tasks[task]:
                    raise ValueError(f"{where}: no {metric} after round {r} on {task} for {model!r} and {reference!r}")
                delta, lo, hi, verdict = own_tasks[task][key] - ref_tasks[task][key], math.nan, math.nan, "unknown"
            loss_is_real = verdict == "below" or verdict == "unknown"
            forgets = -100.0 * delta > tolerance and loss_is_real
            checks.append(Check(task, r, 100.0 * delta, 100.0 * lo, 100.0 * hi, verdict, forgets))
    return checks


def _interval(c: Check) -> str:
    return "no interval" if math.isnan(c.lo) else f"[{c.lo:+.1f}, {c.hi:+.1f}]"


def decide(judgement: Judgement, champion: Optional[Tuple[str, Optional[float]]], tolerance: float) -> Decision:
    """Promote or not, with the reason the UI shows (module docstring).

    Arguments:
      judgement: the candidate's headline score and forgetting checks.
      champion: (version, its recorded headline score or None) of the current champion, or None.
      tolerance: the tolerance the checks used (points), for the reason text.
    """
    failed = [c for c in judgement.checks if c.forgets]
    if failed:
        worst = min(failed, key=lambda c: c.delta)
        return Decision(
            False,
            f"forgets {', '.join(judgement.forgets)}: worst {worst.task} after {worst.round} "
            f"{'click' if worst.round == 1 else 'clicks'} {worst.delta:+.1f} points {_interval(worst)} "
            f"against the foundation model (tolerance {tolerance:g})",
        )
    score = 100.0 * judgement.headline
    if champion is None:
        return Decision(True, f"first version that forgets nothing (headline {score:.2f})")
    version, champ = champion
    if champ is None:
        return Decision(False, f"champion v{version} has no recorded headline score to compare with (headline {score:.2f})")
    if judgement.headline > champ:
        return Decision(True, f"headline {score:.2f} beats champion v{version} ({100.0 * champ:.2f}) and forgets nothing")
    return Decision(False, f"headline {score:.2f} does not beat champion v{version} ({100.0 * champ:.2f})")


def check_rows(checks: Sequence[Check]) -> List[Dict]:
    """The checks as JSON-ready dicts (NaN interval ends as None), rounded to 0.01 point."""
    rows = []
    for c in checks:
        row = asdict(c)
        for k in ("delta", "lo", "hi"):
            row[k] = None if math.isnan(row[k]) else round(row[k], 2)
        rows.append(row)
    return rows
