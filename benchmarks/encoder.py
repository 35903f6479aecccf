"""Image encoder: the official fp32 encoder (SAM's ``ImageEncoderViT`` or MobileSAM's TinyViT,
`sum.model.fast` off) against the fast path at the model config's ``fast_path`` (what every stage
loads: on CUDA fused attention + bf16 autocast + channels_last), on the same weights and images,
alternating, median seconds per batch.

The check compares the two embeddings (relative L2 error: fp32 rounding when the plan stays fp32,
bf16 rounding otherwise). The FLOPs of one forward are counted with
``torch.utils.flop_counter`` on the official encoder; on CUDA the achieved TFLOP/s is set against
a large bf16 matmul timed in the same run (`matmul_peak_tflops`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Result, median, synchronize, synthetic_image, timed
from sum.model.fast import OFF, apply_fast_path, resolve_fast_path

FP32_REL_TOL = 1e-4  # the fast path in fp32 (channels_last / SDPA) vs the official encoder
BF16_REL_TOL = 0.05  # under bf16 autocast (8 mantissa bits through every block)


@dataclass(frozen=True)
class EncoderSizes:
    batch: int
    warmup: int
    rounds: int


@functools.lru_cache(maxsize=None)
def matmul_peak_tflops(device: str, n: int = 8192, warmup: int = 3, rounds: int = 10) -> float:
    """TFLOP/s of an ``n``x``n``x``n`` bf16 matmul on ``device`` (CUDA), mean of ``rounds``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(rounds)], device)
    return 2 * n**3 * rounds / seconds / 1e12


def encoder_flops(model, x1: torch.Tensor) -> int:
    """FLOPs of one official-encoder forward on the single image ``x1`` (1, 3, S, S)."""
    apply_fast_path(model, OFF)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.image_encoder(x1)
    return int(counter.get_total_flops())


def encoder_input(model, batch: int, device: str) -> torch.Tensor:
    """``batch`` synthetic images at the encoder's input size, normalised as SAM does."""
    size = model.image_encoder.img_size
    images = [torch.as_tensor(synthetic_image(size, size, seed)).permute(2, 0, 1).float() for seed in range(batch)]
    return model.preprocess(torch.stack(images).to(device))


def run(model, name: str, weights: str, device: str, fast_mode: str, sizes: EncoderSizes) -> Result:
    """Official fp32 encoder vs the fast path ``fast_mode`` resolves to on ``device``."""
    plan = resolve_fast_path(model, fast_mode, device)
    x = encoder_input(model, sizes.batch, device)
    plans = {"reference": OFF, "ours": plan}
    times = {k: [] for k in plans}
    out, peak = {}, {}
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        for key, p in plans.items():
            apply_fast_path(model, p)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(sizes.warmup):
                model.image_encoder(x)
            out[key] = model.image_encoder(x).float()
            synchronize(device)
            if cuda:
                peak[key] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for _ in range(sizes.rounds):
            for key, p in plans.items():
                apply_fast_path(model, p)
                times[key].append(timed(lambda: model.image_encoder(x), device)[1])
    flops = encoder_flops(model, x[:1]) * sizes.batch
    apply_fast_path(model, OFF)
    rel = float((out["ours"] - out["reference"]).norm() / out["reference"].norm())
    tol = BF16_REL_TOL if plan.bf16_autocast else FP32_REL_TOL
    ref_s, ours_s = median(times["reference"]), median(times["ours"])
    extra = {"gflops_per_batch": flops / 1e9, "reference_tflops": flops / ref_s / 1e12,
             "ours_tflops": flops / ours_s / 1e12, "peak_gib": peak}
    if cuda:
        extra["bf16_matmul_peak_tflops"] = matmul_peak_tflops(device)
        extra["ours_fraction_of_peak"] = extra["ours_tflops"] / extra["bf16_matmul_peak_tflops"]
    return Result(
        benchmark="encoder", model=name, reference="official encoder fp32", ours=f"fast path {plan_name(plan)}",
        unit=f"s/batch of {sizes.batch}", reference_s=ref_s, ours_s=ours_s,
        check={"ok": rel <= tol, "summary": f"embedding rel. error {rel:.1e} (<= {tol:g})", "rel_error": rel, "tolerance": tol},
        settings={"batch": sizes.batch, "rounds": sizes.rounds, "warmup": sizes.warmup, "weights": weights,
                  "img_size": int(model.image_encoder.img_size), "plan": dataclasses.asdict(plan)},
        extra=extra,
    )


def plan_name(plan) -> str:
    parts = [k for k, v in (("sdpa", plan.fused_attention), ("bf16", plan.bf16_autocast), ("channels_last", plan.channels_last)) if v]
    return "+".join(parts) or "off (fp32)"
