"""Mean ± sd over seeds and seed-averaged differences with image-bootstrap intervals, from the
per-mask records of one evaluation of every (method, seed) checkpoint and the foundation model
(``sumseg seeds``, `sum.eval.seeds`; spec §9-10).

Method m trained with seed s is the evaluation's model ``<m>_s<s>`` (`model_name`); all models are
scored on the same targets. For each protocol and each round n of ``rounds`` that it has:

- **rows** (`table_rows`): each task, the part task followed by its resolvable and sub-resolution
  targets (`sum.eval.columns.PART_SPLIT`), and overall. Benchmarks shown as examples (fewer than
  ``eval.min_images`` images) are in none of them, as in ``evaluate``.
- **score** of a method and row (`row_scores`): mIoU aggregated the paper's way (spec §10.2: a
  benchmark the mean over its targets, a task the mean of its benchmarks' means, overall the mean
  of all benchmark means; a part kind the mean over the part benchmarks that have targets of that
  kind) for each seed's model, then ``mean`` and ``sd`` of those per-seed values (``sd``: the
  sample sd, ddof 1; None with one seed). The foundation model is one value.
- **comparison** "m vs ref": per target, the mean over seeds of m's IoU minus the reference's
  (seed-averaged too when it is a trained method, the foundation's own value otherwise,
  `seed_average`), aggregated as above: ``delta``, equal to the difference of the two columns'
  means. ``lo``, ``hi``: the paired image-bootstrap interval of ``delta``
  (`sum.eval.report.compare_to_reference` on the seed-averaged records: each benchmark's images
  redrawn, the masks of an image together; None for a row with a benchmark of one image).
  ``seed_sd``: the sd over seeds of the per-seed difference (seed s of m minus seed s of the
  reference, which trained on the same batches and prompts; minus the foundation for every s).
  ``beyond_noise``: the interval excludes 0 and ``|delta| > 2 seed_sd`` (False with one seed).

Values are fractions in [0, 1] (in the JSON 4 decimals, 6 for differences); the markdown shows percent.
"""

from __future__ import annotations

import copy
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sum.config import EvalConfig
from sum.eval.columns import PART_SPLIT
from sum.eval.metrics import aggregate
from sum.eval.report import compare_to_reference
from sum.eval.tables import table_header

SEEDS_FORMAT = "sum-seeds/1"
FOUNDATION = "foundation"  # the evaluation's column of the foundation model
OVERALL = "overall"
KINDS = {label: flag for label, flag in PART_SPLIT.values()}  # part rows -> MaskRecord.resolvable


def model_name(method: str, seed: int) -> str:
    """The evaluation's model of ``method`` trained with ``seed``: ``<method>_s<seed>``; a variant
    ``<m>@<label>`` (`sum.eval.seeds`) becomes ``<m>-<label>_s<seed>`` (``@`` marks the
    evaluation's own column variants, ``sum@tp0``, and MLflow refuses it in metric names)."""
    return f"{method.replace('@', '-')}_s{seed}"


def table_rows(records: Sequence, pooled: Mapping[str, str]) -> List[str]:
    """The rows of one protocol: each task of ``pooled`` (benchmark -> task, examples left out) in
    its order that has records, the part task followed by the `PART_SPLIT` kinds it has targets
    of, then ``overall``."""
    present = {r.dataset for r in records if r.dataset in pooled}
    rows: List[str] = []
    for task in dict.fromkeys(pooled[d] for d in pooled if d in present):
        rows.append(task)
        if task == "part":
            rows += [label for label, flag in KINDS.items()
                     if any(pooled.get(r.dataset) == "part" and r.resolvable == flag for r in records)]
    return rows + [OVERALL]


def row_scores(records: Sequence, pooled: Mapping[str, str], rows: Sequence[str], rounds: Sequence[int]) -> Dict:
    """One model's mIoU per row after each of ``rounds`` (module docstring), from its records on
    one protocol: ``{row: {n: value}}``."""
    by_dataset: Dict[str, list] = {}
    for r in records:
        if r.dataset in pooled:
            by_dataset.setdefault(r.dataset, []).append(r)
    out: Dict[str, Dict[int, float]] = {row: {} for row in rows}
    for n in rounds:
        agg = aggregate({d: [x.iou[n - 1] for x in rs] for d, rs in by_dataset.items()}, pooled)
        for row in rows:
            if row == OVERALL:
                out[row][n] = float(agg["overall"])
            elif row in KINDS:
                kind = {d: [x.iou[n - 1] for x in rs if x.resolvable == KINDS[row]]
                        for d, rs in by_dataset.items() if pooled[d] == "part"}
                kind = {d: v for d, v in kind.items() if v}
                out[row][n] = float(aggregate(kind, {d: "part" for d in kind})["overall"])
            else:
                out[row][n] = float(agg["tasks"][row])
    return out


def seed_average(per_seed: Sequence[Sequence], model: str, names: Sequence[str]) -> List:
    """Per target, the mean over seeds of IoU and boundary IoU at every round, as records of
    ``model`` (the first seed's records with those values).

    Arguments:
      per_seed: each seed's records on one protocol.
      model: the name the averaged records carry.
      names: each seed's model name, for the error.

    Raises:
      ValueError: two seeds' models were scored on different targets (naming both).
    """
    keyed = [{(r.dataset, r.image_id, r.ann_id): r for r in recs} for recs in per_seed]
    for name, k in zip(names[1:], keyed[1:]):
        if set(k) != set(keyed[0]):
            raise ValueError(f"models {names[0]!r} and {name!r} were scored on different targets; "
                             "seed-averaging needs the same ones")
    out = []
    for key, rec in keyed[0].items():
        avg = copy.copy(rec)
        avg.model = model
        avg.iou = [float(v) for v in np.mean([k[key].iou for k in keyed], axis=0)]
        avg.biou = [float(v) for v in np.mean([k[key].biou for k in keyed], axis=0)]
        out.append(avg)
    return out


def _sd(values: Sequence[float]) -> Optional[float]:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _fraction(v, digits: int = 4) -> Optional[float]:
    return None if v is None or np.isnan(v) else round(float(v), digits)


def seed_summary(
    records: Sequence,
    dataset_task: Mapping[str, str],
    methods: Sequence[str],
    seeds: Sequence[int],
    comparisons: Sequence[Tuple[str, str]],
    rounds: Sequence[int],
    examples: Collection[str] = (),
    samples: int = 1000,
    level: float = 0.95,
) -> Dict:
    """Scores and comparisons of every protocol the foundation model ran (module docstring).

    Arguments:
      records: `sum.eval.scoring.MaskRecord`-like (``model, protocol, dataset, image_id, ann_id,
        iou, biou, resolvable``) of ``foundation`` and of ``<method>_s<seed>`` for every method
        and seed.
      dataset_task: benchmark -> task; its order is the rows' order.
      methods, seeds: the trained methods and their seeds.
      comparisons: (model, reference) pairs; model a method, reference a method or ``foundation``.
      rounds: the rounds reported (those a protocol has).
      examples: benchmarks outside every row.
      samples, level: bootstrap redraws (>= 1) and the interval's coverage.

    Returns:
      ``{"format", "metric", "methods", "seeds", "bootstrap", "ci_level", "examples", "protocols":
      {protocol: {"rounds", "rows", "n_masks": {row: n}, "scores": {column: {row: {"miou_<n>":
      {"mean", "sd"}}}}, "comparisons": {"<m> vs <ref>": {row: {"miou_<n>": {"delta", "lo",
      "hi", "seed_sd", "beyond_noise"}}}}}}}``; columns ``foundation`` then the methods.

    Raises:
      ValueError: ``samples`` below 1, a model without records, or seeds scored on other targets.
    """
    if samples < 1:
        raise ValueError(f"samples={samples!r}: expected at least 1 bootstrap redraw")
    pooled = {d: t for d, t in dataset_task.items() if d not in set(examples)}
    by_model: Dict[Tuple[str, str], list] = {}
    for r in records:
        by_model.setdefault((r.protocol, r.model), []).append(r)
    out: Dict = {
        "format": SEEDS_FORMAT, "metric": "miou", "methods": list(methods), "seeds": list(seeds),
        "bootstrap": samples, "ci_level": level, "examples": [d for d in dataset_task if d in set(examples)],
        "protocols": {},
    }
    protocols = dict.fromkeys(r.protocol for r in records if r.model == FOUNDATION)
    for p in protocols:
        out["protocols"][p] = _protocol_summary(by_model, p, dataset_task, pooled, methods, seeds, comparisons, rounds,
                                                examples, samples, level)
    return out


def _protocol_summary(by_model, p, dataset_task, pooled, methods, seeds, comparisons, rounds, examples, samples,
                      level) -> Dict:
    """`seed_summary` of one protocol."""
    def of(model: str) -> list:
        if (p, model) not in by_model:
            raise ValueError(f"{p}: no records of model {model!r}")
        return by_model[(p, model)]

    found = of(FOUNDATION)
    shown = [n for n in rounds if n <= len(found[0].iou)]
    rows = table_rows(found, pooled)
    per_seed = {FOUNDATION: [row_scores(found, pooled, rows, shown)]}
    for m in methods:
        per_seed[m] = [row_scores(of(model_name(m, s)), pooled, rows, shown) for s in seeds]
    scores = {
        col: {row: {f"miou_{n}": {"mean": _fraction(np.mean([x[row][n] for x in vals])),
                                  "sd": _fraction(_sd([x[row][n] for x in vals]))} for n in shown} for row in rows}
        for col, vals in per_seed.items()
    }
    comps = {}
    for m, ref in comparisons:
        names = [model_name(m, s) for s in seeds]
        mine = seed_average([of(n) for n in names], m, names)
        theirs = found
        if ref != FOUNDATION:
            ref_names = [model_name(ref, s) for s in seeds]
            theirs = seed_average([of(n) for n in ref_names], ref, ref_names)
        ev = EvalConfig(reference=ref, bootstrap=samples, ci_level=level)
        deltas = compare_to_reference(mine + theirs, dataset_task, ev, examples)["iou"][p][m]
        # seed s of m against seed s of the reference (the same batches and prompts), or the foundation
        pairs = list(zip(per_seed[m], per_seed[ref] if ref != FOUNDATION else per_seed[FOUNDATION] * len(seeds)))
        comps[f"{m} vs {ref}"] = {
            row: {f"miou_{n}": _difference(deltas[row][n - 1], [a[row][n] - b[row][n] for a, b in pairs]) for n in shown}
            for row in rows
        }
    return {"rounds": shown, "rows": rows, "n_masks": _row_masks(found, pooled, rows), "scores": scores,
            "comparisons": comps}


def _difference(d, per_seed: Sequence[float]) -> Dict:
    """One cell of a comparison: the `sum.eval.stats.Delta` with the seed sd of the difference and
    the beyond-noise flag (module docstring)."""
    sd = _sd(per_seed)
    excludes_0 = d.verdict in ("above", "below")
    return {
        "delta": _fraction(d.delta, 6), "lo": _fraction(d.lo, 6), "hi": _fraction(d.hi, 6), "seed_sd": _fraction(sd, 6),
        "beyond_noise": bool(excludes_0 and sd is not None and abs(d.delta) > 2 * sd),
    }


def _row_masks(records: Sequence, pooled: Mapping[str, str], rows: Sequence[str]) -> Dict[str, int]:
    """Targets of each row (of one model's records)."""
    mine = [r for r in records if r.dataset in pooled]
    out = {}
    for row in rows:
        if row == OVERALL:
            out[row] = len(mine)
        elif row in KINDS:
            out[row] = sum(1 for r in mine if pooled[r.dataset] == "part" and r.resolvable == KINDS[row])
        else:
            out[row] = sum(1 for r in mine if pooled[r.dataset] == row)
    return out


def _pct(v: Optional[float]) -> str:
    return "\u2013" if v is None else f"{100 * v:.1f}"


def _signed(v: Optional[float]) -> str:
    """Points with their sign (a true minus); 0.0 for what rounds to zero."""
    if v is None:
        return "n/a"
    text = f"{100 * v:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text.replace("-", "\u2212")


def seeds_markdown(summary: Dict) -> str:
    """``table.md`` of ``sumseg seeds``: per protocol the scores (rows = task rows and rounds,
    columns = foundation and the methods, ``mean ± sd``) and the comparisons (``delta [lo, hi]``,
    the seed sd; ↑ / ↓ where the interval excludes 0, bold where beyond noise)."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    level = f"{100 * summary['ci_level']:.0f}%"
    lines = [
        f"# Seeds: mIoU as mean \u00b1 sd over seeds {seeds} (spec \u00a79-10)",
        "",
        "Each method is fine-tuned once per seed (`train.seed`) and every checkpoint is scored with the "
        "foundation model on the same targets (`sumseg seeds`, `sum.eval.seed_stats`). Scores in percent, "
        "aggregated the paper's way (spec \u00a710.2); `mean \u00b1 sd` over seeds (sample sd). "
        "`part (resolvable)` and `part (sub-resolution)` split the part targets by the model's scale rule."
        + (f" Examples outside every row: {', '.join(summary['examples'])}." if summary["examples"] else ""),
        "",
        f"A difference is the seed-averaged one (per target, the mean over seeds of the model minus the "
        f"reference, itself seed-averaged when trained), in points, with its {level} paired image-bootstrap "
        f"interval ({summary['bootstrap']} redraws of each benchmark's images, `sum.eval.stats`) and `sd`, the "
        "sd over seeds of the per-seed difference. \u2191 / \u2193: the interval lies wholly above / below 0; "
        "**bold**: beyond noise, the interval excludes 0 and the difference exceeds 2 sd.",
        "",
    ]
    for protocol, entry in summary["protocols"].items():
        unit = "clicks" if protocol == "point" else "rounds"
        cols = list(entry["scores"])
        lines += [f"## {protocol}", "", *table_header(["Task", unit, "masks", *cols])]
        for row in entry["rows"]:
            for n in entry["rounds"]:
                cells = [_score_cell(entry["scores"][c][row][f"miou_{n}"]) for c in cols]
                lines.append("| " + " | ".join([row, str(n), str(entry["n_masks"][row]), *cells]) + " |")
        lines.append("")
        if entry["comparisons"]:
            names = list(entry["comparisons"])
            lines += [f"### {protocol}, differences", "",
                      *table_header(["Task", unit, *(n.replace(" vs ", " \u2212 ") for n in names)])]
            for row in entry["rows"]:
                for n in entry["rounds"]:
                    cells = [_difference_cell(entry["comparisons"][c][row][f"miou_{n}"]) for c in names]
                    lines.append("| " + " | ".join([row, str(n), *cells]) + " |")
            lines.append("")
    return "\n".join(lines)


def _score_cell(cell: Dict) -> str:
    return _pct(cell["mean"]) if cell["sd"] is None else f"{_pct(cell['mean'])} \u00b1 {_pct(cell['sd'])}"


def _difference_cell(cell: Dict) -> str:
    interval = "[n/a]" if cell["lo"] is None else f"[{_signed(cell['lo'])}, {_signed(cell['hi'])}]"
    arrow = ""
    if cell["lo"] is not None and cell["lo"] > 0:
        arrow = " \u2191"
    elif cell["hi"] is not None and cell["hi"] < 0:
        arrow = " \u2193"
    sd = "" if cell["seed_sd"] is None else f", sd {_pct(cell['seed_sd'])}"
    text = f"{_signed(cell['delta'])} {interval}{arrow}{sd}"
    return f"**{text}**" if cell["beyond_noise"] else text
