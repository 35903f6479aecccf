"""MLflow tracking against a real sqlite store: the fine-tuning run's params, per-step metrics and
checkpoint artifact; resume into the same run; parent runs via MLFLOW_RUN_ID; rank != 0 silent."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from sum import tracking
from test_trainer import MemoryEmbeddings, make_cfg, pools_of, world  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
