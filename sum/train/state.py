"""A training run's state: seeding, the stop it raises, the resume key and the saved train state.

``<run_dir>/<method>/train_state.pt`` is written every ``checkpoint_every`` steps, at the end and
when SIGTERM/SIGINT arrives (the step in flight finishes first), atomically: model, optimizer,
scheduler, step, loss history, RNG states, the MLflow run id. A later call resumes from it
automatically, exactly: batches and prompts are functions of the step. A state made under another
config (anything but the iteration count, checkpoint cadence and paths), on other inputs (pseudo
labels, uncertainty maps, embeddings, datasets, checkpoint: their bytes,
`sum.train.fingerprint.input_fingerprint`) or by other training code (`code_fingerprint`) is not
resumed: training starts afresh. The state also keeps the run's training seconds so far, so a
resumed run reports its throughput over all its steps. A state file that does not read
(truncated, corrupt) is moved aside to ``train_state.pt.corrupt-<time>`` with one warning line
naming both, and training starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from sum.io import atomic_torch_save, check_format
from sum.progress import StageStopped, signal_name
from sum.train.fingerprint import code_fingerprint, input_fingerprint

log = logging.getLogger(__name__)

STATE_FORMAT = "sum-train-state/1"


class TrainingStopped(StageStopped):
    """SIGTERM or SIGINT stopped the training; the state of ``step`` is saved for resuming."""

    def __init__(self, step: int, signum: int, state_path: Path):
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; state saved to {state_path}, "
                         "run it again to resume", signum)
        self.step, self.state_path = step, state_path


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict:
    """Global RNG states (torch, CUDA, numpy, python) as plain data (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunPaths:
    state: Path  # resumable training state
    model: Path  # final SUM checkpoint
    metrics: Path  # final metrics JSON


def run_paths(train_cfg, method: str) -> RunPaths:
    """Where a method's run keeps its state and writes its checkpoint and metrics."""
    return RunPaths(
        state=Path(train_cfg.run_dir) / method / "train_state.pt",
        model=Path(train_cfg.model_dir) / f"{method}.pt",
        metrics=Path(train_cfg.metrics_dir) / f"{method}.json",
    )


_NOT_IN_KEY = {"iterations", "checkpoint_every", "log_every", "run_dir", "model_dir", "metrics_dir"}


def input_paths(cfg, method) -> List[str]:
    """What a run reads from disk under ``cfg``: the labeled datasets, and with unlabeled data the
    images, pseudo labels (and uncertainty maps when used) of the unlabeled ones, the embedding
    cache (decoder mode) and the foundation checkpoint."""
    t = cfg.train
    paths = [cfg.model.checkpoint or ""]
    for name, d in sorted(cfg.data.datasets.items()):
        if d.role == "labeled":
            paths += [d.images, d.annotations]
        elif d.role == "unlabeled" and method.use_unlabeled:
            paths += [d.images, str(Path(t.pseudo_dir) / name)]
            if method.uses_uncertainty:
                paths.append(str(Path(t.uncertainty_dir) / name))
        else:
            continue
        if t.mode == "decoder":
            paths.append(str(Path(cfg.embed.out_dir) / name))
    return [p for p in paths if p]


def resume_key(cfg, method) -> str:
    """sha256 of everything a resumed run must share with the saved one (module docstring): the
    config but the iteration count, cadence and output paths, the inputs (`input_fingerprint` of
    `input_paths`) and the training code (`code_fingerprint`), so that a stage re-run on new
    pseudo labels or new code trains afresh instead of resuming the finished run."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IN_KEY}
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("device", "fast_path")}
    text = json.dumps(
        {
            "train": train,
            "model": model,
            "method": dataclasses.asdict(method),
            "inputs": input_fingerprint(input_paths(cfg, method)),
            "code": code_fingerprint(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.corrupt-<UTC time>`` beside it (kept for inspection); returns
    the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another rank moved it aside first
        pass
    return dest


def save_train_state(path: Path, *, sam, optimizer, scheduler, step: int, key: str, history: List[float], run_id,
                     train_s: Optional[float] = None) -> None:
    """The resumable state, atomically (module docstring); ``train_s``: the seconds the run has
    trained for up to ``step``, over every call (None: unknown)."""
    state = {
        "format": STATE_FORMAT,
        "key": key,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in sam.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": list(history),
        "mlflow_run_id": run_id,
        "train_s": train_s,
    }
    atomic_torch_save(state, path)
    log.info("saved training state %s (step %d)", path, step)


def load_train_state(path: Path, key: str, *, sam, optimizer, scheduler) -> Tuple[int, List[float], Optional[str], Optional[float]]:
    """Resume from ``path`` if it holds a state of this config: (step, loss history, MLflow run id,
    training seconds so far: None when the state did not record them); (0, [], None, 0.0)
    otherwise. A file that does not read as a training state (truncated, corrupt, another format)
    is moved aside (`set_aside`) and training starts afresh."""
    if not path.is_file():
        return 0, [], None, 0.0
    try:
        state = check_format(torch.load(path, map_location="cpu", weights_only=True), STATE_FORMAT, path, "a SUM training state")
    except FileNotFoundError:  # another rank moved it aside first
        return 0, [], None, 0.0
    except Exception as e:  # torch.load raises RuntimeError, pickle and zip errors alike for a bad file
        moved = set_aside(path)
        log.warning("%s: unreadable training state (%s): moved to %s; training starts afresh",
                    path, str(e).splitlines()[0] if str(e) else type(e).__name__, moved.name)
        return 0, [], None, 0.0
    if state["key"] != key:
        log.warning("%s: saved under another config, on other inputs or by other code; training starts afresh", path)
        return 0, [], None, 0.0
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    train_s = state.get("train_s")
    return int(state["step"]), list(state["history"]), state.get("mlflow_run_id"), None if train_s is None else float(train_s)
