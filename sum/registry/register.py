"""The ``register`` stage: fine-tuned checkpoints into the MLflow model registry, judged by the
no-forgetting gate (`sum.registry.gate`).

For each method of ``registry.methods`` `register` logs ``<train.model_dir>/<method>.pt`` as an
MLflow 3 pyfunc model (`sum.registry.pyfunc`; the checkpoint shipped through ``artifacts=``,
the ``sum`` package through ``code_paths=``, pip requirements pinned to ``uv.lock``, a signature
from the request/response types and an input example), registers it as a new version of
``registry.model_name`` (default ``sum-<model.name>``: one registered model per foundation
backbone), and sets aliases: ``challenger`` always, ``champion`` when the gate promotes it.

Each version is tagged with its lineage (git commit, the ``dvc.lock`` md5s of the fine-tuning
stage's inputs and output, the foundation checkpoint's sha256, the method and its flags as
trained, the runs that trained and evaluated it) and with the evaluation it was judged on
(per-task scores, differences to the foundation model with their intervals, the headline score,
the decision and its reason), so the registry UI shows why a version was or was not promoted.
The decisions also go to ``registry.out`` (``metrics/register.json``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from sum.eval.report import reference_model
from sum.io import atomic_write_text, md5_file, sha256_file
from sum.model.checkpoint import read_checkpoint
from sum.registry import gate
from sum.registry.pyfunc import DEFAULT_MODEL_CONFIG
from sum.tracking import EVAL_MD5_TAG, MODEL_MD5_TAG, dvc_lineage, git_commit, global_tracking_uri, stage_run, tracking_uri

log = logging.getLogger(__name__)

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the ``sum`` package, shipped with the model
METRICS = ("miou", "mbiou")
CHAMPION, CHALLENGER = "champion", "challenger"
# what the pyfunc imports when it loads and predicts (distribution names in uv.lock)
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "segment-anything",
    "mobilesam-mirror",
    "timm",
    "numpy",
    "pillow",
    "pycocotools",
    "omegaconf",
    "pydantic",
    "pyyaml",
    "boto3",
)


def check_registry_config(rc) -> None:
    """Raises ValueError naming the ``registry.<key>`` of a bad value."""
    if not rc.methods:
        raise ValueError("registry.methods: empty; name at least one fine-tuned method (e.g. [sum])")
    if rc.metric not in METRICS:
        raise ValueError(f"registry.metric={rc.metric!r}: expected one of {', '.join(METRICS)}")
    for key in ("headline_rounds", "gate_rounds"):
        bad = [r for r in getattr(rc, key) if int(r) < 1]
        if bad:
            raise ValueError(f"registry.{key}: rounds count from 1, got {bad}")
    if not rc.headline_rounds:
        raise ValueError("registry.headline_rounds: empty; the headline score needs at least one round")
    if not rc.tolerance >= 0:
        raise ValueError(f"registry.tolerance={rc.tolerance}: a loss in points, >= 0")
    if rc.embedding_cache_size < 1:
        raise ValueError(f"registry.embedding_cache_size={rc.embedding_cache_size}: keep at least one embedding")


def registered_model_name(cfg) -> str:
    """``registry.model_name``, or ``sum-<model.name>`` (one registered model per backbone)."""
    return cfg.registry.model_name or f"sum-{cfg.model.name}"


def pinned_requirements(lock: str | Path = "uv.lock", names=SERVING_REQUIREMENTS) -> List[str]:
    """``name==version`` for each of ``names`` as the project's lock file pins it.

    Raises:
      FileNotFoundError / ValueError: naming the lock file, or the package it does not pin.
    """
    lock = Path(lock)
    if not lock.is_file():
        raise FileNotFoundError(f"{lock}: lock file not found (the model's pip requirements are pinned from it)")
    versions = {p["name"]: p.get("version") for p in tomllib.loads(lock.read_text()).get("package", [])}
    out = []
    for name in names:
        if not versions.get(name):
            raise ValueError(f"{lock}: pins no version of {name!r}, which the served model imports")
        out.append(f"{name}=={versions[name]}")
    return out


def input_example() -> List[Dict[str, Any]]:
    """A request the model answers at log time (MLflow checks the example against the model): a
    small synthetic picture, base64 PNG, one click on its disc, the salient task."""
    yy, xx = np.mgrid[0:96, 0:128]
    disc = (yy - 48) ** 2 + (xx - 64) ** 2 < 30**2
    image = np.stack([np.where(disc, 220, 40), np.where(disc, 120, 60), (xx * 2).clip(0, 255)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return [{"image": png, "point_coords": [[64.0, 48.0]], "point_labels": [1], "task": "salient", "multimask": True}]


def eval_column(cfg, checkpoint: Path, method: str) -> str:
    """The ``eval.models`` column whose checkpoint is ``checkpoint``.

    Raises:
      ValueError: naming ``registry.methods`` when the checkpoint was not evaluated.
    """
    for name, uri in cfg.eval.models.items():
        if uri and "://" not in str(uri) and Path(uri).resolve() == checkpoint.resolve():
            return name
    raise ValueError(
        f"registry.methods: {method}: {checkpoint} is not among eval.models ({dict(cfg.eval.models)}); "
        "evaluate it before registering"
    )


def find_run(client, experiment: str, tag: str, value: str) -> Optional[str]:
    """The newest run of ``experiment`` whose tag ``tag`` is ``value``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def current_champion(client, name: str) -> Optional[Tuple[str, Optional[float]]]:
    """(version, recorded headline score) of the ``champion`` alias, or None."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    score = mv.tags.get("headline")
    try:
        return str(mv.version), (float(score) if score is not None else None)
    except ValueError:
        return str(mv.version), None


def _staged_package(dest: Path) -> Path:
    """A copy of the ``sum`` package without caches, for ``code_paths``."""
    target = dest / "sum"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def judge(cfg, metrics: Dict, deltas: Dict, column: str, reference: str, where: str) -> gate.Judgement:
    """The gate's view of one eval.json column (`sum.registry.gate`)."""
    rc = cfg.registry
    rounds = list(rc.gate_rounds) or gate.reported_rounds(metrics, reference, rc.protocol, rc.metric, where)
    headline = gate.headline_score(metrics, column, rc.protocol, rc.metric, list(rc.headline_rounds), where)
    checks = gate.forgetting_checks(
        metrics, deltas, column, reference, rc.protocol, rc.metric, rounds, float(rc.tolerance), where
    )
    return gate.Judgement(column, headline, checks)


def version_tags(cfg, method: str, checkpoint: Path, judgement: gate.Judgement, decision: gate.Decision,
                 metrics: Dict, reference: str, runs: Dict[str, Optional[str]]) -> Dict[str, str]:
    """Every tag of a new version (module docstring)."""
    rc = cfg.registry
    meta = read_checkpoint(checkpoint).meta
    tags: Dict[str, str] = {
        "method": method,
        "git_commit": git_commit() or "unknown",
        "checkpoint_md5": md5_file(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "foundation": str(cfg.model.checkpoint or ""),
        "foundation_sha256": cfg.model.checkpoint_sha256
        or (sha256_file(cfg.model.checkpoint) if cfg.model.checkpoint and Path(cfg.model.checkpoint).is_file() else "unknown"),
        "training_steps": str(meta.get("steps", "")),
        "eval_column": judgement.model,
        "eval_reference": reference,
        "headline": f"{judgement.headline:.6f}",
        "headline_metric": f"{rc.protocol} {rc.metric} after {'/'.join(map(str, rc.headline_rounds))} clicks, mean over task types",
        "promoted": str(decision.promoted).lower(),
        "reason": decision.reason,
        "training_run_id": runs.get("training") or "unknown",
        "evaluation_run_id": runs.get("evaluation") or "unknown",
    }
    for key, value in (meta.get("method_config") or {}).items():
        tags[f"method.{key}"] = str(value)
    tags.update(dvc_lineage("dvc.lock", f"finetune@{method}"))
    for scope, values in metrics[judgement.model][rc.protocol]["tasks"].items():
        for key, value in values.items():
            tags[f"eval.{scope}.{key}"] = f"{value:.4f}"
    for c in judgement.checks:
        interval = "" if math.isnan(c.lo) else f" [{c.lo:+.1f}, {c.hi:+.1f}]"
        tags[f"delta.{c.task}.{c.round}"] = f"{c.delta:+.1f}{interval} {c.verdict}"
    if judgement.forgets:
        tags["forgets"] = ",".join(judgement.forgets)
    return tags


def log_and_register(client, uri: str, cfg, method: str, checkpoint: Path, run_id: str, tags: Dict[str, str],
                     description: str):
    """Log the pyfunc into run ``run_id`` of the store at ``uri`` and register it; return the new
    ``ModelVersion``."""
    name = registered_model_name(cfg)
    model_config = {**DEFAULT_MODEL_CONFIG, "embedding_cache_size": int(cfg.registry.embedding_cache_size)}
    with global_tracking_uri(uri):
        with tempfile.TemporaryDirectory(prefix="sum-register-") as tmp, mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=method,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(_staged_package(Path(tmp)))],
                pip_requirements=pinned_requirements(),
                input_example=input_example(),
                model_config=model_config,
            )
            mlflow.log_metrics({k: float(v) for k, v in tags.items() if k.startswith("eval.")}, model_id=info.model_id)
        try:
            client.create_registered_model(name, description=f"SUM fine-tunes of {cfg.model.name} (spec §9); "
                                           "aliases: champion (the gate's choice), challenger (the newest)")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Still under the global URI: a SQL registry store resolves ``models:/m-...`` sources through
        # a fresh ``MlflowClient()``, i.e. the global tracking URI, not ``client``'s (MLflow 3.x).
        return client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                           description=description, model_id=info.model_id)


def register(cfg) -> Dict[str, Any]:
    """The ``register`` stage (module docstring).

    Returns:
      the content of ``registry.out``: per method its version, headline score, the champion it was
      compared with, the forgetting checks, the decision and its reason.

    Raises:
      ValueError: naming the ``registry.<key>`` of a bad value, or the metrics file and the model or
        round it lacks; FileNotFoundError: naming a missing checkpoint or metrics file.
    """
    rc = cfg.registry
    check_registry_config(rc)
    if not cfg.tracking.enabled:
        raise ValueError("tracking.enabled=false: the register stage needs MLflow (its registry is the output)")
    where = str(cfg.eval.metrics)
    if not Path(where).is_file():
        raise FileNotFoundError(f"{where}: evaluation metrics not found (run `sumseg evaluate` first)")
    metrics = json.loads(Path(where).read_text())
    deltas = gate.read_deltas(Path(cfg.eval.out_dir) / "deltas.csv")
    reference = reference_model(cfg.eval)
    checkpoints = {m: Path(cfg.train.model_dir) / f"{m}.pt" for m in rc.methods}
    for method, path in checkpoints.items():
        if not path.is_file():
            raise FileNotFoundError(f"registry.methods: {method}: checkpoint {path} not found (run `sumseg finetune --method {method}`)")
    columns = {m: eval_column(cfg, p, m) for m, p in checkpoints.items()}
    judgements = {m: judge(cfg, metrics, deltas, columns[m], reference, where) for m in rc.methods}

    name = registered_model_name(cfg)
    uri = tracking_uri(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    eval_run = find_run(client, cfg.tracking.experiment, EVAL_MD5_TAG, md5_file(where))
    result: Dict[str, Any] = {"model_name": name, "reference": reference, "methods": {}}
    with stage_run(cfg.tracking, "register", params={"registry": rc}, tags={"registered_model": name}) as tracker:
        for method, path in checkpoints.items():
            judgement = judgements[method]
            champion = current_champion(client, name)
            decision = gate.decide(judgement, champion, float(rc.tolerance))
            runs = {"training": find_run(client, cfg.tracking.experiment, MODEL_MD5_TAG, md5_file(path)),
                    "evaluation": eval_run}
            tags = version_tags(cfg, method, path, judgement, decision, metrics, reference, runs)
            description = (
                f"{method} fine-tune of {cfg.model.name}. Trained by run {runs['training'] or 'unknown'}, "
                f"evaluated by run {eval_run or 'unknown'}. Gate: {'promoted' if decision.promoted else 'not promoted'}"
                f" ({decision.reason})."
            )
            mv = log_and_register(client, uri, cfg, method, path, tracker.run_id, tags, description)
            aliases = [CHALLENGER]
            client.set_registered_model_alias(name, CHALLENGER, mv.version)
            if decision.promoted:
                client.set_registered_model_alias(name, CHAMPION, mv.version)
                aliases.append(CHAMPION)
            log.info("registered %s version %s (%s): %s", name, mv.version, ", ".join(aliases), decision.reason)
            result["methods"][method] = {
                "version": int(mv.version),
                "eval_column": judgement.model,
                "headline": round(judgement.headline, 6),
                "champion_before": None if champion is None else {"version": int(champion[0]), "headline": champion[1]},
                "promoted": decision.promoted,
                "reason": decision.reason,
                "forgets": judgement.forgets,
                "aliases": aliases,
                "checks": gate.check_rows(judgement.checks),
                "training_run_id": runs["training"],
                "evaluation_run_id": eval_run,
            }
            tracker.log_metrics({f"{method}/headline": judgement.headline, f"{method}/promoted": float(decision.promoted)}, step=0)
        atomic_write_text(rc.out, json.dumps(result, indent=2) + "\n")
        tracker.log_artifact(rc.out, artifact_path="register")
    return result

