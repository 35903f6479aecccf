"""Image-encoder speed: the fast path (`sum.model.fast`) against the official fp32 encoder.

Both run in the same process on the same weights, alternating, and the median time is reported:

- CUDA: SAM ViT-B and ViT-H (random weights) at 1024 px, batch 1 and 8: images/s and peak memory,
  official fp32 ``ImageEncoderViT`` vs fused SDPA attention + bf16 autocast + channels_last;
- CPU: MobileSAM's TinyViT encoder at 1024 px, one image: seconds per image, fp32 vs bf16
  autocast + channels_last (the real weights when ``data/raw/mobile_sam/mobile_sam.pt`` exists).

Usage::

    python benchmarks/encoder.py                 # every part this machine can run
    python benchmarks/encoder.py --part cpu --rounds 5 --threads 2
    python benchmarks/encoder.py --part cuda --models vit_b --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sum.config import ModelConfig  # noqa: E402
from sum.model.build import build_sum_model  # noqa: E402
from sum.model.checkpoint import load_model  # noqa: E402
from sum.model.fast import OFF, FastPath, apply_fast_path, resolve_fast_path  # noqa: E402

MOBILE_SAM_CHECKPOINT = REPO / "data" / "raw" / "mobile_sam" / "mobile_sam.pt"


def model_config(name: str) -> ModelConfig:
    raw = OmegaConf.load(REPO / "params" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def seconds_per_call(encoder, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    encoder(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(model, x: torch.Tensor, fast: FastPath, warmup: int, rounds: int) -> dict:
    """Median seconds per encoder call (and CUDA peak memory) for fp32 and ``fast``, alternating."""
    times = {"fp32": [], "fast": []}
    peak = {}
    plans = {"fp32": OFF, "fast": fast}
    with torch.inference_mode():
        for name, plan in plans.items():
            apply_fast_path(model, plan)
            if x.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup):
                seconds_per_call(model.image_encoder, x)
            if x.is_cuda:
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        for _ in range(rounds):
            for name, plan in plans.items():
                apply_fast_path(model, plan)
                times[name].append(seconds_per_call(model.image_encoder, x))
    apply_fast_path(model, OFF)
    return {name: statistics.median(t) for name, t in times.items()} | {"peak_gib": peak}


def run_cuda(models: list[str], batch_sizes: list[int], warmup: int, rounds: int) -> None:
    print(f"CUDA: {torch.cuda.get_device_name()}, torch {torch.__version__}, 1024 px, random weights")
    header = ["fp32 img/s", "fast img/s", "speedup", "fp32 GiB", "fast GiB"]
    print(f"{'model':8} {'batch':>5} " + " ".join(f"{h:>11}" for h in header))
    for name in models:
        torch.manual_seed(0)
        model = build_sum_model(model_config(name)).cuda().eval()
        fast = resolve_fast_path(model, "auto", "cuda")
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 1024, 1024, device="cuda")
            r = compare(model, x, fast, warmup, rounds)
            print(
                f"{name:8} {batch:5d} {batch / r['fp32']:11.2f} {batch / r['fast']:11.2f} "
                f"{r['fp32'] / r['fast']:10.2f}x {r['peak_gib']['fp32']:11.2f} {r['peak_gib']['fast']:11.2f}",
                flush=True,
            )
            del x
        del model
        torch.cuda.empty_cache()


def run_cpu(warmup: int, rounds: int) -> None:
    torch.manual_seed(0)
    cfg = model_config("mobile_sam")
    if MOBILE_SAM_CHECKPOINT.is_file():
        model = load_model(cfg, MOBILE_SAM_CHECKPOINT, device="cpu", fast_path="off")
        weights = MOBILE_SAM_CHECKPOINT.name
    else:
        model, weights = build_sum_model(cfg), "random weights"
    fast = resolve_fast_path(model, "on", "cpu")
    auto = resolve_fast_path(model, "auto", "cpu")
    print(
        f"CPU: {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__}; MobileSAM encoder ({weights}), 1024 px, batch 1"
    )
    print(f"fast = {fast}; 'auto' on this CPU = {auto}")
    x = torch.randn(1, 3, 1024, 1024)
    r = compare(model, x, fast, warmup, rounds)
    print(f"{'fp32 s/img':>11} {'fast s/img':>11} {'speedup':>8}")
    print(f"{r['fp32']:11.3f} {r['fast']:11.3f} {r['fp32'] / r['fast']:7.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "cuda", "cpu"], default="all",
                        help="all = CUDA (if present) then CPU")
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_h"], help="CUDA models (params/model/*.yaml)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "cuda"):
        if torch.cuda.is_available():
            run_cuda(args.models, args.batch_sizes, args.warmup, args.rounds)
        elif args.part == "cuda":
            parser.error("--part cuda: no CUDA device")
        else:
            print("CUDA: no device, skipped")
    if args.part in ("all", "cpu"):
        run_cpu(args.warmup, args.rounds)


if __name__ == "__main__":
    main()
