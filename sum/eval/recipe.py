"""``sumseg recipe``: the fine-tuning recipe chosen on the validation split alone (spec §8, §10).

The embedded default fine-tunes for tens of steps, not the paper's 6,000 (spec §8.1), so its
``train.lr``, ``train.iterations`` and ``train.task_prompt_lr_scale`` cannot be the paper's: they
are chosen, on data that no benchmark shares. `choose_recipe` fine-tunes a small grid of
candidates and scores each on the datasets of role ``validation`` (the world's ``hq_val``) with the
evaluation's own point protocol (`sum.eval.loop.evaluate_benchmarks`, spec §10.3: oracle of 3 for
a single click, prompts accumulating). The rule, written in params/recipe/default.yaml before any
result (`RULE`; `choose_lr_and_steps`, `choose_task_prompt_scale`):

- score: the validation mIoU averaged over the mIoU after ``recipe.clicks`` (1, 3, 5) clicks;
- (a) lr and iterations on ``recipe.method`` (``vanilla``, the plain recipe: no method is
  favoured) at task-prompt lr scale 1: the highest score; scores within ``recipe.tie`` of the best
  tie, and a tie goes to the smaller lr, then to fewer steps;
- (b) with those, the task-prompt lr scale on ``recipe.task_prompt_method`` (``sum``): the highest
  score; a tie goes to the smaller scale.

Candidates train into ``recipe.out_dir`` (``runs/``, ``models/<candidate>/``, ``finetune/``),
never over ``models/*.pt``, with MLflow off. The step counts of one lr are checkpoints of one run:
each count resumes the run from the state the previous count left (`sum.train.state`: the same
steps as one straight run). Each score goes to ``<out_dir>/scores.json`` under a key of all it
depends on (the training's `resume_key` and step count, the scoring settings, the validation
files): a rerun keeps the scores whose key still holds and computes the others. The report,
``recipe.metrics``, holds every candidate's scores and the choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np
import torch

from sum.data.dataset import select_datasets
from sum.data.skipped import open_dataset
from sum.eval.loop import EncoderEmbeddings, evaluate_benchmarks, summarise
from sum.eval.protocol import check_eval_config, decoder_autocast
from sum.eval.scoring import load_eval_models
from sum.io import S3Options, atomic_write_text, check_format, remove_temporaries
from sum.model.checkpoint import resolve_device
from sum.train.method import resolve_method
from sum.train.state import input_fingerprint, resume_key, run_paths
from sum.train.trainer import finetune

log = logging.getLogger(__name__)

RECIPE_FORMAT = "sum-recipe/1"
SCORES_FORMAT = "sum-recipe-scores/1"
VALIDATION = "validation"
CANDIDATE = "candidate"  # the model's name in a scoring evaluation
TIE_EPS = 1e-9  # float slack of "within tie": 0.702 - 0.002 is 0.7000000000000001
RULE = (
    "score: point-protocol mIoU on the validation datasets averaged over the mIoU after recipe.clicks clicks. "
    "(a) lr and iterations on recipe.method at task_prompt_lr_scale 1, the step counts checkpoints of one run per "
    "lr: the highest score; scores within recipe.tie of the best tie, a tie goes to the smaller lr, then fewer steps. "
    "(b) with those, task_prompt_lr_scale on recipe.task_prompt_method: the highest score; a tie goes to the "
    "smaller scale."
)


# ---- the rule --------------------------------------------------------------------------------


def validation_score(miou: Mapping[int, float], clicks: Sequence[int]) -> float:
    """The recipe's score: the mean of the validation mIoU after each number of ``clicks``.

    Arguments:
      miou: clicks -> mIoU after that many clicks (fractions, as ``metrics/eval.json``).
      clicks: ``recipe.clicks``.
    """
    return float(np.mean([miou[k] for k in clicks]))


def best_within_tie(candidates: Sequence[Mapping], tie: float, order: Callable[[Mapping], Any]) -> Mapping:
    """The candidate of the highest ``score``; when several score within ``tie`` of it (inclusive),
    the first of them by ``order``.

    Raises:
      ValueError: for no candidate.
    """
    if not candidates:
        raise ValueError("recipe: no candidate to choose from")
    best = max(c["score"] for c in candidates)
    return min((c for c in candidates if c["score"] >= best - tie - TIE_EPS), key=order)


def choose_lr_and_steps(candidates: Sequence[Mapping], tie: float) -> Mapping:
    """Rule (a): of candidates with ``lr``, ``iterations`` and ``score``, the best; a tie goes to
    the smaller lr, then to fewer steps."""
    return best_within_tie(candidates, tie, lambda c: (c["lr"], c["iterations"]))


def choose_task_prompt_scale(candidates: Sequence[Mapping], tie: float) -> Mapping:
    """Rule (b): of candidates with ``task_prompt_lr_scale`` and ``score``, the best; a tie goes
    to the smaller scale."""
    return best_within_tie(candidates, tie, lambda c: c["task_prompt_lr_scale"])


def recipe_overrides(chosen: Mapping) -> List[str]:
    """The chosen values as the overrides that set them (``train.lr=5e-05 ...``)."""
    return [f"train.lr={float(chosen['lr'])!r}", f"train.iterations={int(chosen['iterations'])}",
            f"train.task_prompt_lr_scale={float(chosen['task_prompt_lr_scale'])!r}"]


# ---- the config ------------------------------------------------------------------------------


def check_recipe_config(cfg) -> List[str]:
    """Validate ``recipe`` (and its methods) before any work; return the validation dataset names.

    Raises:
      ValueError: one line naming the ``recipe.<key>`` and what was expected.
    """
    r = cfg.recipe
    for key, integer in (("lrs", False), ("iterations", True), ("task_prompt_lr_scales", False), ("clicks", True)):
        values = list(getattr(r, key))
        good = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   and (not integer or float(v).is_integer()) for v in values)
        if not values or not good or len(set(values)) != len(values):
            kind = "integers >= 1" if integer else "numbers > 0"
            raise ValueError(f"recipe.{key}={values}: expected a non-empty list of distinct {kind}")
    if not isinstance(r.tie, (int, float)) or isinstance(r.tie, bool) or not r.tie >= 0:
        raise ValueError(f"recipe.tie={r.tie!r}: expected a number >= 0")
    for key in ("max_images", "max_masks_per_image"):
        value = getattr(r, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"recipe.{key}={value!r}: expected an integer >= 0")
    for key in ("method", "task_prompt_method"):
        try:
            resolve_method(cfg, getattr(r, key))
        except ValueError as e:
            raise ValueError(f"recipe.{key}: {e}") from None
    if Path(r.metrics).resolve() == Path(cfg.eval.metrics).resolve():
        raise ValueError(f"recipe.metrics={r.metrics!r}: that is eval.metrics; the recipe writes its own file")
    return validation_datasets(r.datasets, cfg.data.datasets)


def validation_datasets(names: Sequence[str], datasets: Mapping[str, Any]) -> List[str]:
    """``recipe.datasets``, or every dataset of role ``validation``; each must have that role (the
    recipe is never chosen on a benchmark or on training data).

    Raises:
      ValueError: naming ``recipe.datasets``.
    """
    names = list(names) or [n for n, d in datasets.items() if d.role == VALIDATION]
    if not names:
        raise ValueError(f"recipe.datasets: empty and no dataset in data.datasets has role {VALIDATION!r}")
    names = select_datasets(datasets, names, "recipe.datasets")
    other = {n: datasets[n].role for n in names if datasets[n].role != VALIDATION}
    if other:
        raise ValueError(f"recipe.datasets: {other}: expected datasets of role {VALIDATION!r} only")
    return names


# ---- candidates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One recipe to fine-tune and score."""

    method: str
    lr: float
    iterations: int
    task_prompt_lr_scale: float

    @property
    def run(self) -> str:
        """The training run it is a checkpoint of: one per method, lr and scale."""
        return f"{self.method}-lr{self.lr:g}-tp{self.task_prompt_lr_scale:g}"

    @property
    def name(self) -> str:
        return f"{self.run}-it{self.iterations}"


def candidate_config(cfg, c: Candidate):
    """``cfg`` with the candidate's recipe, its outputs under ``recipe.out_dir`` and MLflow off."""
    out = Path(cfg.recipe.out_dir)
    train = dataclasses.replace(
        cfg.train, lr=float(c.lr), iterations=int(c.iterations), task_prompt_lr_scale=float(c.task_prompt_lr_scale),
        run_dir=str(out / "runs" / c.run), model_dir=str(out / "models" / c.name), metrics_dir=str(out / "finetune" / c.name),
    )
    return dataclasses.replace(cfg, train=train, tracking=dataclasses.replace(cfg.tracking, enabled=False))


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def saved_step(path: Path) -> int:
    """The step of the training state at ``path``; 0 when there is none or it does not read (the
    trainer sets such a file aside)."""
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("step", 0))
    except Exception:  # torch.load raises RuntimeError, pickle and zip errors alike for a bad file
        return 0


class ScoreStore:
    """``<recipe.out_dir>/scores.json``: each scored candidate under its name, with its key;
    rewritten atomically after each."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: Dict[str, Dict] = {}
        if path.is_file():
            doc = check_format(json.loads(path.read_text()), SCORES_FORMAT, path, "a recipe score file")
            self.entries = dict(doc["candidates"])

    def get(self, name: str, key: str):
        entry = self.entries.get(name)
        return entry if entry is not None and entry.get("key") == key else None

    def put(self, name: str, entry: Dict) -> None:
        self.entries[name] = entry
        atomic_write_text(self.path, json.dumps({"format": SCORES_FORMAT, "candidates": self.entries}, indent=2) + "\n")


class ValidationScorer:
    """Scores a checkpoint on the validation datasets with the evaluation's point protocol.

    Arguments:
      cfg: the resolved `Config`; ``recipe`` says the clicks and targets, ``eval`` the target
        seed, decoder and precision.
      names: the validation datasets (`validation_datasets`).
    """

    def __init__(self, cfg, names: Sequence[str]):
        self.cfg, self.names = cfg, list(names)
        r = cfg.recipe
        self.ev = dataclasses.replace(
            cfg.eval, models={CANDIDATE: ""}, datasets=list(self.names), protocols=["point"], rounds=max(r.clicks),
            noc_max_clicks=0, selection="oracle", predicted_iou=[], task_prompt_zero=[], max_images=r.max_images,
            max_masks_per_image=r.max_masks_per_image, min_images=1, n_panels=0, bootstrap=0, reference="",
        )
        check_eval_config(self.ev, cfg.data.datasets)

    def settings(self) -> Dict:
        """What a score depends on besides the model: the part of every candidate's key."""
        ds = {n: dataclasses.asdict(self.cfg.data.datasets[n]) for n in self.names}
        files = [p for d in ds.values() for p in (d["images"], d["annotations"])]
        ev, r = self.ev, self.cfg.recipe
        return {"datasets": ds, "files": input_fingerprint(files), "clicks": list(r.clicks), "validate": self.cfg.data.validate.mode,
                **{k: getattr(ev, k) for k in ("max_images", "max_masks_per_image", "target_seed", "decoder", "precision")}}

    def score(self, checkpoint: str) -> Dict:
        """``score`` (`validation_score`), ``miou`` after each click count, per dataset, and the
        number of targets, of ``checkpoint`` ('' = ``model.checkpoint``, the foundation)."""
        cfg, clicks = self.cfg, list(self.cfg.recipe.clicks)
        ev = dataclasses.replace(self.ev, models={CANDIDATE: checkpoint})
        models = load_eval_models(dataclasses.replace(cfg, eval=ev), s3=S3Options.from_config(cfg.storage.s3))
        tasks = {n: cfg.data.datasets[n].task for n in self.names}
        trained = sorted({d.task for d in cfg.data.datasets.values() if d.role == "labeled"})
        data = {n: open_dataset(cfg.data, n) for n in self.names}
        autocast = decoder_autocast(ev.precision, resolve_device(cfg.model.device))
        records, _ = evaluate_benchmarks(models, data, tasks, trained, ev, EncoderEmbeddings(cfg.embed.out_dir, models), autocast)
        if not records:
            raise ValueError(f"recipe.datasets: no non-empty target mask in {self.names}")
        point = summarise(records, tasks)[CANDIDATE]["point"]
        miou = {k: float(point["miou"][k - 1]["overall"]) for k in clicks}
        return {
            "score": validation_score(miou, clicks),
            "miou": {str(k): v for k, v in miou.items()},
            "datasets": {n: {str(k): float(point["miou"][k - 1]["datasets"][n]) for k in clicks} for n in self.names},
            "n_masks": int(sum(point["n_masks"].values())),
        }


def run_candidate(cfg, c: Candidate, scorer: ValidationScorer, store: ScoreStore, settings: Dict) -> Dict:
    """Fine-tune and score ``c``, or return its stored score when its key still holds."""
    cc = candidate_config(cfg, c)
    key = digest({"train": resume_key(cc, resolve_method(cc, c.method)), "iterations": c.iterations, "scoring": settings})
    entry = store.get(c.name, key)
    if entry is not None:
        log.info("recipe: %s: scored before, %.4f", c.name, entry["score"])
        return entry
    paths = run_paths(cc.train, c.method)
    if saved_step(paths.state) > c.iterations:  # the run is past this count: train it again from the start
        log.info("recipe: %s: %s is past step %d; training from step 0", c.name, paths.state, c.iterations)
        paths.state.unlink()
    trained = finetune(cc, c.method)
    entry = {"key": key, "name": c.name, **dataclasses.asdict(c), "checkpoint": str(paths.model),
             "resumed_from_step": trained["resumed_from_step"], **scorer.score(str(paths.model))}
    store.put(c.name, entry)
    log.info("recipe: %s: score %.4f (mIoU %s)", c.name, entry["score"], entry["miou"])
    return entry


def score_foundation(cfg, scorer: ValidationScorer, store: ScoreStore, settings: Dict) -> Dict:
    """The foundation model's score, for reference (it takes no part in the choice)."""
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("device", "fast_path")}
    key = digest({"model": model, "weights": input_fingerprint([cfg.model.checkpoint or ""]), "scoring": settings})
    entry = store.get("foundation", key)
    if entry is None:
        entry = {"key": key, "name": "foundation", **scorer.score("")}
        store.put("foundation", entry)
    return entry


# ---- the stage -------------------------------------------------------------------------------


def choose_recipe(cfg) -> Dict:
    """Choose ``train.lr``, ``train.iterations`` and ``train.task_prompt_lr_scale`` by the rule
    (module docstring) on the validation datasets; the ``recipe`` command's library call.

    Returns:
      the report written to ``recipe.metrics``: ``format``, ``rule``, ``datasets``, ``clicks``,
      ``tie``, ``foundation`` (its scores), ``lr_and_iterations`` and ``task_prompt_lr_scale``
      (each: ``method``, ``candidates`` with their scores, ``chosen``), and ``chosen`` (the three
      values).

    Raises:
      ValueError: naming the ``recipe.<key>`` of a bad setting (`check_recipe_config`).
    """
    r = cfg.recipe
    names = check_recipe_config(cfg)
    scorer = ValidationScorer(cfg, names)
    settings = scorer.settings()
    remove_temporaries(r.metrics)  # of a killed run
    store = ScoreStore(Path(r.out_dir) / "scores.json")
    foundation = score_foundation(cfg, scorer, store, settings)
    # (a) every lr on the plain method, its step counts in order: checkpoints of one run
    first = [run_candidate(cfg, Candidate(r.method, float(lr), int(it), 1.0), scorer, store, settings)
             for lr in r.lrs for it in sorted(r.iterations)]
    a = choose_lr_and_steps(first, r.tie)
    # (b) the task-prompt lr scale at (a)'s lr and steps
    second = [run_candidate(cfg, Candidate(r.task_prompt_method, a["lr"], a["iterations"], float(s)), scorer, store, settings)
              for s in r.task_prompt_lr_scales]
    b = choose_task_prompt_scale(second, r.tie)
    chosen = {"lr": a["lr"], "iterations": a["iterations"], "task_prompt_lr_scale": b["task_prompt_lr_scale"]}

    def public(entry: Mapping) -> Dict:
        return {k: v for k, v in entry.items() if k != "key"}

    doc = {
        "format": RECIPE_FORMAT,
        "rule": RULE,
        "datasets": names,
        "clicks": list(r.clicks),
        "tie": r.tie,
        "foundation": public(foundation),
        "lr_and_iterations": {"method": r.method, "task_prompt_lr_scale": 1.0, "candidates": [public(e) for e in first],
                              "chosen": {"lr": a["lr"], "iterations": a["iterations"], "score": a["score"]}},
        "task_prompt_lr_scale": {"method": r.task_prompt_method, "lr": a["lr"], "iterations": a["iterations"],
                                 "candidates": [public(e) for e in second],
                                 "chosen": {"task_prompt_lr_scale": b["task_prompt_lr_scale"], "score": b["score"]}},
        "chosen": chosen,
    }
    atomic_write_text(r.metrics, json.dumps(doc, indent=2) + "\n")
    log.info("recipe: chosen %s on %s (%s)", " ".join(recipe_overrides(chosen)), names, r.metrics)
    return doc
