"""One MLflow parent run per pipeline run: the key of a pipeline run's inputs, and the run recorded
under it that every stage of one ``dvc repro`` (or one flow run) shares (`pipeline_parent`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from sum.io import atomic_write_text
from sum.tracking.runs import FLOW_RUN_ENV, FLOW_RUN_TAG, GIT_COMMIT_TAG, git_commit, tracking_uri

log = logging.getLogger(__name__)

PIPELINE_KEY_TAG = "sum.pipeline_key"
PIPELINE_RUN_FILE = "runs/pipeline_run.json"
_PIPELINE_FORMAT = "sum-pipeline-runs/1"
_PIPELINE_KEEP = 16  # keys remembered in the pipeline run file
# what a pipeline run's key hashes, relative to the repository root (outputs never: they change
# while the pipeline runs)
_PIPELINE_INPUTS = ("params.yaml", "dvc.yaml", "sum/**/*.py", "flows/**/*.py", "params/**/*.yaml")


def pipeline_key(root: str | os.PathLike = ".", extra: Sequence[str] = ()) -> str:
    """A sha256 over what decides a pipeline run's results: the git commit and the bytes of
    ``params.yaml``, ``dvc.yaml`` and the library's sources and configs, plus ``extra`` (the CLI's
    overrides). Stage outputs are not in it, so it stays the same while the stages run."""
    root = Path(root)
    h = hashlib.sha256(f"{git_commit(root)}|{list(extra)}|".encode())
    for pattern in _PIPELINE_INPUTS:
        for path in sorted(root.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(f"{path.relative_to(root).as_posix()}|".encode())
                h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@dataclasses.dataclass
class PipelineParent:
    """The parent run a stage process was given by `pipeline_parent`; `finish` records the
    stage's outcome on it (RUNNING while a stage runs, then FINISHED or FAILED)."""

    client: Any
    run_id: str

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _pipeline_record(path: Path) -> Dict[str, Any]:
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    return record.get("runs", {}) if record.get("format") == _PIPELINE_FORMAT else {}


def _lookup(tc, key: str, record: Path) -> Optional["PipelineParent"]:
    """The run ``record`` holds under ``key`` for this store, if the store still has it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(tc.uri)
    known = _pipeline_record(record).get(key)
    if not known or known.get("uri") != uri:
        return None
    client = MlflowClient(tracking_uri=uri)
    try:
        return PipelineParent(client, client.get_run(known["run_id"]).info.run_id)
    except MlflowException:
        return None


def recorded_parent(
    tc,
    root: str | os.PathLike = ".",
    extra: Sequence[str] = (),
    path: str | os.PathLike = PIPELINE_RUN_FILE,
) -> Optional["PipelineParent"]:
    """The parent run recorded for the current inputs (what `pipeline_parent` would reuse), or
    None when no stage has run on them yet; creates nothing."""
    if not tc.enabled:
        return None
    return _lookup(tc, pipeline_key(root, extra), Path(root) / path)


def pipeline_parent(
    tc,
    root: str | os.PathLike = ".",
    extra: Sequence[str] = (),
    path: str | os.PathLike = PIPELINE_RUN_FILE,
) -> Optional[PipelineParent]:
    """Give this stage process the parent run of its pipeline run through ``MLFLOW_RUN_ID``.

    Nothing to do (None) when tracking is off or ``MLFLOW_RUN_ID`` is already set (an
    orchestrator's parent). Otherwise the run ``path`` records under `pipeline_key` is reused while
    the store still has it, else a new run named ``pipeline`` is created and recorded (written
    atomically; a few recent keys are kept, so switching back and forth reuses them). Under the
    Prefect flow (``SUM_PREFECT_FLOW_RUN_ID``) the parent is tagged with the flow run's id. Only a
    stage that runs calls this, so a pipeline run that runs nothing creates nothing.
    """
    if not tc.enabled or os.environ.get("MLFLOW_RUN_ID"):
        return None
    from mlflow import MlflowClient


    uri = tracking_uri(tc.uri)
    key = pipeline_key(root, extra)
    path = Path(root) / path
    runs = _pipeline_record(path)
    found = _lookup(tc, key, path)
    client = found.client if found is not None else MlflowClient(tracking_uri=uri)
    if found is not None:
        run_id = found.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        exp = client.get_experiment_by_name(tc.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(tc.experiment)
        tags = {PIPELINE_KEY_TAG: key, "stage": "pipeline"}
        commit = git_commit(root)
        if commit:
            tags[GIT_COMMIT_TAG] = commit
        run_id = client.create_run(exp_id, run_name="pipeline", tags=tags).info.run_id
        log.info("MLflow pipeline run %s (new inputs %s...)", run_id, key[:12])
    if os.environ.get(FLOW_RUN_ENV):
        client.set_tag(run_id, FLOW_RUN_TAG, os.environ[FLOW_RUN_ENV])
    runs.pop(key, None)
    runs[key] = {"run_id": run_id, "uri": uri, "used": time.time()}
    keep = dict(list(runs.items())[-_PIPELINE_KEEP:])
    atomic_write_text(path, json.dumps({"format": _PIPELINE_FORMAT, "runs": keep}, indent=2) + "\n")
    os.environ["MLFLOW_RUN_ID"] = run_id
    return PipelineParent(client, run_id)


def dvc_lineage(lock: str | Path, stage: str) -> Dict[str, str]:
    """``{"dvc.<path>": md5}`` of a stage's deps and outs in ``dvc.lock`` ({} when absent)."""
    lock = Path(lock)
    if not lock.is_file():
        return {}
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage)
    if not entry:
        return {}
    out = {}
    for item in [*entry.get("deps", []), *entry.get("outs", [])]:
        if item.get("md5"):
            out[f"dvc.{item['path']}"] = item["md5"]
    return out
