"""``sumseg seeds``: every method fine-tuned with several seeds, one evaluation of them all, and
the table of mean ± sd over seeds with the seed-averaged differences (spec §9-10).

`run_seeds` is the library call behind the command (no DVC stage: about 2 hours on 2 CPU cores
with the defaults, past the pipeline's budget; the README says how to run it). With ``seeds.*``:

1. **Fine-tunes** (`train_seed`): `sum.train.trainer.finetune` for every method of
   ``seeds.methods`` and seed of ``seeds.seeds`` (``train.seed``; the rest of ``train`` as
   configured), its scratch under ``<out_dir>/runs/<method>_s<seed>/`` (a killed fine-tune
   resumes from its state there), the checkpoint then renamed to
   ``<out_dir>/models/<method>_s<seed>.pt`` and its record ``<method>_s<seed>.json`` (the run's
   key, time and metrics) written last. A method ``<m>@<label>`` is method ``<m>`` fine-tuned
   on the uncertainty maps of ``seeds.uncertainty_variants[label]`` (``train.uncertainty_dir``):
   the dose-response of ``params/seeds/dose.yaml``, the same method on maps of growing quality. A checkpoint whose record holds the key of this config
   (`run_key`: the fine-tune's resume key, iterations included: config, method and the bytes of
   its inputs) is reused, not trained again; inputs rewritten with the same bytes (``dvc
   checkout``, a ``dvc repro`` whose outputs did not change) keep the key.
2. **One evaluation** (`seeds_eval_config`): `sum.eval.evaluate.run_evaluate` of the foundation
   model and every checkpoint on ``eval``'s benchmarks and settings, with the protocols of
   ``seeds.protocols``, no ``@tp0`` / ``@piou`` columns, no panels and no comparison of its own,
   writing under ``<out_dir>/eval/`` (never over the pipeline's ``metrics/eval.json``); reused
   when its record ``<out_dir>/eval/seeds_eval.json`` holds the key of the same checkpoints,
   settings and benchmarks.
3. **Aggregation** (`sum.eval.seed_stats.seed_summary`) of the evaluation's per-mask records:
   ``seeds.metrics`` (JSON, format ``sum-seeds/1``) and ``<out_dir>/table.md``.

Every file is written to a temporary name and renamed. One log line per fine-tune with its time,
one with the total.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from sum.eval.columns import NOC_THRESHOLDS, NOF_THRESHOLDS
from sum.eval.evaluate import run_evaluate
from sum.eval.protocol import PROTOCOLS, check_eval_config
from sum.eval.scoring import MaskRecord
from sum.eval.seed_stats import FOUNDATION, model_name, seed_summary, seeds_markdown
from sum.io import atomic_write_text, check_format, display_uri, remove_temporaries
from sum.train.method import resolve_method
from sum.train.state import input_fingerprint, resume_key
from sum.train.trainer import finetune

log = logging.getLogger(__name__)

RUN_FORMAT = "sum-seeds-run/1"
EVAL_FORMAT = "sum-seeds-eval/1"


def run_seeds(cfg) -> Dict:
    """``sumseg seeds`` (module docstring).

    Returns:
      the ``seeds.metrics`` content (`sum.eval.seed_stats.seed_summary`, with ``models``: name ->
      checkpoint, and ``timings_s``).

    Raises:
      ValueError: one line naming the ``seeds.<key>`` (or ``eval.<key>``) of a bad setting.
    """
    t_start = time.perf_counter()
    methods, comparisons = check_seeds_config(cfg)
    sd = cfg.seeds
    out = Path(sd.out_dir)
    planned = {model_name(m.name, s): "" for m in methods for s in sd.seeds}  # their names, before hours of training
    names = check_eval_config(seeds_eval_config(cfg, planned), cfg.data.datasets)
    for path in (out, sd.metrics):
        remove_temporaries(path)

    timings: Dict[str, float] = {}
    checkpoints: Dict[str, str] = {}
    trained = 0
    for method in methods:
        for seed in sd.seeds:
            name = model_name(method.name, seed)
            checkpoints[name], timings[name], fresh = train_seed(cfg, method, seed, out)
            trained += fresh

    ev = seeds_eval_config(cfg, checkpoints)
    records, dataset_task, examples, timings["evaluate"] = evaluate_once(cfg, ev, names, checkpoints)

    summary = seed_summary(records, dataset_task, [m.name for m in methods], list(sd.seeds), comparisons,
                           list(sd.rounds), examples, samples=sd.bootstrap, level=sd.ci_level)
    timings["compute"] = sum(timings.values())  # of a run from scratch: every fine-tune and the evaluation
    timings["total"] = time.perf_counter() - t_start  # of this call
    summary["models"] = {FOUNDATION: display_uri(str(cfg.model.checkpoint or "")), **checkpoints}  # no URL secret
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_text(sd.metrics, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "table.md", seeds_markdown(summary) + "\n")
    log.info("seeds: %d fine-tunes (%d trained now, %d reused) and the evaluation: %.1f s from scratch, %.1f s "
             "this call; table %s, metrics %s", len(checkpoints), trained, len(checkpoints) - trained,
             timings["compute"], timings["total"], out / "table.md", sd.metrics)
    return summary


def check_seeds_config(cfg) -> Tuple[List, List[Tuple[str, str]]]:
    """The methods (`MethodConfig`s) and the (model, reference) comparisons of ``seeds``.

    Raises:
      ValueError: "seeds.<key>: ..." for an unknown method, a bad seed, comparison, protocol,
        round or bootstrap setting.
    """
    sd = cfg.seeds
    if not sd.methods or len(set(sd.methods)) != len(sd.methods):
        raise ValueError(f"seeds.methods={list(sd.methods)}: expected distinct method names")
    methods = []
    for name in sd.methods:
        if name == FOUNDATION:
            raise ValueError(f"seeds.methods: {FOUNDATION!r} is the foundation model's column, not a method")
        base, _, label = name.partition("@")
        try:
            method = resolve_method(cfg, base)
        except ValueError as e:
            raise ValueError(f"seeds.methods: {e}") from None
        if label:
            if label not in sd.uncertainty_variants:
                raise ValueError(f"seeds.methods: {name!r}: no seeds.uncertainty_variants.{label} "
                                 f"(known: {sorted(sd.uncertainty_variants)})")
            if not method.uses_uncertainty:
                raise ValueError(f"seeds.methods: {name!r}: method {base!r} reads no uncertainty maps")
            folder = sd.uncertainty_variants[label]
            if not Path(folder).is_dir():
                raise ValueError(f"seeds.uncertainty_variants.{label}={folder}: not a folder of uncertainty maps "
                                 "(params/seeds/dose.yaml says how to make it)")
            method = dataclasses.replace(method, name=name)
        methods.append(method)
    seeds = list(sd.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(_is_int(s) and s >= 0 for s in seeds):
        raise ValueError(f"seeds.seeds={seeds}: expected distinct integers >= 0")
    pairs = comparison_pairs(list(sd.methods), list(sd.comparisons), sd.against_foundation)
    if not sd.protocols or len(set(sd.protocols)) != len(sd.protocols) or any(p not in PROTOCOLS for p in sd.protocols):
        raise ValueError(f"seeds.protocols={list(sd.protocols)}: expected distinct names among {list(PROTOCOLS)}")
    if not sd.rounds or not all(_is_int(n) and n >= 1 for n in sd.rounds):
        raise ValueError(f"seeds.rounds={list(sd.rounds)}: expected integers >= 1")
    if not _is_int(sd.bootstrap) or sd.bootstrap < 1:
        raise ValueError(f"seeds.bootstrap={sd.bootstrap!r}: expected an integer >= 1")
    if not 0.0 < sd.ci_level < 1.0:
        raise ValueError(f"seeds.ci_level={sd.ci_level!r}: expected a fraction in (0, 1)")
    return methods, pairs


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def comparison_pairs(methods: List[str], comparisons: List[str], against_foundation: bool) -> List[Tuple[str, str]]:
    """(model, reference) pairs: with ``against_foundation`` every method against the foundation
    model, then each ``"<method> vs <reference>"`` of ``comparisons`` not already there.

    Raises:
      ValueError: "seeds.comparisons: ..." for a comparison that is not two different names of
        ``methods`` (the second may be the foundation), or for nothing to compare.
    """
    pairs = [(m, FOUNDATION) for m in methods] if against_foundation else []
    for text in comparisons:
        parts = str(text).split(" vs ")
        if len(parts) != 2 or parts[0] not in methods or parts[1] not in [*methods, FOUNDATION] or parts[0] == parts[1]:
            raise ValueError(f"seeds.comparisons: {text!r}: expected '<method> vs <method or {FOUNDATION}>', two "
                             f"different names of seeds.methods {methods} (or {FOUNDATION!r} second)")
        if (parts[0], parts[1]) not in pairs:
            pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError("seeds.comparisons: empty and seeds.against_foundation false; nothing to compare")
    return pairs


def run_key(cfg, method) -> str:
    """What a finished fine-tune must share with this one to be reused: its resume key (config,
    method and input files, `sum.train.state.resume_key`) and its number of iterations."""
    return hashlib.sha256(f"{resume_key(cfg, method)}|{cfg.train.iterations}".encode()).hexdigest()


def _read_record(path: Path, expected: str) -> Optional[Dict]:
    """A record this module wrote, or None when it is missing or unreadable."""
    try:
        return check_format(json.loads(path.read_text()), expected, path, "a seeds record")
    except (OSError, ValueError):
        return None


def train_seed(cfg, method, seed: int, out_dir: Path) -> Tuple[str, float, bool]:
    """Fine-tune ``method`` with ``seed`` unless a finished run of the same `run_key` exists
    (module docstring, step 1).

    Returns:
      ``(checkpoint path, seconds of the fine-tune, trained now)``.
    """
    name = model_name(method.name, seed)
    final = out_dir / "models" / f"{name}.pt"
    record_path = final.with_suffix(".json")
    work = out_dir / "runs" / name
    label = method.name.partition("@")[2]  # a variant trains on its own uncertainty maps
    u_dir = cfg.seeds.uncertainty_variants[label] if label else cfg.train.uncertainty_dir
    train = dataclasses.replace(cfg.train, seed=seed, run_dir=str(work), model_dir=str(work), metrics_dir=str(work),
                                uncertainty_dir=u_dir)
    run_cfg = dataclasses.replace(cfg, train=train, method=method)
    key = run_key(run_cfg, method)
    record = _read_record(record_path, RUN_FORMAT)
    if record is not None and record.get("key") == key and final.is_file():
        log.info("seeds: %s reused (%s, fine-tuned in %.1f s)", name, final, record["wall_s"])
        return str(final), float(record["wall_s"]), False
    t0 = time.perf_counter()
    result = finetune(run_cfg, method.name)
    wall = time.perf_counter() - t0
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work / f"{method.name}.pt", final)
    doc = {"format": RUN_FORMAT, "key": key, "method": method.name, "seed": seed, "wall_s": round(wall, 1),
           "finetune": result}
    atomic_write_text(record_path, json.dumps(doc, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the resumable state of a finished run
    log.info("seeds: fine-tuned %s in %.1f s (%d steps, final loss %s)", name, wall, result["steps"],
             result["final_loss"])
    return str(final), wall, True


def seeds_eval_config(cfg, checkpoints: Dict[str, str]):
    """``cfg.eval`` as the seeds' evaluation runs it (module docstring, step 2): the foundation
    model and ``checkpoints`` (name -> path), ``seeds.protocols``, outputs under
    ``<seeds.out_dir>/eval``."""
    ev_dir = Path(cfg.seeds.out_dir) / "eval"
    return dataclasses.replace(
        cfg.eval, models={FOUNDATION: "", **checkpoints}, protocols=list(cfg.seeds.protocols), task_prompt_zero=[],
        predicted_iou=[], reference="", bootstrap=0, n_panels=0, metrics=str(ev_dir / "metrics.json"),
        plots_dir=str(ev_dir / "plots"), out_dir=str(ev_dir),
    )


def evaluate_once(cfg, ev, names: List[str], checkpoints: Dict[str, str]):
    """Run the seeds' evaluation, or reuse the last one when its record holds the same key (the
    checkpoints' run keys and files, the ``eval`` and model settings, the benchmarks' config and
    files).

    Returns:
      ``(records, dataset_task, examples, seconds)``: the per-mask records read back from its
      ``per_mask.csv`` (`read_per_mask`), benchmark -> task and the example benchmarks (its
      ``run.json``), and the seconds the evaluation took (when it ran, if reused).
    """
    ev_dir = Path(ev.out_dir)
    runs = {n: _read_record(Path(p).with_suffix(".json"), RUN_FORMAT)["key"] for n, p in checkpoints.items()}
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("device", "fast_path")}
    data = {n: dataclasses.asdict(cfg.data.datasets[n]) for n in names}
    files = [*checkpoints.values(), *(p for n in names for p in (data[n]["images"], data[n]["annotations"]))]
    text = json.dumps({"runs": runs, "eval": dataclasses.asdict(ev), "model": model, "data": data,
                       "inputs": input_fingerprint(files)}, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()
    record_path = ev_dir / "seeds_eval.json"
    record = _read_record(record_path, EVAL_FORMAT)
    if record is not None and record.get("key") == key and (ev_dir / "per_mask.csv").is_file():
        wall = float(record["wall_s"])
        log.info("seeds: evaluation reused (%s, evaluated in %.1f s)", ev_dir, wall)
    else:
        record_path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        run_evaluate(dataclasses.replace(cfg, eval=ev))
        wall = time.perf_counter() - t0
        atomic_write_text(record_path, json.dumps({"format": EVAL_FORMAT, "key": key, "wall_s": round(wall, 1)}) + "\n")
        log.info("seeds: evaluated %d models in %.1f s", len(ev.models), wall)
    info = json.loads((ev_dir / "run.json").read_text())
    dataset_task = {n: b["task"] for n, b in info["benchmarks"].items()}
    examples = [n for n, b in info["benchmarks"].items() if b["example"]]
    return read_per_mask(ev_dir / "per_mask.csv"), dataset_task, examples, wall


def read_per_mask(path: Path) -> List[MaskRecord]:
    """The `MaskRecord`s of an evaluation's ``per_mask.csv`` (`sum.eval.report.per_mask_rows`):
    scores of every reported round (6 decimals), NoC and NoF, the scale rule; no clicks."""
    records = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        n_rounds = sum(1 for h in reader.fieldnames or [] if h.startswith("iou_"))
        for row in reader:
            iou = [float(row[f"iou_{r}"]) for r in range(1, n_rounds + 1) if row[f"iou_{r}"] != ""]
            biou = [float(row[f"biou_{r}"]) for r in range(1, n_rounds + 1) if row[f"biou_{r}"] != ""]
            noc = {k: int(row[k]) for k in NOC_THRESHOLDS if row.get(k, "") != ""}
            nof = {k: int(row[k]) for k in NOF_THRESHOLDS if row.get(k, "") != ""}
            records.append(MaskRecord(
                model=row["model"], protocol=row["protocol"], dataset=row["dataset"], image_id=row["image_id"],
                ann_id=row["ann_id"], area=int(row["area"]), task_prompt=int(row["task_prompt"]), iou=iou, biou=biou,
                clicks=[], noc=noc, image_area=int(row["image_area"]), nof=nof,
                width_px=float(row["width_px"]), resolvable=bool(int(row["resolvable"])),
            ))
    return records
