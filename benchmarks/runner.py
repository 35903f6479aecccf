"""The suite's sizes per setting (``cpu``, ``cuda``, ``smoke``), the loop over models and
benchmarks (one model load serves encoder, pseudo-labeling and interactive evaluation; the
training step builds its own, as ``finetune`` does), and the table."""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import BENCHMARKS, encoder, interactive, pseudolabel, train_step
from benchmarks.common import Result, load_bench_model, model_config

log = logging.getLogger("benchmarks")

SIZES = {
    # the acceptance setting of this machine's CPU: MobileSAM at 1024 px
    "cpu": {
        "encoder": encoder.EncoderSizes(batch=1, warmup=1, rounds=3),
        "pseudolabel": pseudolabel.AmgSizes(images=2, image_hw=(480, 640), points_per_side=16, official_points_per_batch=(4, 16)),
        "interactive": interactive.EvalSizes(images=3, image_size=512, masks_per_image=6, rounds=6),
        "train_step": train_step.TrainSizes(batch=4, max_masks=8, loss_size=256, steps=2, warmup=1, world_images=4, world_size=512),
    },
    # a lent GPU: ViT-H included, the paper's full-mode training at the input size
    "cuda": {
        "encoder": encoder.EncoderSizes(batch=8, warmup=3, rounds=10),
        "pseudolabel": pseudolabel.AmgSizes(images=2, image_hw=(768, 1024), points_per_side=32, official_points_per_batch=(64, 256, 1024)),
        "interactive": interactive.EvalSizes(images=4, image_size=1024, masks_per_image=6, rounds=6),
        "train_step": train_step.TrainSizes(batch=4, max_masks=16, loss_size=0, steps=4, warmup=2, world_images=4, world_size=1024),
    },
    # a dry run: every code path, the smallest inputs
    "smoke": {
        "encoder": encoder.EncoderSizes(batch=1, warmup=0, rounds=1),
        "pseudolabel": pseudolabel.AmgSizes(images=1, image_hw=(96, 128), points_per_side=8, official_points_per_batch=(4, 16),
                                                 thresholds=(0.0, 0.0)),
        "interactive": interactive.EvalSizes(images=1, image_size=64, masks_per_image=2, rounds=6),
        "train_step": train_step.TrainSizes(batch=2, max_masks=2, loss_size=64, steps=1, warmup=0, world_images=2, world_size=64),
    },
}


def suite_sizes(setting: str) -> Dict[str, object]:
    return SIZES[setting]


def run_one(bench: str, name: str, model, weights: str, device: str, sizes: Dict[str, object]) -> List[Result]:
    """A benchmark's rows (pseudolabel: ours at the pipeline's decoder precision, and bf16)."""
    fast_mode = model_config(name).fast_path
    if bench == "encoder":
        return [encoder.run(model, name, weights, device, fast_mode, sizes["encoder"])]
    if bench == "pseudolabel":
        return pseudolabel.run(model, name, weights, device, fast_mode, sizes["pseudolabel"])
    if bench == "interactive":
        return [interactive.run(model, name, weights, device, sizes["interactive"])]
    return [train_step.run(name, device, sizes["train_step"])]


def run_suite(models: Sequence[str], benches: Sequence[str], device: str, sizes,
              on_result: Optional[Callable] = None) -> Tuple[List[Result], List[Dict]]:
    """Every benchmark of ``benches`` on every model; a benchmark that raises is recorded (with
    its traceback) and the others still run. ``on_result(results, errors)`` after each one."""
    results, errors = [], []
    for name in models:
        model, weights = load_bench_model(name, device) if set(benches) - {"train_step"} else (None, "")
        for bench in (b for b in BENCHMARKS if b in benches):
            print(f"{bench} on {name} ({device}) ...", flush=True)
            try:
                rows = run_one(bench, name, model, weights, device, sizes)
            except Exception as e:  # the suite goes on; the JSON says what broke
                traceback.print_exc()
                errors.append({"benchmark": bench, "model": name, "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()})
            else:
                for r in rows:
                    results.append(r)
                    print(f"  {format_row(r)}", flush=True)
            if on_result is not None:
                on_result(results, errors)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results, errors


def seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_row(r: Result) -> str:
    return (f"{r.benchmark} {r.model}: {r.reference} {seconds(r.reference_s)}, ours {seconds(r.ours_s)} "
            f"({r.unit}), {r.ratio:.2f}x; check {'ok' if r.check.get('ok') else 'FAILED'}: {r.check.get('summary', '')}")


def print_table(results: Sequence[Result]) -> None:
    """A markdown table: benchmark, model, reference and its time, ours and its time, ratio, check."""
    print("| benchmark | model | reference | time | ours | time | ratio | unit | check |")
    print("|---|---|---|---:|---|---:|---:|---|---|")
    for r in results:
        verdict = ("ok: " if r.check.get("ok") else "FAILED: ") + str(r.check.get("summary", ""))
        print(f"| {r.benchmark} | {r.model} | {r.reference} | {seconds(r.reference_s)} | {r.ours} | {seconds(r.ours_s)} "
              f"| {r.ratio:.2f}x | {r.unit} | {verdict} |")
    extra = [r for r in results if r.benchmark == "encoder"]
    for r in extra:
        e = r.extra
        line = f"encoder {r.model}: {e['gflops_per_batch']:.4g} GFLOP/batch, ours {e['ours_tflops']:.3g} TFLOP/s"
        if "bf16_matmul_peak_tflops" in e:
            line += f" = {100 * e['ours_fraction_of_peak']:.1f}% of a bf16 matmul's {e['bf16_matmul_peak_tflops']:.0f} TFLOP/s"
        if "compiled" in e:
            c = e["compiled"]
            line += (f"; with torch.compile {seconds(c['s'])} per batch ({c['speedup_vs_ours']:.2f}x ours, first call "
                     f"{seconds(c['first_call_s'])}, rel. error {c['rel_error']:.1e})")
        print(line)
    for r in (r for r in results if r.benchmark == "interactive" and "fp32_matmul_gflops" in r.extra):
        e = r.extra
        print(f"interactive {r.model}: {e['gflop_per_image_reference']:.4g} vs {e['gflop_per_image_ours']:.4g} GFLOP/image, "
              f"{e['reference_gflops']:.3g} vs {e['ours_gflops']:.3g} GFLOP/s; an fp32 matmul of the decoder's shape "
              f"{e['fp32_matmul_gflops']:.3g} GFLOP/s ({100 * e['ours_fraction_of_matmul']:.0f}% of it); "
              f"all of ours at that rate: {e['ratio_if_all_at_matmul_rate']:.2f}x")
