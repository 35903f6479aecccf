"""The protocols of the ``evaluate`` stage (spec §10.3) and their settings: the names, the rounds
of each protocol, the task prompt of each round (spec §13 A3), the target masks of an image
(spec §13 A8), the decoder's autocast, and the check of the ``eval`` config against the datasets.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Collection, Dict, List

import numpy as np
import torch

from sum.data.dataset import select_datasets
from sum.tasks import TASK_IDS, task_id

PROTOCOLS = ("point", "box", "boundary")
SELECTIONS = ("oracle", "token0")
DECODERS = ("fast", "exact")
PRECISIONS = ("fp32", "bf16")
NOC_THRESHOLDS = {"noc85": 0.85, "noc90": 0.90}
TP0_SUFFIX = "@tp0"
MODEL_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_eval_config(ev, datasets: Dict[str, object]) -> List[str]:
    """Validate ``eval`` against ``data.datasets``; return the benchmark names to evaluate.

    Raises:
      ValueError: one line naming the ``eval.<key>`` and what was expected.
    """
    if not ev.models:
        raise ValueError("eval.models: empty; expected name -> checkpoint ('' = model.checkpoint)")
    for name in ev.models:
        if not MODEL_NAME.match(str(name)):
            raise ValueError(f"eval.models.{name}: model names may hold letters, digits, '_' and '-' only")
    bad = [p for p in ev.protocols if p not in PROTOCOLS]
    if bad or not ev.protocols or len(set(ev.protocols)) != len(ev.protocols):
        raise ValueError(f"eval.protocols={list(ev.protocols)}: expected distinct names among {list(PROTOCOLS)}")
    bad = [p for p in ev.task_prompt_zero if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"eval.task_prompt_zero={list(ev.task_prompt_zero)}: expected names among {list(PROTOCOLS)}")
    if ev.selection not in SELECTIONS:
        raise ValueError(f"eval.selection={ev.selection!r}: expected one of {list(SELECTIONS)}")
    if ev.precision not in PRECISIONS:
        raise ValueError(f"eval.precision={ev.precision!r}: expected one of {list(PRECISIONS)}")
    if ev.decoder not in DECODERS:
        raise ValueError(f"eval.decoder={ev.decoder!r}: expected one of {list(DECODERS)}")
    for key, low in (("rounds", 1), ("box_rounds", 1), ("boundary_width", 1), ("max_images", 0),
                     ("max_masks_per_image", 0), ("n_panels", 0), ("threads", 0)):
        value = getattr(ev, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"eval.{key}={value!r}: expected an integer >= {low}")
    if ev.reference and ev.reference not in ev.models:
        raise ValueError(f"eval.reference={ev.reference!r}: not a model of eval.models {list(ev.models)}")
    if not isinstance(ev.bootstrap, int) or isinstance(ev.bootstrap, bool) or ev.bootstrap < 0:
        raise ValueError(f"eval.bootstrap={ev.bootstrap!r}: expected an integer >= 0")
    if not isinstance(ev.ci_level, (int, float)) or isinstance(ev.ci_level, bool) or not 0.0 < ev.ci_level < 1.0:
        raise ValueError(f"eval.ci_level={ev.ci_level!r}: expected a fraction in (0, 1)")
    names = list(ev.datasets) or [n for n, d in datasets.items() if d.role == "benchmark"]
    if not names:
        raise ValueError("eval.datasets: empty and no dataset in data.datasets has role 'benchmark'")
    names = select_datasets(datasets, names, "eval.datasets")
    for n in names:
        if datasets[n].task not in TASK_IDS:
            raise ValueError(f"data.datasets.{n}.task={datasets[n].task!r}: expected one of {sorted(TASK_IDS)}")
    return names


def protocol_rounds(ev, protocol: str) -> int:
    """Rounds of a protocol: ``eval.rounds`` (point), ``eval.box_rounds`` (box), 1 (boundary)."""
    return {"point": ev.rounds, "box": ev.box_rounds, "boundary": 1}[protocol]


def decoder_autocast(precision: str, device: torch.device):
    """Autocast around prompt encoder + mask decoder: none for ``fp32``, bf16 for ``bf16``.

    fp32 is the default because bf16 does not leave the scores alone: a per-mask IoU can move a
    lot (another oracle pick or click, then another path), and with it the benchmark means.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"eval.precision={precision!r}: expected one of {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()



def task_prompts(
    benchmark_task: str,
    trained_tasks: Collection[str],
    rounds: int,
    use_task_prompt: bool,
    continuous: bool = False,
) -> List[int]:
    """The task prompt id of each round at test time (spec §13 A3).

    Round 1 gets the id of the benchmark's task (`sum.tasks.TASK_IDS`: salient 1, entity 2,
    part 3) when the model's method uses task prompts and that task was trained, i.e. is the task
    of a labeled dataset; otherwise 0. Later rounds get 0, except for the "Continuous TP"
    ablation (``continuous``), which keeps the id in every round as it was trained.

    Arguments:
      benchmark_task: task name of the benchmark (``data.datasets.<name>.task``).
      trained_tasks: task names of the labeled datasets.
      rounds: number of rounds.
      use_task_prompt: the method's ``use_task_prompt`` (False for the foundation model).
      continuous: the method's ``continuous_task_prompt``.

    Returns:
      ``rounds`` ids.
    """
    tid = task_id(benchmark_task) if use_task_prompt and benchmark_task in set(trained_tasks) else 0
    return [tid if (r == 0 or continuous) else 0 for r in range(rounds)]


def select_targets(masks_khw: np.ndarray, max_masks: int) -> np.ndarray:
    """Indices of the masks to evaluate: the non-empty ones (spec §13 A8), largest first; with
    ``max_masks`` = n > 0 and more masks than that, n of them spread evenly over the area ranking
    (the largest, the smallest and evenly spaced ranks between), ties broken by index.

    Returns:
      (n,) int64 indices into ``masks_khw``, by decreasing area.
    """
    areas = masks_khw.reshape(len(masks_khw), -1).sum(axis=1)
    order = np.argsort(-areas, kind="stable")
    order = order[areas[order] > 0]
    if max_masks and len(order) > max_masks:
        picks = np.round(np.linspace(0, len(order) - 1, max_masks)).astype(np.int64)
        order = order[picks]
    return order.astype(np.int64)

