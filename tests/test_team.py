"""The team setup end to end: the native team stack (``infra/team.py``: PostgreSQL, S3, MLflow and
Prefect servers, a worker on the ``sum-process`` pool), the flow deployed from ``prefect.yaml``,
deployment runs of a micro pipeline (tiny SUM model, a handful of 96-px world images) checked
through the services' own APIs: stage tasks and their live logs, artifacts, MLflow lineage, the
registered version with its artifacts in S3, ``dvc push``, a teammate's clone, the failure hook,
and a second run that runs nothing.

Slow (about ten minutes here): ``bash scripts/test -m slow tests/test_team.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "sum-ci", "GIT_AUTHOR_EMAIL": "ci@sum", "GIT_COMMITTER_NAME": "sum-ci",
           "GIT_COMMITTER_EMAIL": "ci@sum"}
STAGES = ["world", "embed", "pseudolabel", "refine", "uncertainty", "uncertainty-report", "finetune", "evaluate", "register"]
COMPUTING = {"world", "pseudolabel", "refine", "uncertainty", "uncertainty-report", "finetune-sum", "evaluate", "register"}

MICRO = """
# A micro pipeline for the team test: the tiny randomly initialised SUM model, a few 96-px images.
defaults:
  - model: tiny
  - embed: default
  - pseudo: default
  - refine: default
  - uncertainty: default
  - method: sum
  - train: default
  - registry: default
  - flow: default
  - _self_
data:
  world:
    out_dir: data/world
    image_size: 96
    sets:
      hq_train: {task: salient, role: labeled, n_images: 4, seed: 1}
      unlabeled: {task: unspecified, role: unlabeled, n_images: 2, seed: 2}
      bench_salient: {task: salient, role: benchmark, n_images: 2, seed: 101}
      bench_part: {task: part, role: benchmark, n_images: 2, seed: 103}
  datasets:
    hq_train: {format: coco, images: data/world/hq_train/images, annotations: data/world/hq_train/annotations.json, task: salient, role: labeled}
    unlabeled: {format: coco, images: data/world/unlabeled/images, annotations: data/world/unlabeled/annotations.json, task: unspecified, role: unlabeled}
    bench_salient: {format: coco, images: data/world/bench_salient/images, annotations: data/world/bench_salient/annotations.json, task: salient, role: benchmark}
    bench_part: {format: coco, images: data/world/bench_part/images, annotations: data/world/bench_part/annotations.json, task: part, role: benchmark}
pseudo: {points_per_side: 4, n_workers: 0, pred_iou_thresh: 0.0, stability_score_thresh: 0.0, min_ratio: 0.0}
refine: {epochs: 1, patience: 0, batch_size: 4, iou_filter: 0.0, pred_iou_thresh: 0.0, stability_thresh: 0.0}
train: {iterations: 2, max_masks: 2, loss_size: 128}
eval:               # not the eval group: Hydra merges dicts, and this one lists two models only
  models: {foundation: "", sum: models/sum.pt}
  reference: ""
  datasets: []
  metrics: metrics/eval.json
  plots_dir: plots/eval
  out_dir: outputs/eval
  protocols: [point]
  rounds: 3
  max_images: 2
  max_masks_per_image: 2
  bootstrap: 50
  n_panels: 1
registry: {methods: [sum], model_name: sum-tiny}
tracking: {enabled: true, uri: null, experiment: sum, system_metrics: false}
storage: {s3: {endpoint_url: null, region: null, access_key_id: null, secret_access_key: null, profile: null}}
"""


def micro_dvc_yaml() -> dict:
    """The project's dvc.yaml without the real-data stages and deps, fine-tuning ``sum`` only."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dropped = ("data/raw", "data/bench_real", "data/photos", "models/hq_only.pt", "models/vanilla.pt")
    stages = {}
    for name in STAGES:
        stage = dvc["stages"][name]
        body = stage.get("do", stage)
        body["deps"] = [d for d in body.get("deps", []) if not str(d).startswith(dropped)]
        if "foreach" in stage:
            stage["foreach"] = ["sum"]
            body["deps"] = [d for d in body["deps"] if not str(d).startswith("params/method")]
        stages[name] = stage
    dvc["stages"] = stages
    dvc["plots"] = [{"point mIoU vs clicks": {"template": "linear", "x": "clicks",
                                              "y": {"plots/eval/point_miou.csv": ["foundation", "sum"]}}}]
    return dvc


def git(*args, cwd, **kw):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, **kw)


def dvc(*args, cwd, env, check=True):
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, f"dvc {' '.join(args)}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    return r


def make_checkout(root: Path) -> Path:
    """The worker's checkout: the real library, flow, prefect.yaml, .dvc/config (with the team
    remote) and uv.lock, and the micro pipeline, committed."""
    repo = root / "checkout"
    repo.mkdir(parents=True)
    for name in ("sum", "flows", "params"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "uv.lock", "pyproject.toml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    (repo / "params" / "config.yaml").write_text(MICRO)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(micro_dvc_yaml(), sort_keys=False))
    from sum.config import params_yaml_text

    (repo / "params.yaml").write_text(params_yaml_text([], repo / "params"))
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "micro pipeline", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def team():
    """The native team stack (module-scoped: about a minute to start); yields its client env."""
    sys.path.insert(0, str(REPO / "infra"))
    from team import start_team_stack, stop_team_stack

    state = Path(tempfile.mkdtemp(prefix="sum-team-", dir="/var/tmp"))
    os.chmod(state, 0o755)  # PostgreSQL runs as its own user
    try:
        env = start_team_stack(state)
        yield env
    finally:
        stop_team_stack(state)
        shutil.rmtree(state, ignore_errors=True)


def wait_flow_run(client, flow_run_id, timeout=1500):
    from prefect.client.schemas.objects import StateType

    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.type in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED):
            return run
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s")


def test_deployment_runs_on_the_team_stack(team, tmp_path, monkeypatch):
    import boto3
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    from prefect.settings import PREFECT_API_URL, temporary_settings

    for k, v in team.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with temporary_settings({PREFECT_API_URL: team["PREFECT_API_URL"]}):
        run_on_the_team_stack(team, tmp_path)


def run_on_the_team_stack(team: dict, tmp_path: Path) -> None:
    import boto3
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    env = {**os.environ, **team, **GIT_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    repo = make_checkout(tmp_path)

    # deploy every deployment of prefect.yaml, for this checkout
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=repo, capture_output=True,
                       text=True, env={**env, "SUM_REPO": str(repo)}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    override = ["train.iterations=3"]
    run = run_deployment("sum-pipeline/nightly", parameters={"overrides": override}, timeout=0)
    with get_client(sync_client=True) as client:
        run = wait_flow_run(client, run.id)
        assert run.state.is_completed(), run.state.message
        # the worker ran it, on the process pool
        assert run.work_pool_name == "sum-process" and run.infrastructure_pid
        tasks = client.read_task_runs()
        ours = [t for t in tasks if t.flow_run_id == run.id]
        names = {t.name for t in ours}
        assert set(STAGES) <= names, names
        # every stage task logged while it ran (stamped between its start and end)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        for t in ours:
            if t.name not in STAGES:
                continue
            inside = [lg for lg in logs if lg.task_run_id == t.id and t.start_time <= lg.timestamp <= t.end_time]
            assert inside, f"no log line of task {t.name} stamped while it ran"
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        by_key = {a.key: a for a in artifacts}
        assert by_key["sum-eval-table"].type == "markdown" and by_key["sum-eval-table"].data.startswith("#")
        assert "| sum |" in by_key["sum-registry-decision"].data
        assert "/#/experiments/" in by_key["sum-mlflow-links"].data and "/#/models/sum-tiny/versions/1" in by_key["sum-mlflow-links"].data

    # MLflow: one parent with a child per computing stage, each with the lineage tags
    mlflow = MlflowClient(team["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("sum")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'")
    assert len(parents) == 1 and parents[0].data.tags["prefect.flow_run_id"] == str(run.id)
    children = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert {c.info.run_name for c in children} == COMPUTING
    commit = git("rev-parse", "HEAD", cwd=repo).stdout.strip()
    for c in children:
        assert c.data.tags["prefect.flow_run_id"] == str(run.id)
        assert c.data.tags["mlflow.source.git.commit"].startswith(commit)
        assert any(k.startswith("dvc.") for k in c.data.tags), (c.info.run_name, c.data.tags)
    # the registered version, its artifacts in the team's S3 store
    version = mlflow.get_model_version("sum-tiny", "1")
    assert version.tags["method"] == "sum" and "challenger" in version.aliases
    s3 = boto3.client("s3", endpoint_url=team["AWS_ENDPOINT_URL_S3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sum-mlflow").get("Contents", [])]
    assert any(k.endswith("artifacts/sum.pt") for k in keys)
    # dvc push stored the outputs; the override run is a DVC experiment
    assert s3.list_objects_v2(Bucket="sum-dvc").get("KeyCount", 0) > 0
    exps = dvc("exp", "list", "--name-only", cwd=repo, env=env).stdout.split()
    assert any(e.startswith("prefect-") for e in exps)

    # a teammate: commit the run's results, clone, dvc pull -> up to date, dvc repro runs nothing
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "nightly results", cwd=repo)
    clone = tmp_path / "teammate"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone, env=env)
    status = dvc("status", "--json", cwd=clone, env=env).stdout
    assert json.loads(status) == {}, status
    again = dvc("repro", cwd=clone, env=env).stdout
    assert "Running stage" not in again, again

    # nothing changed: a second run finishes in seconds, runs no stage, registers nothing
    run2 = run_deployment("sum-pipeline/nightly", parameters={"overrides": override}, timeout=0)
    with get_client(sync_client=True) as client:
        run2 = wait_flow_run(client, run2.id)
        assert run2.state.is_completed(), run2.state.message
        logs2 = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run2.id])))
    assert not [lg.message for lg in logs2 if "Running stage" in lg.message]
    assert [str(v.version) for v in mlflow.search_model_versions("name = 'sum-tiny'")] == ["1"]
    assert len(mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'")) == 1
    first_s, second_s = run.total_run_time.total_seconds(), run2.total_run_time.total_seconds()
    assert second_s < first_s / 3, (first_s, second_s)

    # the failure path: a stage fails on a bad override; the hook names the stage and the error line
    run3 = run_deployment("sum-pipeline/nightly", parameters={"overrides": ["data.world.image_size=-5"]}, timeout=0)
    with get_client(sync_client=True) as client:
        run3 = wait_flow_run(client, run3.id)
        assert run3.state.is_failed(), run3.state
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run3.id])))
        failure = [a for a in artifacts if a.key == "sum-pipeline-failure"]
        assert failure and "stage `world`" in failure[0].data and "negative dimensions are not allowed" in failure[0].data
    print(f"flow runs: first {first_s:.0f} s, no-op {second_s:.0f} s")
