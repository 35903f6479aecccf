"""The Prefect flow runs real DVC stages against Prefect's local test API (one per session)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _scratch_repo(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(REPO / "sum", work / "sum", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"] = {"world": dvc["stages"]["world"]}
    dvc["metrics"] = []
    (work / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["world"]["image_size"] = 96
    params["data"]["world"]["sets"] = {
        "tiny": {"task": "salient", "role": "benchmark", "n_images": 1, "seed": 3, "style": "default"}
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_bin = Path(sys.executable).parent / "dvc"
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(dvc_bin), "init", "-q"], cwd=work, check=True)
    return work


def test_stage_order_follows_dvc_yaml():
    from flows.pipeline import stage_order

    order = stage_order(REPO)
    assert order[0] == "acquire" and order.index("world") < order.index("validate") < order.index("finetune") < order.index("evaluate")


def test_flow_runs_dvc_stage_then_finds_it_up_to_date(prefect_api, tmp_path, monkeypatch):
    from flows.pipeline import sum_pipeline

    work = _scratch_repo(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(work))
    assert sum_pipeline(repo=str(work)) == {"world": "ran"}
    assert (work / "data" / "world" / "tiny" / "annotations.json").is_file()
    assert sum_pipeline(repo=str(work)) == {"world": "up to date"}


def test_flow_rejects_unknown_stage(prefect_api, tmp_path):
    from flows.pipeline import sum_pipeline

    with pytest.raises(ValueError, match="nope"):
        sum_pipeline(repo=str(REPO), stages=["nope"])


def test_failed_stage_is_one_line(prefect_api, tmp_path, monkeypatch):
    from flows.pipeline import run_stage

    work = _scratch_repo(tmp_path)
    (work / "params.yaml").write_text("data:\n  world:\n    bogus: 1\n")
    monkeypatch.setenv("PYTHONPATH", str(work))
    with pytest.raises(RuntimeError) as e:
        run_stage.fn("world", str(work))
    assert "world" in str(e.value) and "\n" not in str(e.value)


def test_foreach_group_runs_as_one_task(tmp_path):
    """``finetune`` is a foreach group in dvc.yaml: its task runs every item and says so."""
    from flows.pipeline import run_stage

    work = tmp_path / "grp"
    work.mkdir()
    (work / "dvc.yaml").write_text(
        "stages:\n  grp:\n    foreach: [a, b]\n    do:\n      cmd: echo ${item} > out_${item}.txt\n"
        "      outs:\n        - out_${item}.txt\n"
    )
    dvc_bin = Path(sys.executable).parent / "dvc"
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(dvc_bin), "init", "-q"], cwd=work, check=True)
    assert run_stage.fn("grp", str(work)) == "ran"
    assert (work / "out_a.txt").read_text().strip() == "a" and (work / "out_b.txt").is_file()
    assert run_stage.fn("grp", str(work)) == "up to date"
