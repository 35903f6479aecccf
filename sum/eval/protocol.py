"""The protocols of the ``evaluate`` stage (spec §10.3) and their settings: the names, the rounds
of each protocol, the task prompt of each round (spec §13 A3), the target masks of an image and
the scale rule that sorts parts into resolvable and sub-resolution (spec §13 A8), the benchmarks
shown as examples, the decoder's autocast, and the checks of the ``eval`` config against the
datasets and the checkpoints.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Tuple

import cv2
import numpy as np
import torch

from sum.data.dataset import select_datasets
from sum.eval.clicker import interior_distance
from sum.eval.columns import noc_budget
from sum.tasks import TASK_IDS, task_id

PROTOCOLS = ("point", "box", "boundary")
SELECTIONS = ("oracle", "token0", "predicted_iou")
DECODERS = ("fast", "exact")
PRECISIONS = ("fp32", "bf16")
# The area half of `target_scale`'s rule (the width half is one low-res cell of the model, 4 px at
# SAM's 1024 input), fixed before any result was looked at: 0.1% of the image.
SUB_RESOLUTION_AREA = 0.001
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
    for key in ("task_prompt_zero", "predicted_iou"):
        if any(p not in PROTOCOLS for p in getattr(ev, key)):
            raise ValueError(f"eval.{key}={list(getattr(ev, key))}: expected names among {list(PROTOCOLS)}")
    if ev.selection not in SELECTIONS:
        raise ValueError(f"eval.selection={ev.selection!r}: expected one of {list(SELECTIONS)}")
    if ev.precision not in PRECISIONS:
        raise ValueError(f"eval.precision={ev.precision!r}: expected one of {list(PRECISIONS)}")
    if ev.decoder not in DECODERS:
        raise ValueError(f"eval.decoder={ev.decoder!r}: expected one of {list(DECODERS)}")
    for key, low in (("rounds", 1), ("box_rounds", 1), ("boundary_width", 1), ("max_images", 0),
                     ("max_masks_per_image", 0), ("n_panels", 0), ("threads", 0), ("noc_max_clicks", 0),
                     ("min_images", 1), ("target_seed", 0)):
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


def _is_remote(uri: str) -> bool:
    return "://" in uri


def check_checkpoints(models: Dict[str, str]) -> None:
    """Fail before any work when a local checkpoint of ``eval.models`` is missing.

    Raises:
      FileNotFoundError: naming ``eval.models.<name>`` and the path.
    """
    for name, uri in models.items():
        if uri and not _is_remote(str(uri)) and not Path(uri).is_file():
            raise FileNotFoundError(
                f"eval.models.{name}: checkpoint {uri} not found (train it with `sumseg finetune`, "
                f"point eval.models.{name} at another file, or drop the model with ~eval.models.{name})"
            )


def protocol_rounds(ev, protocol: str) -> int:
    """Reported rounds of a protocol: ``eval.rounds`` (point), ``eval.box_rounds`` (box), 1 (boundary)."""
    return {"point": ev.rounds, "box": ev.box_rounds, "boundary": 1}[protocol]


def simulated_rounds(ev, protocol: str) -> int:
    """Rounds a protocol is simulated for: its reported rounds, and for ``point`` at least the
    NoC budget (`noc_budget`)."""
    rounds = protocol_rounds(ev, protocol)
    return max(rounds, noc_budget(ev)) if protocol == "point" else rounds


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


def select_targets(masks_khw: np.ndarray, max_masks: int, key: str = "", seed: int = 0) -> np.ndarray:
    """Indices of the masks to evaluate (spec §13 A8).

    The rule: the non-empty masks of the image; when ``max_masks`` = n > 0 and the image has more
    than n of them, n drawn uniformly at random without replacement, by a generator seeded from
    ``seed`` and ``key`` (the image id: the first 8 bytes of ``sha256(f"{seed}/{key}")``). So the
    draw is fixed by the image alone, the same for every model and every run, and no size is
    forced in: the smallest (or the largest) mask is drawn with probability n / (masks in the
    image), and the mean over the drawn masks estimates the image's mean over all its masks
    without bias (spec §10.2 averages per mask). Selected masks come back by decreasing area,
    ties by index.

    Arguments:
      masks_khw: (K, H, W) binary masks of one image.
      max_masks: n, the cap; 0 = every non-empty mask.
      key: what the draw is keyed by (``eval`` passes the image id).
      seed: ``eval.target_seed``.

    Returns:
      (n,) int64 indices into ``masks_khw``, by decreasing area.
    """
    areas = masks_khw.reshape(len(masks_khw), -1).sum(axis=1)
    order = np.argsort(-areas, kind="stable")
    order = order[areas[order] > 0]
    if max_masks and len(order) > max_masks:
        digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        picks = np.sort(rng.choice(len(order), size=max_masks, replace=False))
        order = order[picks]
    return order.astype(np.int64)


def low_res_cell_px(model) -> float:
    """Side, in pixels of the model's input, of one cell of its decoder's low-res output:
    ``img_size / mask_input_size`` (1024 / 256 = 4 px for SAM and MobileSAM)."""
    return float(model.image_encoder.img_size) / float(model.prompt_encoder.mask_input_size[0])


def target_scale(mask_hw: np.ndarray, img_size: int, cell_px: float) -> Tuple[float, bool]:
    """Width of a target at the model's input scale, and whether the model can resolve it.

    The rule, written down from the model before any result was looked at (spec §13 A8, issue 19):
    a target is **sub-resolution** when, at the model's input scale (the image's longest side
    resized to the model's ``img_size``, 1024 for SAM), its width, ``2 x`` the maximum of the
    interior distance transform of its ground-truth mask (`interior_distance`, image border as
    edge), is under one cell of the decoder's low-res output (``cell_px``: 4 px, one cell of the
    256x256 logits at 1024), or its area is under 0.1% of the image (``SUB_RESOLUTION_AREA``);
    otherwise it is **resolvable**. Computed from the ground truth alone: the mask is resized to
    the input scale with nearest-neighbour sampling before its distance transform.

    Arguments:
      mask_hw: (H, W) non-empty binary ground-truth mask at the image's resolution.
      img_size: the model's input side (``ResizeLongestSide`` target length).
      cell_px: `low_res_cell_px` of the model.

    Returns:
      ``(width_px, resolvable)``: the width in input pixels, and the rule's verdict.
    """
    m = np.asarray(mask_hw).astype(bool)
    h, w = m.shape
    scale = float(img_size) / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    resized = cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    width = 2.0 * float(interior_distance(resized).max())
    area = float(m.sum()) / float(h * w)
    return width, bool(width >= cell_px and area >= SUB_RESOLUTION_AREA)


def example_benchmarks(n_images: Mapping[str, int], min_images: int) -> List[str]:
    """The benchmarks shown as examples: those whose dataset holds fewer than ``eval.min_images``
    images (counted before ``eval.max_images``). They are scored and listed in their own section
    of the table, outside every task mean and the overall mean (one image says nothing about the
    next).

    Raises:
      ValueError: naming ``eval.min_images`` when every benchmark would be an example.
    """
    examples = [n for n, k in n_images.items() if k < min_images]
    if examples and len(examples) == len(n_images):
        raise ValueError(
            f"eval.min_images={min_images}: every benchmark of {dict(n_images)} has fewer images, so "
            "nothing is left for the means; lower it (1 = no examples) or add a benchmark"
        )
    return examples
