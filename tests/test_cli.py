"""The `sum` console script: stages are thin shells, errors are one line."""

import subprocess
import sys

import torch

from sum.model.build import build_sum_model
from sum.model.checkpoint import save_sum_checkpoint

from conftest import stock_sam


def test_export_sam_cli_writes_a_stock_sam_state_dict(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    model = build_sum_model(tiny_cfg)
    with torch.no_grad():
        model.prompt_encoder.task_prompt_embedding[1].weight.fill_(0.5)
    src = save_sum_checkpoint(model, tiny_cfg, tmp_path / "sum.ckpt")
    out = tmp_path / "sam.pth"
    r = subprocess.run(
        [sys.executable, "-m", "sum", "export-sam", "--src", str(src), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert not any("task_prompt" in k for k in state)
    stock = stock_sam(tiny_cfg)
    stock.load_state_dict(state, strict=True)
    for k, v in stock.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_export_sam_of_the_mobile_sam_default_loads_into_mobile_sams_vit_t(tmp_path, monkeypatch):
    """The README's way for the MobileSAM-based default: the export loads strictly into
    ``mobile_sam.sam_model_registry["vit_t"]`` (stock SAM cannot build TinyViT), weights equal."""
    import warnings

    from sum.cli import main

    from conftest import model_config

    cfg = model_config("mobile_sam")
    torch.manual_seed(0)
    model = build_sum_model(cfg)
    src = save_sum_checkpoint(model, cfg, tmp_path / "models" / "sum.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["export-sam", "--src", str(src), "--out", "sam.pth"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notes on mobile_sam's imports
        from mobile_sam import sam_model_registry

        sam = sam_model_registry["vit_t"](checkpoint=str(tmp_path / "sam.pth"))
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in sam.state_dict().items())


def test_export_sam_cli_missing_file_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sum", "export-sam", "--src", str(tmp_path / "nope.ckpt"), "--out", "x.pth"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "nope.ckpt" in lines[0]
    assert not (tmp_path / "x.pth").exists()


def test_every_config_stage_names_a_library_function():
    import importlib

    from sum.cli import CONFIG_STAGES, STAGES, build_parser

    assert not set(CONFIG_STAGES) & set(STAGES)
    assert set(build_parser()._actions[1].choices) == set(CONFIG_STAGES) | set(STAGES)
    for stage, target in CONFIG_STAGES.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), stage
