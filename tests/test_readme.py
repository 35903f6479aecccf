"""The README's commands stay valid: every ``sumseg <stage> ...`` line of its bash blocks parses with
the CLI's own parser and its overrides compose, and every inline ``dvc exp run -S ...`` sets keys
the config has. A renamed key or stage breaks this test instead of a user's first run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sum.cli import build_parser
from sum.config import ConfigError, compose

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def sum_commands(text: str) -> list[list[str]]:
    """Argument lists (after the program) of the ``sumseg`` command lines in the bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens and Path(tokens[0]).name == "sumseg":
                out.append(tokens[1:])
    return out


def dvc_exp_overrides(text: str) -> list[list[str]]:
    """The ``-S`` overrides of each inline ``dvc exp run`` that sets any."""
    runs = [shlex.split(m) for m in re.findall(r"`dvc exp run ([^`]*-S [^`]*)`", text)]
    return [[tok for prev, tok in zip(r, r[1:]) if prev == "-S"] for r in runs]


def test_extractors_find_the_readme_commands():
    text = README.read_text()
    stages = [args[0] for args in sum_commands(text)]
    assert "evaluate" in stages and "export-sam" in stages and "pull" in stages, stages
    assert ["train.lr=1e-5", "train.task_prompt_lr_scale=500"] in dvc_exp_overrides(text)


@pytest.mark.parametrize("args", sum_commands(README.read_text()), ids=lambda a: " ".join(a)[:60])
def test_readme_sum_command_parses_and_composes(args):
    ns = build_parser().parse_intermixed_args(args)  # as `sum.cli.main` parses
    if ns.stage == "pull":  # its positional is a model URI, not an override
        from sum.registry.pull import FORMATS, parse_models_uri

        assert len(ns.overrides) == 1 and ns.out and ns.format in FORMATS
        parse_models_uri(ns.overrides[0])
        return
    compose(ns.overrides)


@pytest.mark.parametrize("overrides", dvc_exp_overrides(README.read_text()), ids=lambda o: " ".join(o)[:60])
def test_readme_dvc_exp_run_overrides_compose(overrides):
    compose(overrides)


def test_a_renamed_key_would_fail():
    """The check above is not vacuous: an override of a key the config lacks is refused."""
    with pytest.raises(ConfigError):
        compose(["train.learning_rate=1e-5"])


def test_the_cli_is_sumseg_everywhere():
    """The command is ``sumseg`` (``sum`` is coreutils' checksum tool): the installed script, every
    ``dvc.yaml`` stage, the flows, the README's command lines; ``python -m sum`` is the same CLI."""
    import yaml

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sumseg": "sum.cli:main"}
    assert build_parser().prog == "sumseg"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmds = [s["do"]["cmd"] if "do" in s else s["cmd"] for s in stages.values()]
    assert cmds and all(shlex.split(c)[0] == "sumseg" for c in cmds), cmds
    plain = r"(?<![\w./-])(?<!-m )sum (?:" + "|".join(map(re.escape, build_parser()._actions[1].choices)) + r")\b"
    for path in [README, REPO / "dvc.yaml", *sorted((REPO / "flows").glob("*.py")), REPO / "prefect.yaml"]:
        assert not re.search(plain, path.read_text()), f"{path.name} still calls `sum <stage>`"
    r = subprocess.run([sys.executable, "-m", "sum", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: sumseg "), r.stderr[-2000:]


def test_the_library_names_the_readme_gives_exist():
    """Every ```sum.<module>.<name>``` the README names (the stage table's library calls and the
    like) resolves: a moved function breaks this test instead of a reader's search."""
    import importlib

    names = sorted(set(re.findall(r"`(sum(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`", README.read_text())))
    assert len(names) > 10
    missing = []
    for dotted in names:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    assert not missing, f"README names what the library lacks: {missing}"
