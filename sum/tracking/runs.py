"""MLflow tracking of training runs: start or resume a run, log the resolved config, per-step
metrics, system metrics and artifacts (style guide, "MLOps layer").

Conventions (MLflow 3's own):

- **Where.** The tracking URI is the configured one, else ``$MLFLOW_TRACKING_URI``, else the
  local default ``sqlite:///mlflow.db`` (`tracking_uri`).
- **Who logs.** Rank 0 only: under ``torchrun`` every other rank gets a `NullTracker` whose
  methods do nothing, so the trainer's code path is the same on every rank.
- **Parent runs.** An orchestrator (Prefect flow, a sweep) hands its run to stage processes through
  ``MLFLOW_RUN_ID``; a stage then starts a *child* run tagged ``mlflow.parentRunId`` in the
  parent's experiment, rather than writing into the parent (`start_run`).
- **One parent per pipeline run.** A plain ``dvc repro`` has no orchestrator, so the CLI asks
  `pipeline_parent` for one: the run recorded in ``runs/pipeline_run.json`` under a key of the
  pipeline's inputs (git commit, params, the library's sources, CLI overrides), created when the
  key is new. Every stage of one ``dvc repro`` shares it; a changed input starts a new parent; a
  no-op ``dvc repro`` runs no stage and so creates nothing.
- **Stage runs.** Stages without a training loop log through `stage_run`: their config section
  as params, their metrics JSON as metrics, their pictures and tables as artifacts.
- **Lineage.** Every run carries the git commit (``mlflow.source.git.commit``) and, under the
  Prefect flow, the flow run's id (``prefect.flow_run_id``); the flow adds the ``dvc.lock`` md5s
  of each stage's inputs once DVC has written them.
- **Resume.** A resumed training passes the run id it stored in its checkpoint: the same run goes
  on (status back to RUNNING) and metrics continue at their step numbers. Params already logged are
  not logged again (MLflow refuses to change a param); a param whose value changed since (e.g.
  ``train.iterations`` raised to train longer) is recorded as tag ``param_changed.<key>``.

The client API (``MlflowClient``) is used throughout instead of the fluent ``mlflow.start_run``,
so that no global active-run state leaks between runs of one process (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

from sum.redact import redact, redact_text

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_RUN_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
FLOW_RUN_ENV = "SUM_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow for its stage processes
FLOW_RUN_TAG = "prefect.flow_run_id"
MODEL_MD5_TAG = "sum.model_md5"  # on a finetune run: md5 of the checkpoint it wrote (DVC's hash)
EVAL_MD5_TAG = "sum.eval_md5"  # on an evaluate run: md5 of the metrics JSON it wrote
_MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value
_BATCH = 100  # params per log_batch call (MLflow's limit is 100)


def tracking_uri(configured: Optional[str] = None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking and registry URI at ``uri`` for a block, then restore both.

    Some MLflow 3 paths ignore a client's URI and read the global one: the fluent ``log_model``,
    ``models:/`` downloads, and a SQL registry store resolving a ``models:/m-...`` source. MLflow's
    ``set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``; this restores the variable as found.
    """
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    registry_env_before = os.environ.get("MLFLOW_REGISTRY_URI")
    tracking_before, registry_before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    explicit = tracking_before != (env_before or tracking_before)  # set in code rather than by the env
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_before if explicit else None)
        mlflow.set_registry_uri(registry_before if registry_before != tracking_before else None)
        for key, value in (("MLFLOW_TRACKING_URI", env_before), ("MLFLOW_REGISTRY_URI", registry_env_before)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flatten(obj: Any, prefix: str = "") -> Dict[str, str]:
    """A config (dataclasses, dicts, lists) as flat ``{"train.lr": "1e-05", ...}`` MLflow params.

    Lists become their ``str``; secrets become ``***`` (`param_value`); values longer than MLflow's
    limit are cut with a trailing "...".
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out: Dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = param_value(prefix[:-1], obj)
    if len(value) > _MAX_PARAM_CHARS:
        value = value[: _MAX_PARAM_CHARS - 3] + "..."
    return {prefix[:-1]: value}


def param_value(key: str, value: Any) -> str:
    """``str(value)`` as it may be logged under ``key``: ``***`` for the string of a secret key,
    URL passwords and signatures masked (`sum.redact.redact`)."""
    return redact(value, key) if isinstance(value, str) else redact_text(str(value))


class NullTracker:
    """What ranks other than 0 (or runs with tracking off) get: every call does nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        pass

    def log_json_metrics(self, path: str | os.PathLike, prefix: str = "", step: int = 0) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class RunTracker(NullTracker):
    """One MLflow run, logged through ``MlflowClient`` (module docstring).

    Create it with `start_run`.
    """

    def __init__(self, client, run_id: str, uri: str, system_metrics: bool = False, sampling_interval: float = 10.0):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self._monitor = None
        if system_metrics:
            self._monitor = _start_system_metrics(run_id, uri, sampling_interval)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params; already logged keys are skipped, changed values tagged (module docstring)."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            value = param_value(key, value)
            if key not in existing:
                new.append(Param(key, value))
            elif existing[key] != value:
                changed.append(RunTag(f"param_changed.{key}", value[:_MAX_PARAM_CHARS]))
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)
            log.info("run %s: %d params changed since the run started (tagged param_changed.*)", self.run_id, len(changed))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (one batch call)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, param_value(k, v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file (e.g. the final SUM checkpoint) to the run's artifact store."""
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_json_metrics(self, path: str | os.PathLike, prefix: str = "", step: int = 0) -> None:
        """Log every number of a metrics JSON (``{"a": {"b": 1}}`` -> ``prefix/a/b``) at ``step``."""
        self.log_metrics(json_metrics(json.loads(Path(path).read_text()), prefix), step)

    def finish(self, status: str = "FINISHED") -> None:
        """Stop the system-metrics monitor and close the run (FINISHED, FAILED or KILLED)."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001 (a monitor failure must not fail the training)
                log.warning("system metrics monitor: %s", e)
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)


_METRIC_BAD = set("@:,;()[]{}<>")


def json_metrics(obj: Any, prefix: str = "") -> Dict[str, float]:
    """The numbers of a metrics document as flat MLflow metric names (``a/b/c``); booleans, strings
    and nulls are left out, and characters MLflow refuses in a name become ``_``."""
    out: Dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(json_metrics(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(json_metrics(v, f"{prefix}/{i}" if prefix else str(i)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:
        out["".join("_" if c in _METRIC_BAD else c for c in prefix)] = float(obj)
    return out


def git_commit(root: str | os.PathLike = ".") -> Optional[str]:
    """The commit checked out at ``root`` (``+dirty`` when tracked files differ), or None outside
    git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _start_system_metrics(run_id: str, uri: str, sampling_interval: float):
    """MLflow's system-metrics monitor (CPU, memory, GPU where ``pynvml`` is present), or None
    where it is unavailable (no ``psutil``)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 (optional: psutil missing, unsupported platform)
        log.info("system metrics not logged: %s", e)
        return None


def start_run(
    *,
    experiment: str,
    run_name: Optional[str] = None,
    rank: int = 0,
    uri: Optional[str] = None,
    resume_run_id: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    tags: Optional[Mapping[str, Any]] = None,
    system_metrics: bool = True,
    sampling_interval: float = 10.0,
    artifact_location: Optional[str] = None,
) -> NullTracker:
    """Start (or resume) the run of this process; a `NullTracker` on ranks other than 0.

    Arguments:
      experiment: experiment name, created if missing (in the parent's experiment when there is a
        parent run).
      run_name: the run's display name.
      rank: the process rank; only rank 0 talks to MLflow.
      uri: tracking URI (None: `tracking_uri`'s fallbacks).
      resume_run_id: a run of an earlier attempt to continue (from a training checkpoint); ignored,
        with a warning, when the store does not know it.
      parent_run_id: parent run; default ``$MLFLOW_RUN_ID``.
      tags: extra run tags.
      system_metrics: log CPU/memory/GPU metrics in the background where possible.
      sampling_interval: seconds between system-metric samples.
      artifact_location: artifact root of a newly created experiment (default: the store's).

    Returns:
      `RunTracker` on rank 0, else `NullTracker`.
    """
    if rank != 0:
        return NullTracker()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            log.info("resuming MLflow run %s at %s", resume_run_id, uri)
            if tags:
                RunTracker(client, resume_run_id, uri).set_tags(tags)
            return RunTracker(client, run.info.run_id, uri, system_metrics, sampling_interval)
        except MlflowException:
            log.warning("MLflow run %s not found at %s; starting a new run", resume_run_id, uri)
    parent_run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID") or None
    all_tags = dict(tags or {})
    commit = git_commit()
    if commit:
        all_tags.setdefault(GIT_COMMIT_TAG, commit)
    if os.environ.get(FLOW_RUN_ENV):
        all_tags.setdefault(FLOW_RUN_TAG, os.environ[FLOW_RUN_ENV])
    experiment_id = None
    if parent_run_id:
        try:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
            all_tags[PARENT_RUN_TAG] = parent_run_id
        except MlflowException:
            log.warning("parent MLflow run %s not found at %s; the run gets no parent", parent_run_id, uri)
    if experiment_id is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            if artifact_location is not None:
                artifact_location = Path(artifact_location).resolve().as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, tags={k: param_value(k, v) for k, v in all_tags.items()}, run_name=run_name)
    log.info("MLflow run %s (experiment %s) at %s", run.info.run_id, experiment, uri)
    return RunTracker(client, run.info.run_id, uri, system_metrics, sampling_interval)


@contextlib.contextmanager
def stage_run(
    tc,
    stage: str,
    params: Optional[Mapping[str, Any]] = None,
    tags: Optional[Mapping[str, Any]] = None,
    system_metrics: bool = True,
) -> Iterator[NullTracker]:
    """A child run for one pipeline stage (module docstring), closed FINISHED, FAILED or KILLED
    as the body ends; a `NullTracker` when ``tc.enabled`` is off.

    Arguments:
      tc: the ``tracking`` config section (``enabled``, ``uri``, ``experiment``, ``system_metrics``).
      stage: the stage name (run name and tag ``stage``).
      params: the stage's config section, flattened with `flatten` before logging.
      tags: extra run tags.
      system_metrics: sample CPU/memory in a thread when ``tc.system_metrics`` allows (False for a
        stage that forks workers: a thread's locks must not cross a fork).
    """
    if not tc.enabled:
        yield NullTracker()
        return
    tracker = start_run(experiment=tc.experiment, run_name=stage, uri=tc.uri, tags={"stage": stage, **(tags or {})},
                        system_metrics=tc.system_metrics and system_metrics)
    status = "FAILED"
    try:
        if params:
            tracker.log_params(flatten(params))
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
