"""Prefect flow over the DVC pipeline: each task runs one DVC stage, in the order of ``dvc.yaml``.

DVC decides what is stale, so a scheduled run that finds nothing changed costs seconds. The
flow publishes the metrics files the stages wrote as a Prefect artifact (key ``sum-metrics``).

Run once:      python -m flows.pipeline
On a schedule: python -m flows.serve --cron "0 3 * * *"   (needs a Prefect API: PREFECT_API_URL)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


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
    """Stage names of ``<repo>/dvc.yaml`` in file order (which is a valid topological order)."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml")
    return list((yaml.safe_load(path.read_text()) or {}).get("stages", {}))


def _logger():
    """The run logger inside a flow or task run; the module logger when called through ``.fn()``."""
    import logging

    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="dvc-stage", retries=0)
def run_stage(stage: str, repo: str) -> str:
    """``dvc repro --single-item <stage>``: runs the stage if its deps or params changed."""
    logger = _logger()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(
        [dvc_executable(), "repro", "--single-item", stage], cwd=repo, env=env, capture_output=True, text=True
    )
    for line in (r.stdout + r.stderr).splitlines():
        logger.info("%s", line)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"dvc stage {stage} failed: {tail[0]}")
    # a foreach group (finetune) runs as '<stage>@<item>' stages
    ran = f"Running stage '{stage}'" in r.stdout or f"Running stage '{stage}@" in r.stdout
    return "ran" if ran else "up to date"


def metrics_markdown(repo: str | os.PathLike) -> str:
    """A markdown table of every metrics JSON that ``dvc.yaml`` declares."""
    top = (yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}).get("metrics", [])
    lines = ["| file | metrics |", "|---|---|"]
    for rel in top:
        p = Path(repo) / rel
        if p.is_file():
            lines.append(f"| `{rel}` | `{json.dumps(json.loads(p.read_text()))[:400]}` |")
    return "\n".join(lines)


def mlflow_parent(repo: str):
    """The MLflow parent run of this flow run (`sum.tracking.pipeline_parent`, resolved inside
    ``repo`` as its stages resolve it), handed to the stage processes through ``MLFLOW_RUN_ID``;
    None when tracking is off or an outer orchestrator already set one."""
    import contextlib

    from sum.config import load_params
    from sum.tracking import pipeline_parent

    params = Path(repo) / "params.yaml"
    if not params.is_file():
        return None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with contextlib.chdir(repo):
        return pipeline_parent(load_params(params).tracking, root=".")


@flow(name="sum-pipeline")
def sum_pipeline(repo: str = ".", stages: list[str] | None = None) -> dict[str, str]:
    """Run the DVC stages of ``repo`` (all, or ``stages``) as Prefect tasks, in pipeline order,
    under one MLflow parent run."""
    repo = str(Path(repo).resolve())
    order = stage_order(repo)
    unknown = [s for s in (stages or []) if s not in order]
    if unknown:
        raise ValueError(f"stages {unknown}: not in {repo}/dvc.yaml ({order})")
    parent, status = mlflow_parent(repo), "FAILED"
    results = {}
    try:
        for stage in [s for s in order if not stages or s in stages]:
            results[stage] = run_stage(stage, repo)
        status = "FINISHED"
    finally:
        if parent is not None:
            parent.finish(status)
            os.environ.pop("MLFLOW_RUN_ID", None)
    create_markdown_artifact(key="sum-metrics", markdown=metrics_markdown(repo), description="SUM pipeline metrics")
    return results


if __name__ == "__main__":
    print(sum_pipeline())
