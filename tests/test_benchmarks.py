"""The speed suite (`benchmarks`): its equality checks compare for real (each is shown to fail on a
broken implementation), and the device check's CPU dry run (``device_check.sh --smoke``) runs the
whole suite and writes every benchmark's JSON with a ratio."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from benchmarks import BENCHMARKS, encoder, interactive, pseudolabel, train_step
from benchmarks.common import load_bench_model
from benchmarks.runner import SIZES
from sum.model.fast import OFF

REPO = Path(__file__).resolve().parent.parent
SMOKE = SIZES["smoke"]


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return {"segmentation": r}


def test_mask_match_counts_ious_and_identical_masks():
    a = np.zeros((20, 20), bool)
    a[2:10, 2:10] = True
    b = np.zeros((20, 20), bool)
    b[12:18, 5:15] = True
    a_shifted = np.roll(a, 1, axis=1)  # IoU 56 / 72
    same = pseudolabel.match([rle(a), rle(b)], [rle(a), rle(b)])
    assert same == {"official": 2, "ours": 2, "matched": 2, "ours_matched": 2, "min_iou": 1.0, "mean_iou": 1.0,
                    "iou_sum": 2.0, "identical": 2, "ok": True}
    swapped = pseudolabel.match([rle(a), rle(b)], [rle(b), rle(a)])  # same set, other order
    assert swapped["ok"] and swapped["identical"] == 0 and swapped["matched"] == 2
    moved = pseudolabel.match([rle(a), rle(b)], [rle(a_shifted), rle(b)])
    assert not moved["ok"] and moved["matched"] == 1 and moved["min_iou"] == pytest.approx(56 / 72)
    missing = pseudolabel.match([rle(a), rle(b)], [rle(a)])
    assert not missing["ok"] and missing["matched"] == 1 and missing["min_iou"] == 0.0
    assert moved["mean_iou"] == pytest.approx((1 + 56 / 72) / 2) and moved["ours_matched"] == 1


def test_bf16_check_allows_a_near_duplicate_but_not_a_moved_or_lost_mask():
    """`bf16_ok`: a count off by a near-duplicate (IoU >= 0.95 with a kept mask) passes; a mask
    moved by a pixel column (IoU 56/72), a lost one or an extra unmatched one fails."""
    a = np.zeros((40, 40), bool)
    a[2:22, 2:22] = True
    a_dup = a.copy()
    a_dup[21, 2:10] = False  # 8 of 400 pixels: IoU 0.98
    b = np.zeros((40, 40), bool)
    b[30:36, 5:15] = True
    c = np.zeros((40, 40), bool)
    c[25:29, 25:39] = True
    summed = pseudolabel.summed
    dup = pseudolabel.bf16_ok(summed([pseudolabel.match([rle(a), rle(b)], [rle(a), rle(a_dup), rle(b)])]))
    assert dup["ok"] and dup["ours"] == 3 and dup["mean_iou"] == 1.0
    moved = np.roll(b, 1, axis=1)
    assert not pseudolabel.bf16_ok(summed([pseudolabel.match([rle(a), rle(b)], [rle(a), rle(moved)])]))["ok"]
    assert not pseudolabel.bf16_ok(summed([pseudolabel.match([rle(a), rle(b)], [rle(a)])]))["ok"]
    assert not pseudolabel.bf16_ok(summed([pseudolabel.match([rle(a), rle(b)], [rle(a), rle(b), rle(c)])]))["ok"]


@pytest.fixture(scope="module")
def tiny():
    return load_bench_model("tiny", "cpu")


def test_reference_clicks_equal_run_protocol_and_a_difference_fails_the_check(tiny, monkeypatch):
    """The per-click SamPredictor loop and run_protocol give the same IoUs on the tiny model; an
    IoU moved by 0.01 in our result turns the check off."""
    model, weights = tiny
    result = interactive.run(model, "tiny", weights, "cpu", SMOKE["interactive"])
    assert result.check["ok"] and result.check["values"] == result.settings["targets"] * 6
    assert result.check["identical"] == result.check["values"]
    real = interactive.run_protocol

    def shifted(*args, **kwargs):
        res = real(*args, **kwargs)
        res.iou = res.iou + 0.01
        return res

    monkeypatch.setattr(interactive, "run_protocol", shifted)
    broken = interactive.run(model, "tiny", weights, "cpu", SMOKE["interactive"])
    assert not broken.check["ok"] and broken.check["identical"] == 0
    assert broken.check["mean_abs_diff"] == pytest.approx(0.01)


def test_interactive_flops_follow_the_work_done(tiny, monkeypatch):
    """The row's FLOP figures count what each side runs: a reference that calls the predictor
    twice per click reports twice the FLOPs per image, ours unchanged; the rates are FLOPs over
    the timed seconds, and the matmul rate is a measured, positive figure."""
    model, weights = tiny
    result = interactive.run(model, "tiny", weights, "cpu", SMOKE["interactive"])
    e = result.extra
    assert e["gflop_per_image_reference"] > 0 and e["gflop_per_image_ours"] > 0 and e["fp32_matmul_gflops"] > 0
    assert e["ours_gflops"] == pytest.approx(e["gflop_per_image_ours"] / result.ours_s)
    assert e["ratio_if_all_at_matmul_rate"] == pytest.approx(
        result.reference_s / (e["gflop_per_image_ours"] / e["fp32_matmul_gflops"]))
    real = interactive.SamPredictor.predict

    def twice(self, *args, **kwargs):
        real(self, *args, **kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interactive.SamPredictor, "predict", twice)
    doubled = interactive.run(model, "tiny", weights, "cpu", SMOKE["interactive"]).extra
    assert doubled["gflop_per_image_reference"] == pytest.approx(2 * e["gflop_per_image_reference"])
    assert doubled["gflop_per_image_ours"] == pytest.approx(e["gflop_per_image_ours"])


def test_generator_masks_match_and_a_lost_mask_fails_the_check(tiny, monkeypatch):
    model, weights = tiny
    result, bf16 = pseudolabel.run(model, "tiny", weights, "cpu", "off", SMOKE["pseudolabel"])
    assert result.check["ok"] and result.check["official"] >= 1 and "fp32 decoder" in result.ours
    assert result.check["identical"] == result.check["official"]  # fast decoder, same model: bit-identical here
    # the bf16 decoder's row: same official timing, its own time, masks against the official ones
    assert "bf16 decoder" in bf16.ours and bf16.reference_s == result.reference_s and bf16.ours_s != result.ours_s
    assert bf16.check["ok"] and bf16.check["official"] == result.check["official"] and bf16.check["mean_iou"] >= 0.99
    assert bf16.settings["ours_params"]["decoder_precision"] == "bf16"
    real = pseudolabel.MaskGenerator.generate
    monkeypatch.setattr(pseudolabel.MaskGenerator, "generate", lambda self, image: real(self, image)[1:])
    broken, broken16 = pseudolabel.run(model, "tiny", weights, "cpu", "off", SMOKE["pseudolabel"])
    assert not broken.check["ok"] and broken.check["ours"] == broken.check["official"] - 1
    assert not broken16.check["ok"]


def test_cpu_layouts_time_both_sides_in_one_thread_processes_and_match_their_masks(tiny):
    """At 2 threads each side also runs as 2 one-thread processes (the stage's layout); both
    layouts are timed, the faster is reported, and the parallel runs' masks equal the reference."""
    model, weights = tiny
    sizes = dataclasses.replace(SMOKE["pseudolabel"], images=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result, bf16 = pseudolabel.run(model, "tiny", weights, "cpu", "off", sizes)
    finally:
        torch.set_num_threads(before)
    layouts = result.settings["layouts"]
    assert set(layouts["official"]) == set(layouts["ours"]) == {"1x2", "2x1"}
    assert result.reference_s == min(layouts["official"].values()) and result.ours_s == min(layouts["ours"].values())
    for side in ("official", "ours"):
        par = result.extra["parallel_masks_vs_official"][side]
        assert par["ok"] and par["official"] == result.check["official"] >= 2
    # the bf16 decoder runs both layouts too; its check covers both runs' masks
    assert set(bf16.settings["layouts"]["ours"]) == {"1x2", "2x1"} and bf16.ours_s == min(bf16.settings["layouts"]["ours"].values())
    assert bf16.check["official"] == 2 * result.check["official"] and bf16.check["ok"]


def test_encoder_check_compares_embeddings(tiny, monkeypatch):
    """The fast path's embedding agrees with the official encoder's; one that drifts by 20% (a
    hook on the encoder while our plan is applied) fails the check."""
    model, weights = tiny
    result = encoder.run(model, "tiny", weights, "cpu", "on", SMOKE["encoder"])
    assert result.check["ok"] and result.settings["plan"] != dataclasses.asdict(OFF)
    assert result.extra["gflops_per_batch"] > 0 and result.ratio > 0
    real, hooks = encoder.apply_fast_path, []

    def drifting(m, plan):
        while hooks:
            hooks.pop().remove()
        if plan != OFF:
            hooks.append(m.image_encoder.register_forward_hook(lambda mod, args, out: out * 1.2))
        return real(m, plan)

    monkeypatch.setattr(encoder, "apply_fast_path", drifting)
    broken = encoder.run(model, "tiny", weights, "cpu", "on", SMOKE["encoder"])
    assert not broken.check["ok"] and broken.check["rel_error"] == pytest.approx(0.2, abs=0.05)


@pytest.mark.slow
def test_train_step_equals_reference_and_a_changed_loss_fails_the_check(monkeypatch):
    result = train_step.run("tiny", "cpu", SMOKE["train_step"])
    assert result.check["ok"], result.check
    assert result.check["loss_rel"] < 1e-3 and result.check["grad_cos"] > 0.999
    real = train_step.reference_loss
    monkeypatch.setattr(train_step, "reference_loss", lambda *a: real(*a) * 1.1)
    broken = train_step.run("tiny", "cpu", SMOKE["train_step"])
    assert not broken.check["ok"] and broken.check["loss_rel"] == pytest.approx(0.1 / 1.1, rel=1e-2)


def test_device_check_smoke_runs_the_suite_and_writes_every_benchmark(tmp_path):
    """The CPU dry run of benchmarks/device_check.sh: gpu tests skipped cleanly, the whole suite on
    the tiny model, its JSON with every benchmark, a ratio and a passed check."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "gpu-tests: rc 0" in summary and "suite-tiny: rc 0" in summary
    data = json.loads((tmp_path / "suite-tiny.json").read_text())
    assert data["smoke"] and data["complete"] and data["errors"] == [] and data["machine"]["cpu_count"] == os.cpu_count()
    assert "loadavg_1_5_15" in data["machine"] and data["machine"]["torch_threads"] == 1
    assert list(dict.fromkeys(r["benchmark"] for r in data["results"])) == list(BENCHMARKS)
    assert [r["ours"].split("(")[1].split(")")[0] for r in data["results"] if r["benchmark"] == "pseudolabel"] == [
        "fast, fp32 decoder", "fast, bf16 decoder"]
    for r in data["results"]:
        assert r["ratio"] == pytest.approx(r["reference_s"] / r["ours_s"]) and r["check"]["ok"], r
    table = (tmp_path / "tables.md").read_text().splitlines()
    assert sum(line.startswith("| ") and "tiny" in line for line in table) == len(BENCHMARKS) + 1
    assert "skipped" in (tmp_path / "device_check.log").read_text()


def test_device_check_refuses_an_unknown_argument(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--fast"], cwd=REPO, env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
