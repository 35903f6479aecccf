"""Prefect flow over the DVC pipeline: one task per DVC stage, named after it, in ``dvc.yaml`` order.

DVC decides what is stale, so a run that finds nothing changed costs seconds and runs no stage.
A flow run:

- holds the repository's concurrency slot (a global concurrency limit of 1 named after the
  checkout: two runs would fight over DVC's lock);
- composes ``params.yaml`` from ``params/`` with its ``overrides`` (what ``dvc exp run -S`` does
  with Hydra) and, when there are overrides, saves the result as a DVC experiment
  (``dvc exp save``); without overrides it is ``dvc repro`` of the committed composition;
- hands its flow-run id to the stages (``SUM_PREFECT_FLOW_RUN_ID``): the first stage that runs
  starts (or, for unchanged inputs, reuses) the MLflow parent run and tags it and every child
  with it, so a run that runs nothing creates no MLflow run; after each stage the flow tags the
  stage's MLflow runs with the ``dvc.lock`` md5s of the stage's inputs;
- streams each stage's output into the Prefect logs line by line while it runs, stops a stage at
  its timeout (``flow.timeout_s``), retries the flaky ones with back-off (``flow.retry_stages``,
  ``dvc push``/``pull``);
- publishes artifacts with stable keys: ``sum-eval-table`` (the evaluation table),
  ``sum-registry-decision``, ``sum-mlflow-links`` (parent run, registered versions), and on
  failure ``sum-pipeline-failure`` naming the stage and the last lines of its log.

Run once:        python -m flows.pipeline [--stages evaluate register] [--override train.lr=1e-4]
On a schedule:   prefect deploy --all (prefect.yaml), then a worker on the sum-process pool
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Optional

import warnings

import yaml
from omegaconf import OmegaConf
from prefect import flow, get_run_logger, task

# the flow's parameter `register` shadows a name of pydantic's validation model; harmless
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)
from prefect.artifacts import create_markdown_artifact  # noqa: E402 (after the filter above)
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate  # noqa: E402
from prefect.concurrency.sync import concurrency  # noqa: E402
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound  # noqa: E402
from prefect.logging import get_logger  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from sum import tracking  # noqa: E402
from sum.config import load_params, params_yaml_text  # noqa: E402
from sum.io import atomic_write_text  # noqa: E402
from sum.tracking import dvc_lineage, flatten, tracking_uri  # noqa: E402

LOG_TAIL = 20  # lines of a failed stage's log named in the failure message
ARTIFACT_KEYS = {
    "eval": "sum-eval-table",
    "registry": "sum-registry-decision",
    "links": "sum-mlflow-links",
    "failure": "sum-pipeline-failure",
}


class StageFailed(RuntimeError):
    """A DVC stage (or dvc command) failed; the message names it and ends with its log's last lines."""

    def __init__(self, stage: str, reason: str, tail: Iterable[str]):
        self.stage, self.reason, self.tail = stage, reason, list(tail)
        super().__init__(f"stage {stage} failed: {reason}: {self.error_line}")

    @property
    def error_line(self) -> str:
        """The line that says what went wrong: the stage's own error line (``sum <stage>: error:``,
        one line by the CLI's contract) rather than DVC's summary after it."""
        lines = [line for line in self.tail if line.strip()]
        own = [line for line in lines if ": error:" in line or "Error" in line.split(":")[0]]
        return (own or [line for line in lines if not line.startswith("ERROR: failed to reproduce")] or lines
                or ["(no output)"])[-1]


def dvc_executable() -> str:
    """The ``dvc`` next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise FileNotFoundError("dvc: not found beside the interpreter or on PATH")
    return found


def stage_order(repo: str | os.PathLike) -> list[str]:
    """Stage names of ``<repo>/dvc.yaml`` in file order (a valid topological order); a
    ``foreach`` group is one name here and runs all its items."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml")
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {}))


def _logger():
    """The run logger inside a flow or task run; the module logger when called through ``.fn()``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def stream(cmd: list[str], cwd: str, env: dict, timeout_s: float, on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run ``cmd`` in its own process group, handing each output line to ``on_line`` as it
    arrives; kill the group at ``timeout_s``. Returns (exit code, the last `LOG_TAIL` lines);
    the exit code is None after a timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: deque = deque(maxlen=LOG_TAIL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return None, list(tail)
            continue
        if line is None:
            break
        tail.append(line)
        on_line(line)
    return proc.wait(), list(tail)


def stage_env(repo: str, extra: Optional[dict] = None) -> dict:
    """The environment of a stage process: this one's, the venv's ``bin`` first on PATH (the
    stages run ``sum``), plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra or {})
    return env


def _run_dvc(what: str, args: list[str], repo: str, env: dict, timeout_s: float) -> list[str]:
    logger = _logger()
    rc, tail = stream([dvc_executable(), *args], repo, env, timeout_s, lambda line: logger.info("%s", line))
    if rc is None:
        raise StageFailed(what, f"timed out after {timeout_s:g} s", tail)
    if rc != 0:
        raise StageFailed(what, f"exit {rc}", tail)
    return tail


@task(task_run_name="{stage}")
def run_stage(stage: str, repo: str, env: Optional[dict] = None, timeout_s: float = 7200) -> str:
    """``dvc repro --single-item <stage>``: runs the stage if its deps or params changed.

    Returns:
      "ran", "cached" (restored from DVC's run cache) or "up to date".
    Raises:
      StageFailed: one line naming the stage and the last line of its output.
    """
    lines: list[str] = []
    logger = _logger()

    def keep(line: str) -> None:
        lines.append(line)
        logger.info("%s", line)

    rc, tail = stream([dvc_executable(), "repro", "--single-item", stage], repo, env or stage_env(repo), timeout_s, keep)
    if rc is None:
        raise StageFailed(stage, f"timed out after {timeout_s:g} s", tail)
    if rc != 0:
        raise StageFailed(stage, f"exit {rc}", tail)
    text = "\n".join(lines)
    # a foreach group (finetune) runs as '<stage>@<item>' stages
    if f"Running stage '{stage}'" in text or f"Running stage '{stage}@" in text:
        return "ran"
    if "is cached - skipping run" in text:
        return "cached"
    return "up to date"


@task(task_run_name="dvc {command}")
def dvc_remote(command: str, repo: str, env: Optional[dict] = None, timeout_s: float = 3600) -> str:
    """``dvc push`` / ``dvc pull`` against the default remote (retried with back-off by the flow).
    A pull skips what the remote does not hold yet (a first run): those stages then run."""
    args = [command, "--allow-missing"] if command == "pull" else [command]
    _run_dvc(f"dvc {command}", args, repo, env or stage_env(repo), timeout_s)
    return "done"


@task(task_run_name="params")
def compose_params(repo: str, overrides: list[str]) -> bool:
    """Write ``params.yaml`` as ``dvc exp run -S ...`` composes it (``params/`` + ``overrides``);
    returns whether it changed. A bad override fails naming the key."""
    path, config_dir = Path(repo) / "params.yaml", Path(repo) / "params"
    if not (config_dir / "config.yaml").is_file():
        if overrides:
            raise ValueError(f"{config_dir}: no Hydra config to apply overrides {list(overrides)} to")
        return False
    text = params_yaml_text(list(overrides), config_dir)
    old = path.read_text() if path.is_file() else ""
    if old == text:
        return False
    before, after = flatten(OmegaConf.to_container(OmegaConf.create(old or "{}"))), flatten(
        OmegaConf.to_container(OmegaConf.create(text)))
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    atomic_write_text(path, text)
    _logger().info("params.yaml composed from params/ with %s; changed keys: %s", list(overrides) or "no overrides",
                   ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""))
    return True


@task(task_run_name="dvc exp save")
def save_experiment(repo: str, name: str, env: Optional[dict] = None) -> str:
    """Record the workspace (an override run's results) as the DVC experiment ``name``."""
    _run_dvc("dvc exp save", ["exp", "save", "--force", "--name", name], repo, env or stage_env(repo), 600)
    return name


def repo_limit_name(repo: str) -> str:
    return "sum-repo-" + hashlib.sha256(str(Path(repo).resolve()).encode()).hexdigest()[:12]


@contextlib.contextmanager
def repo_slot(repo: str):
    """Hold the repository's slot of a global concurrency limit of 1 (created when missing)."""
    name = repo_limit_name(repo)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True):
        yield


def recorded_parent(repo: str):
    """The MLflow parent run of the repository's current inputs, if a stage has run on them
    (`sum.tracking.recorded_parent`, resolved inside ``repo`` as its stages resolve it). The flow
    creates none itself: the first stage that runs does (through the CLI), tagged with this flow
    run's id, so a run that runs nothing leaves no trace in MLflow."""
    params = Path(repo) / "params.yaml"
    if not params.is_file():
        return None
    with contextlib.chdir(repo):
        return tracking.recorded_parent(load_params(params).tracking, root=".")


def tag_stage_runs(parent, stage: str, repo: str, since_ms: int) -> None:
    """Tag the MLflow runs a stage started (children of ``parent`` since ``since_ms``) with the
    ``dvc.lock`` md5s of the stage's inputs (``dvc.<path>``)."""
    lock = Path(repo) / "dvc.lock"
    entries = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    names = [n for n in entries if n == stage or n.startswith(f"{stage}@")]
    runs = parent.client.search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.start_time >= {since_ms}",
    )
    for run in runs:
        method = run.data.tags.get("method")
        name = f"{stage}@{method}" if f"{stage}@{method}" in names else (stage if stage in names else None)
        if name is None:
            continue
        deps = {k: v for k, v in dvc_lineage(lock, name).items()}
        for key, md5 in deps.items():
            parent.client.set_tag(run.info.run_id, key, md5)


def _read(path: Path) -> Optional[str]:
    return path.read_text() if path.is_file() else None


def registry_markdown(register_json: dict) -> str:
    """The registry decision as a markdown table."""
    lines = [f"### Registered model `{register_json.get('model_name')}`", "",
             "| method | version | headline | champion before | promoted | reason |", "|---|---|---|---|---|---|"]
    for method, d in register_json.get("methods", {}).items():
        before = d.get("champion_before") or {}
        champ = f"v{before['version']} ({100 * before['headline']:.2f})" if before.get("headline") is not None else (
            f"v{before['version']}" if before else "none")
        lines.append(f"| {method} | {d['version']} | {100 * d['headline']:.2f} | {champ} | "
                     f"{'yes' if d['promoted'] else 'no'} | {d['reason']} |")
    return "\n".join(lines)


def mlflow_links(uri: str, parent_run_id: Optional[str], experiment_id: Optional[str], register_json: Optional[dict]) -> str:
    """Markdown links to the MLflow parent run and the registered versions (UI links when the
    tracking URI is a server, ``runs:/`` / ``models:/`` URIs otherwise)."""
    web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
    lines = ["### MLflow", ""]
    if parent_run_id:
        where = f"{web}/#/experiments/{experiment_id}/runs/{parent_run_id}" if web else f"runs:/{parent_run_id}"
        lines.append(f"- pipeline run: [{parent_run_id}]({where})" if web else f"- pipeline run: `{where}` at `{uri}`")
    for method, d in (register_json or {}).get("methods", {}).items():
        name = register_json["model_name"]
        target = f"{web}/#/models/{name}/versions/{d['version']}" if web else f"models:/{name}/{d['version']}"
        text = f"{name} version {d['version']} ({', '.join(d['aliases'])})"
        lines.append(f"- {method}: [{text}]({target})" if web else f"- {method}: `{target}` ({', '.join(d['aliases'])})")
    return "\n".join(lines)


def publish(repo: str, parent, ran_register: bool) -> None:
    """The flow's artifacts (module docstring), from the files the stages wrote."""
    cfg = load_params(Path(repo) / "params.yaml")
    table = _read(Path(repo) / cfg.eval.out_dir / "table.md")
    if table:
        create_markdown_artifact(key=ARTIFACT_KEYS["eval"], markdown=table, description="SUM evaluation table")
    register_path = Path(repo) / cfg.registry.out
    register_json = json.loads(register_path.read_text()) if register_path.is_file() else None
    if register_json and ran_register:
        create_markdown_artifact(key=ARTIFACT_KEYS["registry"], markdown=registry_markdown(register_json),
                                 description="Model registry decision")
    if parent is not None:
        experiment = parent.client.get_run(parent.run_id).info.experiment_id
        with contextlib.chdir(repo):
            uri = tracking_uri(cfg.tracking.uri)
        links = mlflow_links(uri, parent.run_id, experiment, register_json if ran_register else None)
        create_markdown_artifact(key=ARTIFACT_KEYS["links"], markdown=links, description="MLflow runs and models")


def report_failure(flow, flow_run, state) -> None:
    """``on_failure`` / ``on_crashed`` hook: one message naming the failed stage and the last lines
    of its log, as an ERROR log line and the ``sum-pipeline-failure`` artifact."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 (a result that cannot be read is itself the error)
        exc = e
    if isinstance(exc, StageFailed):
        message = f"SUM pipeline failed at stage `{exc.stage}` ({exc.reason})"
        tail = exc.tail
    else:
        message = f"SUM pipeline failed: {state.message or exc}"
        tail = []
    body = message + ("\n\nLast lines of its log:\n\n```\n" + "\n".join(tail) + "\n```" if tail else "")
    get_logger("sum.flows").log(logging.ERROR, "%s", body)
    with contextlib.suppress(Exception):
        create_markdown_artifact(key=ARTIFACT_KEYS["failure"], markdown=body, description=f"flow run {flow_run.name}")


def select(order: list[str], stages: Optional[list[str]], register: bool) -> list[str]:
    unknown = [s for s in (stages or []) if s not in order]
    if unknown:
        raise ValueError(f"stages {unknown}: not in dvc.yaml ({order})")
    chosen = [s for s in order if not stages or s in stages]
    return [s for s in chosen if register or s != "register"]


@flow(name="sum-pipeline", on_failure=[report_failure], on_crashed=[report_failure])
def sum_pipeline(
    repo: str = ".",
    stages: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    push: bool = False,
    register: bool = True,
    pull: bool = False,
) -> dict[str, str]:
    """Run the DVC stages of ``repo`` (all, or ``stages``) as Prefect tasks (module docstring).

    Arguments:
      repo: the checkout (the deployment's working directory).
      stages: stage names of dvc.yaml to run (default all), in pipeline order.
      overrides: Hydra overrides (``train.lr=1e-4``): the run is a DVC experiment; none: ``dvc repro``.
      push: ``dvc push`` to the default remote at the end.
      register: run the ``register`` stage (MLflow model registry).
      pull: ``dvc pull`` first (a fresh worker checkout with the team's remote).
    """
    repo = str(Path(repo).resolve())
    overrides = list(overrides or [])
    chosen = select(stage_order(repo), stages, register)
    results: dict[str, str] = {}
    with repo_slot(repo):
        compose_params(repo, overrides)
        settings = load_params(Path(repo) / "params.yaml").flow
        retry = {"retries": settings.retries,
                 "retry_delay_seconds": [settings.retry_delay_s * 2**i for i in range(settings.retries)]}
        # stage processes start (or reuse) the MLflow parent run and tag it with this flow run
        env = stage_env(repo, {"SUM_PREFECT_FLOW_RUN_ID": str(flow_run.id or "")})
        if pull:
            dvc_remote.with_options(**retry)("pull", repo, env)
        for stage in chosen:
            timeout = settings.timeout_s.get(stage, settings.default_timeout_s)
            opts = retry if stage in settings.retry_stages else {}
            since = int(time.time() * 1000)
            results[stage] = run_stage.with_options(**opts)(stage, repo, env, timeout)
            parent = recorded_parent(repo) if results[stage] == "ran" else None
            if parent is not None:
                tag_stage_runs(parent, stage, repo, since)
        if overrides and any(r != "up to date" for r in results.values()):
            save_experiment(repo, f"prefect-{flow_run.name or 'run'}", env)
        if push:
            dvc_remote.with_options(**retry)("push", repo, env)
        parent = recorded_parent(repo) if any(r == "ran" for r in results.values()) else None
        publish(repo, parent, results.get("register") == "ran")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the checkout (default: .)")
    p.add_argument("--stages", nargs="+", help="stage names of dvc.yaml (default: all)")
    p.add_argument("--override", action="append", default=[], help="a Hydra override, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("--push", action="store_true", help="dvc push at the end")
    p.add_argument("--pull", action="store_true", help="dvc pull first")
    p.add_argument("--no-register", action="store_true", help="skip the register stage")
    a = p.parse_args(argv)
    results = sum_pipeline(repo=a.repo, stages=a.stages, overrides=a.override, push=a.push, register=not a.no_register,
                           pull=a.pull)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
