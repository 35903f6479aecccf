"""The DVC pipeline: stages are `sumseg <stage>` shells with honest params, and real `dvc repro`
runs a stage once and then nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sum.cli import CONFIG_STAGES, STAGES

from conftest import REPO

DVC = Path(sys.executable).parent / "dvc"


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_stage_is_a_cli_command_with_known_params():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = {}
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:  # foreach/do: one stage per item, ${item} substituted
            for item in stage["foreach"]:
                text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
                stages[f"{name}@{item}"] = yaml.safe_load(text)
        else:
            stages[name] = stage
    assert {"finetune@hq_only", "finetune@vanilla", "finetune@sum", "evaluate"} <= set(stages)
    for name, stage in stages.items():
        cmd = stage["cmd"].split()
        assert cmd[0] == "sumseg" and (cmd[1] in STAGES or cmd[1] in CONFIG_STAGES), f"stage {name}: cmd {stage['cmd']!r}"
        for key in stage.get("params", []):
            _lookup(params, key)  # KeyError names a param that params.yaml lacks
        for dep in stage.get("deps", []):
            if dep.startswith(("sum/", "params/")):
                assert (REPO / dep).exists(), f"stage {name}: dep {dep} does not exist"
    # finetune --method <m> trains what its stage name says, and evaluate reads those checkpoints
    for m in ("hq_only", "vanilla", "sum"):
        assert stages[f"finetune@{m}"]["cmd"].split()[-1] == m
        assert f"models/{m}.pt" in stages[f"finetune@{m}"]["outs"] and f"models/{m}.pt" in stages["evaluate"]["deps"]
        assert params["eval"]["models"][m] == f"models/{m}.pt"



BASE_MODULES = ("sum/config/", "sum/tracking/", "sum/io.py", "sum/redact.py", "sum/tasks.py", "sum/progress.py", "sum/__init__.py")


def test_a_stage_depends_on_the_code_it_runs():
    """Every module a stage's command imports (its CLI entry's imports and all they import, base
    modules aside) is a dep of the stage, as a file or under a listed folder, so changed code re-runs it."""
    import ast

    from test_imports import MODULES, SUM, sum_imports

    cli = ast.parse((SUM / "cli.py").read_text())
    commands = {n.name: [m.module for m in ast.walk(n) if isinstance(m, ast.ImportFrom) and (m.module or "").startswith("sum.")]
                for n in cli.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")}
    commands.update({f"cmd_{k.replace('-', '_')}": [v.split(":")[0]] for k, v in CONFIG_STAGES.items()})
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        stage = stage.get("do", stage)
        todo = list(commands["cmd_" + stage["cmd"].split()[1].replace("-", "_")])
        seen = set()
        while todo:
            m = todo.pop()
            if m in seen or m not in MODULES:
                continue
            seen.add(m)
            for target, _, _, _ in sum_imports(m):
                parts = target.split(".")
                todo += [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
        files = {MODULES[m].relative_to(REPO).as_posix() for m in seen}
        deps = [d for d in stage["deps"] if d.startswith("sum")]
        missing = sorted(f for f in files if not f.startswith(BASE_MODULES)
                         and not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert len(files) > 3 and not missing, f"stage {name}: code it runs is not among its deps: {missing}"


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.mark.skipif(not DVC.exists(), reason="dvc not installed in this environment")
def test_dvc_repro_world_runs_once_then_nothing(tmp_path):
    """Real dvc on a scratch copy of the pipeline with a tiny world."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(REPO / "sum", work / "sum", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["world"]["sets"] = {
        "tiny_bench": {"task": "part", "role": "benchmark", "n_images": 2, "seed": 5, "style": "default"}
    }
    params["data"]["world"]["image_size"] = 128
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{DVC.parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(work))
    _run(["git", "init", "-q"], work, env)
    _run([str(DVC), "init", "-q"], work, env)
    out = _run([str(DVC), "repro", "world"], work, env)
    assert "Running stage 'world'" in out
    assert (work / "data" / "world" / "tiny_bench" / "annotations.json").is_file()
    assert (work / "dvc.lock").is_file()
    out = _run([str(DVC), "repro", "world"], work, env)
    assert "Running stage" not in out and "didn't change" in out
    # one parameter of the stage changes: it runs again
    params["data"]["world"]["sets"]["tiny_bench"]["seed"] = 6
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(DVC), "repro", "world"], work, env)
    assert "Running stage 'world'" in out
