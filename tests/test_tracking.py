"""MLflow tracking against a real sqlite store: the fine-tuning run's params, per-step metrics and
checkpoint artifact; resume into the same run; parent runs via MLFLOW_RUN_ID; rank != 0 silent."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from sum import tracking
from test_trainer import MemoryEmbeddings, make_cfg, pools_of, world  # noqa: F401 (fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its schema takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return root, f"sqlite:///{root / 'mlflow.db'}"


def client_of(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def tracked_cfg(tmp_path, uri, **train):
    cfg = make_cfg(tmp_path, **train)
    cfg.tracking = dataclasses.replace(cfg.tracking, enabled=True, uri=uri, experiment="sum-tracking-test", system_metrics=False)
    return cfg


def test_finetune_logs_params_metrics_and_checkpoint_then_resumes_the_same_run(world, store, tmp_path, monkeypatch):  # noqa: F811
    from sum.train.trainer import finetune

    root, uri = store
    monkeypatch.chdir(root)  # the sqlite store's default artifact root is ./mlruns
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = tracked_cfg(tmp_path, uri, iterations=3)
    emb = MemoryEmbeddings(cfg, world)
    finetune(cfg, pools=pools_of(world), embeddings=emb)

    client = client_of(uri)
    exp = client.get_experiment_by_name("sum-tracking-test")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.method = 'sum'")
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune-sum"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["method.name"] == "sum" and params["model.img_size"] == "128"
    assert params["train.mode"] == "decoder" and params["method.use_uncertainty_loss"] == "True"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3]
    assert {"lr", "images_per_s", "iou_round_last", "loss_round_first"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/sum.pt"}

    # train longer: the saved state resumes, into the same MLflow run
    cfg = tracked_cfg(tmp_path, uri, iterations=5)
    out = finetune(cfg, pools=pools_of(world), embeddings=emb)
    assert out["resumed_from_step"] == 3
    (again,) = client.search_runs([exp.experiment_id], filter_string="tags.method = 'sum'")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert again.data.tags["param_changed.train.iterations"] == "5"
    assert again.data.params["train.iterations"] == "3"


def test_rank_other_than_0_logs_nothing(store):
    root, uri = store
    t = tracking.start_run(experiment="never-created", rank=1, uri=uri)
    assert isinstance(t, tracking.NullTracker) and t.run_id is None
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.log_artifact(__file__)
    t.finish()
    assert client_of(uri).get_experiment_by_name("never-created") is None


def test_parent_run_from_environment_and_system_metrics(store, monkeypatch):
    root, uri = store
    monkeypatch.chdir(root)
    client = client_of(uri)
    exp_id = client.create_experiment("pipeline")
    parent = client.create_run(exp_id, run_name="pipeline").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    child = tracking.start_run(experiment="ignored-with-parent", uri=uri, system_metrics=True, sampling_interval=0.2)
    time.sleep(1.0)
    child.log_metrics({"loss": 0.5}, step=1)
    child.finish()
    run = client.get_run(child.run_id)
    assert run.data.tags[tracking.PARENT_RUN_TAG] == parent
    assert run.info.experiment_id == exp_id
    assert any(k.startswith("system/") for k in run.data.metrics)  # psutil is installed here


@pytest.mark.parametrize("env", ["sqlite:///env.db", None])
def test_global_tracking_uri_points_mlflow_there_then_restores_it_as_found(monkeypatch, env):
    import mlflow

    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with tracking.global_tracking_uri("sqlite:///elsewhere.db"):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == "sqlite:///elsewhere.db"
    assert os.environ.get("MLFLOW_TRACKING_URI") == env and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before == mlflow.get_registry_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///later.db")  # still read from the environment
    assert mlflow.get_tracking_uri() == "sqlite:///later.db"


def test_tracking_uri_and_flatten(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"

    @dataclasses.dataclass
    class Inner:
        lr: float = 1e-5
        betas: tuple = (0.9, 0.999)

    @dataclasses.dataclass
    class Outer:
        train: Inner = dataclasses.field(default_factory=Inner)
        datasets: dict = dataclasses.field(default_factory=lambda: {"hq": {"role": "labeled"}})

    assert tracking.flatten(Outer()) == {"train.lr": "1e-05", "train.betas": "(0.9, 0.999)", "datasets.hq.role": "labeled"}
    assert len(tracking.flatten({"x": "y" * 7000})["x"]) == 6000


def test_stage_run_logs_section_metrics_and_status(store, tmp_path, monkeypatch):
    from sum.config import TrackingConfig

    root, uri = store
    monkeypatch.chdir(root)
    tc = TrackingConfig(uri=uri, experiment="sum-stage-test", system_metrics=False)
    (tmp_path / "m.json").write_text('{"images": 3, "per": {"pool": {"miou": 0.5, "name": "x", "ok": true}}, "list": [1, 2]}')
    with tracking.stage_run(tc, "pseudolabel", params={"pseudo": {"points_per_side": 16}}) as t:
        t.log_json_metrics(tmp_path / "m.json")
        t.log_artifact(tmp_path / "m.json", artifact_path="metrics")
        ok = t.run_id
    with pytest.raises(RuntimeError):
        with tracking.stage_run(tc, "refine") as t:
            failed = t.run_id
            raise RuntimeError("boom")
    client = client_of(uri)
    run = client.get_run(ok)
    assert run.info.status == "FINISHED" and run.info.run_name == "pseudolabel" and run.data.tags["stage"] == "pseudolabel"
    assert run.data.params == {"pseudo.points_per_side": "16"}
    assert run.data.metrics == {"images": 3.0, "per/pool/miou": 0.5, "list/0": 1.0, "list/1": 2.0}
    assert [a.path for a in client.list_artifacts(ok, "metrics")] == ["metrics/m.json"]
    assert tracking.GIT_COMMIT_TAG not in run.data.tags  # this folder is no git checkout
    assert client.get_run(failed).info.status == "FAILED"
    with tracking.stage_run(TrackingConfig(enabled=False), "x") as t:
        assert isinstance(t, tracking.NullTracker)


def fake_repo(root):
    (root / "sum").mkdir(parents=True, exist_ok=True)
    (root / "sum" / "a.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("train:\n  lr: 1e-5\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def test_one_parent_run_per_pipeline_run(store, tmp_path, monkeypatch):
    """Stages of one `dvc repro` share the parent recorded under the inputs' key; changed inputs
    (params, a source file, CLI overrides) get a new parent; the old key's parent comes back."""
    from sum.config import TrackingConfig

    root, uri = store
    repo = fake_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tc = TrackingConfig(uri=uri, experiment="sum-pipeline-test", system_metrics=False)

    def stage():
        parent = tracking.pipeline_parent(tc, root=repo)
        run_id = os.environ.pop("MLFLOW_RUN_ID")
        assert parent.run_id == run_id
        child = tracking.start_run(experiment="ignored", uri=uri, parent_run_id=run_id, system_metrics=False)
        child.finish()
        parent.finish("FINISHED")
        return run_id, child.run_id

    first, child1 = stage()
    again, child2 = stage()
    assert again == first and child1 != child2
    client = client_of(uri)
    assert client.get_run(child2).data.tags[tracking.PARENT_RUN_TAG] == first
    assert client.get_run(first).info.status == "FINISHED" and client.get_run(first).info.run_name == "pipeline"

    (repo / "params.yaml").write_text("train:\n  lr: 1e-4\n")
    changed, _ = stage()
    assert changed != first
    (repo / "sum" / "a.py").write_text("x = 2\n")
    assert stage()[0] not in (first, changed)
    (repo / "params.yaml").write_text("train:\n  lr: 1e-5\n")
    (repo / "sum" / "a.py").write_text("x = 1\n")
    assert stage()[0] == first  # back to the first inputs: their parent again
    assert tracking.pipeline_key(repo, ["train.lr=1"]) != tracking.pipeline_key(repo)

    # an orchestrator's parent wins; tracking off gives none
    monkeypatch.setenv("MLFLOW_RUN_ID", "from-prefect")
    assert tracking.pipeline_parent(tc, root=repo) is None
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert tracking.pipeline_parent(TrackingConfig(enabled=False), root=repo) is None


def test_git_commit(tmp_path):
    import re
    import subprocess

    from conftest import REPO

    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tracking.git_commit(REPO))
    assert tracking.git_commit(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("1")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "x"], check=True, env={**os.environ, **env})
    clean = tracking.git_commit(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "f").write_text("2")
    assert tracking.git_commit(tmp_path) == clean + "+dirty"
