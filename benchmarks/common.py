"""What the suite's benchmarks share: the models (``params/model/<name>.yaml``, MobileSAM's real
weights where found, random weights otherwise), the synthetic inputs, a timer that waits for the
GPU, the description of the machine and the result record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from sum.config import ModelConfig
from sum.model.build import build_sum_model
from sum.model.checkpoint import load_model

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_ENV = "SUM_MOBILE_SAM_CHECKPOINT"


@dataclass
class Result:
    """One row of the suite: a benchmark on one model, reference and ours timed in the same run.

    ``check`` says whether both computed the same thing (``ok``) and how that was judged
    (``summary`` plus figures); ``settings`` the sizes; ``extra`` anything else measured."""

    benchmark: str
    model: str
    reference: str
    ours: str
    unit: str
    reference_s: float
    ours_s: float
    check: Dict[str, Any]
    settings: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times faster ours is (reference time / our time)."""
        return self.reference_s / self.ours_s if self.ours_s > 0 else float("inf")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "benchmark": self.benchmark, "model": self.model, "reference": self.reference, "ours": self.ours,
            "unit": self.unit, "reference_s": self.reference_s, "ours_s": self.ours_s, "ratio": self.ratio,
            "check": self.check, "settings": self.settings, "extra": self.extra,
        }


def model_config(name: str) -> ModelConfig:
    """``params/model/<name>.yaml`` as a `ModelConfig`."""
    path = REPO / "params" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"--model {name}: no {path} (known: {', '.join(known)})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def mobile_sam_checkpoint() -> Optional[Path]:
    """MobileSAM's real weights: ``$SUM_MOBILE_SAM_CHECKPOINT``, the ``acquire`` stage's
    ``data/raw/mobile_sam/mobile_sam.pt``, or the tests' cache (``$SUM_CACHE_DIR`` or
    ``~/.cache/sum``, ``mobile_sam/mobile_sam.pt``); None when none exists.

    Raises:
      FileNotFoundError: naming the variable when ``$SUM_MOBILE_SAM_CHECKPOINT`` is set to a
        file that does not exist.
    """
    env = os.environ.get(CHECKPOINT_ENV, "").strip()
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{CHECKPOINT_ENV}={env}: no such file")
        return Path(env)
    cache = Path(os.environ.get("SUM_CACHE_DIR") or Path.home() / ".cache" / "sum")
    for path in (REPO / "data" / "raw" / "mobile_sam" / "mobile_sam.pt", cache / "mobile_sam" / "mobile_sam.pt"):
        if path.is_file():
            return path
    return None


def weights_of(name: str) -> Optional[Path]:
    """The checkpoint the suite loads for model ``name``: MobileSAM's real weights, else None
    (random weights: speed does not depend on them)."""
    return mobile_sam_checkpoint() if name == "mobile_sam" else None


def load_bench_model(name: str, device: str) -> tuple[torch.nn.Module, str]:
    """Model ``name`` on ``device`` in eval mode with the encoder fast path off, and the name of
    its weights. Random weights are seeded, with the ViT's relative-position tables (zero in a
    fresh SAM) drawn too so that the attention bias they make is not trivially zero."""
    cfg = model_config(name)
    path = weights_of(name)
    torch.manual_seed(0)
    if path is not None:
        return load_model(cfg, path, device=device, fast_path="off"), str(path)
    model = build_sum_model(cfg)
    with torch.no_grad():
        for pname, p in model.image_encoder.named_parameters():
            if "rel_pos" in pname:
                p.normal_(0.0, 0.05)
    return model.to(device).eval(), "random"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """``fn()``'s result and its wall seconds, the GPU's queued work included."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A textured background with coloured discs, rectangles and a gradient: many segments."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(60, 200, 3)
    img += (yy / h)[..., None] * rng.uniform(-40, 40, 3)
    for _ in range(8):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(max(2, min(h, w) // 20), max(3, min(h, w) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
        y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
        img[y0 : y0 + rng.integers(10, max(11, h // 3)), x0 : x0 + rng.integers(10, max(11, w // 3))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def machine_info(device: str, threads: int) -> Dict[str, Any]:
    """The machine the figures come from: load averages, CPUs, threads, library versions, GPU."""
    info: Dict[str, Any] = {
        "loadavg_1_5_15": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_asked": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info["device_name"] = "cpu"
    return info
