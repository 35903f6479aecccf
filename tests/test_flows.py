"""The Prefect flow runs real DVC stages against Prefect's local test API (one per session)."""

import os
import shutil
import subprocess
import time
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
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

MICRO_CONFIG = """
data:
  world:
    image_size: 96
    sets:
      tiny: {task: salient, role: benchmark, n_images: 1, seed: 3, style: default}
flow:
  timeout_s: {world: 300}
"""


def _scratch_repo(tmp_path: Path, hydra: bool = False) -> Path:
    """A git + DVC checkout with the real library and the ``world`` stage only, on a micro world;
    with ``hydra`` its params.yaml is the composition of a params/ folder (so overrides work)."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(REPO / "sum", work / "sum", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"] = {"world": dvc["stages"]["world"]}
    dvc["metrics"] = []
    dvc.pop("plots", None)
    (work / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    if hydra:
        from sum.config import params_yaml_text

        (work / "params").mkdir()
        (work / "params" / "config.yaml").write_text(MICRO_CONFIG)
        (work / "params.yaml").write_text(params_yaml_text([], work / "params"))
    else:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["world"]["image_size"] = 96
        params["data"]["world"]["sets"] = {
            "tiny": {"task": "salient", "role": "benchmark", "n_images": 1, "seed": 3, "style": "default"}
        }
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_bin = Path(sys.executable).parent / "dvc"
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(dvc_bin), "init", "-q"], cwd=work, check=True)
    if hydra:
        (work / ".gitignore").write_text("/runs/\n/mlflow.db\n/mlruns/\n")
        subprocess.run(["git", "add", "-A"], cwd=work, check=True)
        subprocess.run(["git", "commit", "-qm", "micro"], cwd=work, check=True, env={**os.environ, **GIT_ENV})
    return work


def test_stage_order_follows_dvc_yaml():
    from flows.pipeline import stage_order

    order = stage_order(REPO)
    assert order[0] == "acquire" and order.index("world") < order.index("validate") < order.index("finetune") < order.index("evaluate")


def test_flow_runs_dvc_stage_then_finds_it_up_to_date(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import repo_limit_name, sum_pipeline

    work = _scratch_repo(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(work))
    assert sum_pipeline(repo=str(work)) == {"world": "ran"}
    assert (work / "data" / "world" / "tiny" / "annotations.json").is_file()
    assert sum_pipeline(repo=str(work)) == {"world": "up to date"}
    with get_client(sync_client=True) as client:  # the checkout's slot exists, holds 1, is free again
        limit = client.read_global_concurrency_limit_by_name(repo_limit_name(str(work)))
    assert limit.limit == 1 and limit.active_slots == 0


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


def test_stream_hands_over_lines_while_the_command_runs_and_stops_it_at_its_timeout(tmp_path):
    from flows.pipeline import stream

    seen = []
    script = "import time; print('first', flush=True); time.sleep(2); print('second', flush=True)"
    rc, tail = stream([sys.executable, "-c", script], str(tmp_path), dict(os.environ), 60,
                      lambda line: seen.append((line, time.monotonic())))
    assert rc == 0 and tail == ["first", "second"]
    assert seen[1][1] - seen[0][1] > 1.5  # the first line arrived before the command ended

    t0 = time.monotonic()
    marker = tmp_path / "child-alive"
    child = f"import time; time.sleep(5); open({str(marker)!r}, 'w').write('x')"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); print('go', flush=True); time.sleep(60)"
    rc, tail = stream([sys.executable, "-c", script], str(tmp_path), dict(os.environ), 2, lambda line: None)
    assert rc is None and tail == ["go"] and time.monotonic() - t0 < 30
    time.sleep(6)
    assert not marker.exists()  # the whole process group was stopped, not only its leader


def test_override_run_is_a_dvc_experiment_with_its_task_named_after_the_stage(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import sum_pipeline

    work = _scratch_repo(tmp_path, hydra=True)
    monkeypatch.setenv("PYTHONPATH", str(work))
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    state = sum_pipeline(repo=str(work), overrides=["data.world.sets.tiny.seed=4"], return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"world": "ran"}
    assert yaml.safe_load((work / "params.yaml").read_text())["data"]["world"]["sets"]["tiny"]["seed"] == 4
    exps = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "list", "--name-only"], cwd=work,
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(exps) == 1 and exps[0].startswith("prefect-")
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs()
        names = {t.name for t in tasks if t.flow_run_id == state.state_details.flow_run_id}
    assert {"params", "world", "dvc exp save"} <= names
    # no overrides: params.yaml goes back to the committed composition and the stage re-runs
    assert sum_pipeline(repo=str(work)) == {"world": "ran"}
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=work, capture_output=True,
                          text=True).stdout == ""


def test_a_failed_run_names_the_stage_and_its_last_log_line(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import ARTIFACT_KEYS, sum_pipeline

    work = _scratch_repo(tmp_path, hydra=True)
    monkeypatch.setenv("PYTHONPATH", str(work))
    state = sum_pipeline(repo=str(work), overrides=["data.world.image_size=-5"], return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
        failure = [a for a in art if a.key == ARTIFACT_KEYS["failure"]]
    assert failure, [a.key for a in art]
    text = failure[0].data
    assert "stage `world`" in text and "sumseg world: error: negative dimensions are not allowed" in text, text


def test_bad_override_fails_naming_the_key(prefect_api, tmp_path):
    from flows.pipeline import sum_pipeline

    work = _scratch_repo(tmp_path, hydra=True)
    state = sum_pipeline(repo=str(work), overrides=["train.learning_rate=1"], return_state=True)
    assert state.is_failed() and "learning_rate" in state.message


def test_registry_and_link_markdown():
    from flows.pipeline import mlflow_links, registry_markdown

    decision = {"model_name": "sum-mobile_sam", "methods": {"sum": {
        "version": 3, "headline": 0.7123, "champion_before": {"version": 2, "headline": 0.7}, "promoted": True,
        "reason": "headline 71.23 beats champion v2 (70.00) and forgets nothing", "aliases": ["challenger", "champion"]}}}
    md = registry_markdown(decision)
    assert "| sum | 3 | 71.23 | v2 (70.00) | yes | headline 71.23 beats champion v2" in md
    links = mlflow_links("http://mlflow:5000", "abc", "1", decision)
    assert "[abc](http://mlflow:5000/#/experiments/1/runs/abc)" in links
    assert "(http://mlflow:5000/#/models/sum-mobile_sam/versions/3)" in links
    local = mlflow_links("sqlite:///mlflow.db", "abc", "1", decision)
    assert "`runs:/abc` at `sqlite:///mlflow.db`" in local and "`models:/sum-mobile_sam/3`" in local


def test_one_off_cli(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    work = _scratch_repo(tmp_path, hydra=True)
    env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{REPO}", "PREFECT_API_URL": PREFECT_API_URL.value(), **GIT_ENV}
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(work), "--stages", "world",
                        "--override", "data.world.sets.tiny.seed=5", "--no-register"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"world": "ran"' in r.stdout


def test_prefect_yaml_deploys_this_flow_with_its_parameters_on_a_schedule_with_a_timezone():
    import inspect

    from flows.pipeline import sum_pipeline

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    params = set(inspect.signature(sum_pipeline.fn).parameters)
    assert {"overrides", "stages", "push", "register"} <= params
    names = [d["name"] for d in spec["deployments"]]
    assert "nightly" in names
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and func == "sum_pipeline"
        assert set(d["parameters"]) <= params, d["name"]
        assert d["work_pool"]["name"] == "sum-process"
        assert d["concurrency_limit"]["limit"] == 1
        for sched in d["schedules"]:
            assert sched["cron"] and sched["timezone"], d["name"]
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $SUM_REPO }}"


def _repo_with_stages(tmp_path: Path, stages: dict, flow: str) -> Path:
    """A git + DVC checkout whose dvc.yaml holds ``stages`` and whose params.yaml sets ``flow``."""
    work = tmp_path / "custom"
    work.mkdir(parents=True)
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (work / "params.yaml").write_text(f"flow: {flow}\ntracking: {{enabled: false}}\n")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=work, check=True)
    return work


def test_flaky_stage_is_retried_with_back_off_and_a_hung_one_is_stopped_at_its_timeout(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import sum_pipeline

    # fails the first time (no marker yet), succeeds on the retry
    flaky = "test -f tried || { touch tried; echo 'flaky: connection reset' >&2; exit 1; }; echo ok > out.txt"
    work = _repo_with_stages(tmp_path, {"flaky": {"cmd": flaky, "outs": ["out.txt"]}},
                             "{retry_stages: [flaky], retries: 2, retry_delay_s: 0.5, timeout_s: {}, default_timeout_s: 60}")
    state = sum_pipeline(repo=str(work), register=False, return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        runs = [t for t in client.read_task_runs() if t.flow_run_id == state.state_details.flow_run_id and t.name == "flaky"]
    assert len(runs) == 1 and runs[0].run_count == 2

    work = _repo_with_stages(tmp_path / "hung", {"hung": {"cmd": "echo start; sleep 120", "outs": ["never.txt"]}},
                             "{retry_stages: [], timeout_s: {hung: 3}, default_timeout_s: 60}")
    t0 = time.monotonic()
    state = sum_pipeline(repo=str(work), register=False, return_state=True)
    assert state.is_failed() and "stage hung failed: timed out after 3 s" in state.message
    assert time.monotonic() - t0 < 60
