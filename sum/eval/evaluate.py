"""The ``evaluate`` stage: interactive segmentation benchmarks of several models (spec §10).

`run_evaluate` is the one library call the CLI, DVC and Prefect reach. For every benchmark image
and every model of ``eval.models`` it simulates the protocols of spec §10.3 on the image's target
masks and scores every round with IoU and boundary IoU at the original resolution (spec §10.2):

- ``point``: a positive click at the ground truth's interior-most point (`first_click`), then one
  corrective click per round at the interior-most point of the larger error (`next_click`, pixels
  already clicked excluded), ``eval.rounds`` rounds in all (NoC@85 / NoC@90 come from these);
- ``box``: the tight ground-truth box, no jitter, then corrective clicks with the box kept,
  ``eval.box_rounds`` rounds in all;
- ``boundary``: one click at the 'median' boundary point (`boundary_click`, Tab. 5), one round.

Every round's prompts are the accumulated prompts of the mask, the mask input is the previous
round's low-res logits of the selected output (spec §10.3 [REC]), and the output is selected as
``eval.selection`` says: ``oracle`` takes, when a round has a single prompt (first click, box
alone, boundary click), the output of three closest to the ground truth (highest IoU) and the one
output of multi-prompt rounds; ``token0`` asks for one output (``multimask_output=False``)
everywhere. A mask whose prediction has no error left gets no further click: its last scores
stand for the remaining rounds.

Task prompt at test time (spec §13 A3, `task_prompts`): a model whose method trains task prompts
(``meta.method`` of its checkpoint, `resolve_method`) gets, in round 1 only, the id of the
benchmark's task when that task is among the labeled datasets' tasks, else 0; ``<name>@tp0`` is
the same model with id 0 everywhere (on the protocols of ``eval.task_prompt_zero``).

Targets (spec §13 A8): the non-empty masks of an image; with ``eval.max_masks_per_image`` = n,
n masks spread evenly over the image's masks ranked by area (largest, smallest and between), so
that a capped run scores small and large masks alike (`select_targets`).

Speed: an image's embedding is read from the `EmbeddingCache` when the cache was made by the
model's encoder (`encoder_fingerprint`; decoder-mode fine-tunes share the foundation encoder),
else encoded once per distinct encoder and shared by the models that have it. All targets of an
image go through the decoder in one call per round and model. The decoder runs under
``eval.precision`` autocast (`decoder_autocast`); upsampling and every metric are fp32. With
``eval.decoder: fast`` (default) it is computed by `sum.model.folded_decoder.folded_decode`, the
same function as SAM's ``MaskDecoder`` about 2x faster (every target carries its own mask input
from round 2 on); ``exact`` calls SAM's decoder (bit-identical to `SumPredictor.predict`; the
fast one agrees to float rounding, so a pixel whose logit is within ~1e-5 of 0 may flip).

Outputs (`sum.eval.report`): ``eval.metrics`` (DVC metrics JSON), per-round curves under
``eval.plots_dir``, and under ``eval.out_dir`` the markdown table, PNG panels, a per-mask CSV and
``run.json`` (models, benchmarks, timings); all logged to MLflow when tracking is on.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Dict, List, Optional, Sequence

import numpy as np
import torch

from sum.eval.clicker import Click, boundary_click, first_click, next_click
from sum.eval.metrics import aggregate, boundary_iou, mask_iou_batch, noc
from sum.model.folded_decoder import folded_decode, upscaling_is_sam
from sum.tasks import TASK_IDS, task_id

log = logging.getLogger(__name__)

PROTOCOLS = ("point", "box", "boundary")
SELECTIONS = ("oracle", "token0")
DECODERS = ("fast", "exact")
PRECISIONS = ("fp32", "bf16")
NOC_THRESHOLDS = {"noc85": 0.85, "noc90": 0.90}
TP0_SUFFIX = "@tp0"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


# ---------------------------------------------------------------------------------------------
# Config


def check_eval_config(ev, datasets: Dict[str, object]) -> List[str]:
    """Validate ``eval`` against ``data.datasets``; return the benchmark names to evaluate.

    Raises:
      ValueError: one line naming the ``eval.<key>`` and what was expected.
    """
    if not ev.models:
        raise ValueError("eval.models: empty; expected name -> checkpoint ('' = model.checkpoint)")
    for name in ev.models:
        if not _MODEL_NAME.match(str(name)):
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
    unknown = [n for n in names if n not in datasets]
    if unknown:
        raise ValueError(f"eval.datasets: unknown dataset(s) {unknown}; known: {sorted(datasets)}")
    for n in names:
        if datasets[n].task not in TASK_IDS:
            raise ValueError(f"data.datasets.{n}.task={datasets[n].task!r}: expected one of {sorted(TASK_IDS)}")
    return names


def protocol_rounds(ev, protocol: str) -> int:
    """Rounds of a protocol: ``eval.rounds`` (point), ``eval.box_rounds`` (box), 1 (boundary)."""
    return {"point": ev.rounds, "box": ev.box_rounds, "boundary": 1}[protocol]


def decoder_autocast(precision: str, device: torch.device):
    """Autocast around prompt encoder + mask decoder: none for ``fp32``, bf16 for ``bf16``.

    fp32 is the default because bf16 does not leave the scores alone: on the embedded default
    (MobileSAM, 105 masks, 2-core AVX512-BF16 CPU) it ran the decoder 1.4x faster, but per-mask
    IoUs moved by 0.005 on average and up to 0.95 (another oracle pick or click, then another
    path), per-benchmark means by up to 0.05.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"eval.precision={precision!r}: expected one of {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# ---------------------------------------------------------------------------------------------
# Task prompt (spec §13 A3) and targets (A8)


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


# ---------------------------------------------------------------------------------------------
# One round, one protocol


def decode(
    predictor,
    point_coords: Optional[np.ndarray],
    point_labels: Optional[np.ndarray],
    boxes: Optional[np.ndarray],
    mask_input: Optional[torch.Tensor],
    task_prompt: int,
    multimask: bool,
    autocast=None,
    decoder: str = "fast",
):
    """One prompt-encoder + mask-decoder call for B prompts of the predictor's image.

    `SumPredictor.predict` with the decoder under ``autocast`` (it pins its decoder to fp32): the
    same prompt transforms (``ResizeLongestSide``), the same ``postprocess_masks`` upsampling of
    the low-res logits to the original size (spec §10.2, A11), in fp32.

    Arguments:
      predictor: a `SumPredictor` with an image or embedding set.
      point_coords: (B, N, 2) points (x, y) in original pixels, or None.
      point_labels: (B, N) labels (1, 0), or None.
      boxes: (B, 4) xyxy in original pixels, or None.
      mask_input: (B, 1, 256, 256) low-res logits of the previous round, or None.
      task_prompt: task id of the round (spec §2.2).
      multimask: 3 outputs if True, else token 0 only.
      autocast: a context manager (default: none, fp32).
      decoder: ``fast`` (`folded_decode`, when the decoder's layout is SAM's) or ``exact``.

    Returns:
      masks (B, C, H, W) bool numpy at the original size, low-res logits (B, C, 256, 256) fp32
      tensor on the model's device.
    """
    model, device = predictor.model, predictor.device
    points = box_t = None
    if point_coords is not None:
        coords = predictor.transform.apply_coords(np.asarray(point_coords, np.float64), predictor.original_size)
        points = (
            torch.as_tensor(coords, dtype=torch.float, device=device),
            torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=device),
        )
    if boxes is not None:
        b = predictor.transform.apply_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), predictor.original_size)
        box_t = torch.as_tensor(b, dtype=torch.float, device=device)
    with torch.inference_mode():
        with autocast if autocast is not None else nullcontext():
            sparse_bnc, dense_bchw = model.prompt_encoder(
                points=points, boxes=box_t, masks=mask_input, task_prompt=task_prompt
            )
            if decoder == "fast" and upscaling_is_sam(model.mask_decoder):
                low_res_bchw, _ = folded_decode(
                    model.mask_decoder, predictor.features, model.prompt_encoder.get_dense_pe(),
                    sparse_bnc, dense_bchw, multimask,
                )
            else:
                low_res_bchw, _ = model.mask_decoder(
                    image_embeddings=predictor.features,
                    image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse_bnc,
                    dense_prompt_embeddings=dense_bchw,
                    multimask_output=multimask,
                )
        low_res_bchw = low_res_bchw.float()
        masks_bchw = model.postprocess_masks(low_res_bchw, predictor.input_size, predictor.original_size)
        masks_bchw = masks_bchw > model.mask_threshold
    return masks_bchw.cpu().numpy(), low_res_bchw


@dataclass
class ProtocolResult:
    """Scores of one protocol on one image's targets.

    Attributes:
      iou: (K, R) IoU after each round.
      biou: (K, R) boundary IoU after each round.
      clicks: per target, the clicks given (box protocol: those after the box).
      clicks_at: per target, the number of clicks given up to each round (R,).
      kept: round (1-based) -> (K, H, W) bool selected masks, for the rounds asked.
      decoder_s, metrics_s: seconds in decoder calls and in scoring + click simulation.
    """

    iou: np.ndarray
    biou: np.ndarray
    clicks: List[List[Click]]
    clicks_at: np.ndarray
    kept: Dict[int, np.ndarray] = field(default_factory=dict)
    decoder_s: float = 0.0
    metrics_s: float = 0.0


def run_protocol(
    predictor,
    gt_khw: np.ndarray,
    protocol: str,
    rounds: int,
    selection: str = "oracle",
    task_prompt_ids: Optional[Sequence[int]] = None,
    keep_rounds: Collection[int] = (),
    boundary_width: int = 10,
    autocast=None,
    decoder: str = "fast",
) -> ProtocolResult:
    """Simulate one protocol of spec §10.3 on K targets of the predictor's image, batched.

    Arguments:
      predictor: a `SumPredictor` with the image's embedding set.
      gt_khw: (K, H, W) bool non-empty targets at the image's resolution.
      protocol: ``point``, ``box`` or ``boundary`` (module docstring).
      rounds: rounds to run (``boundary`` runs 1 whatever this says).
      selection: ``oracle`` or ``token0`` (module docstring).
      task_prompt_ids: task id of each round (`task_prompts`); default 0 everywhere.
      keep_rounds: 1-based rounds whose selected masks are returned (for panels).
      boundary_width: band width of the boundary click (px).
      autocast: the decoder's autocast context (`decoder_autocast`).
      decoder: ``fast`` or ``exact`` (`decode`).

    Returns:
      `ProtocolResult`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r}: expected one of {list(SELECTIONS)}")
    gt_khw = np.asarray(gt_khw, bool)
    k, h, w = gt_khw.shape
    rounds = 1 if protocol == "boundary" else int(rounds)
    tps = list(task_prompt_ids) if task_prompt_ids is not None else [0] * rounds
    if len(tps) < rounds:
        raise ValueError(f"task_prompt_ids has {len(tps)} ids for {rounds} rounds")
    res = ProtocolResult(np.zeros((k, rounds)), np.zeros((k, rounds)), [[] for _ in range(k)], np.zeros((k, rounds), np.int64))
    t0 = time.perf_counter()
    boxes_k4 = None
    if protocol == "box":
        from sum.data.formats import masks_to_boxes

        boxes_k4 = masks_to_boxes(gt_khw)  # tight, no jitter (spec §10.3)
    elif protocol == "point":
        res.clicks = [[first_click(g)] for g in gt_khw]
    else:
        res.clicks = [[boundary_click(g, width=boundary_width)] for g in gt_khw]
    res.metrics_s += time.perf_counter() - t0

    active = np.ones(k, bool)
    pred_khw = np.zeros_like(gt_khw)
    mask_input_k1hw: Optional[torch.Tensor] = None
    for r in range(rounds):
        t0 = time.perf_counter()
        if r > 0:
            for i in np.flatnonzero(active):
                c = next_click(gt_khw[i], pred_khw[i], res.clicks[i])
                if c is None:
                    active[i] = False  # nothing left to correct: last scores stand
                else:
                    res.clicks[i].append(c)
        res.clicks_at[:, r] = [len(c) for c in res.clicks]
        if r > 0:
            res.iou[:, r], res.biou[:, r] = res.iou[:, r - 1], res.biou[:, r - 1]
        idx = np.flatnonzero(active)
        res.metrics_s += time.perf_counter() - t0
        if idx.size:
            n_clicks = len(res.clicks[idx[0]])
            n_prompts = n_clicks + (boxes_k4 is not None)
            multimask = selection == "oracle" and n_prompts == 1
            coords = labels = None
            if n_clicks:
                coords = np.array([[(c.x, c.y) for c in res.clicks[i]] for i in idx], np.float32)
                labels = np.array([[c.label for c in res.clicks[i]] for i in idx], np.int64)
            t0 = time.perf_counter()
            masks_bchw, low_bchw = decode(
                predictor,
                coords,
                labels,
                None if boxes_k4 is None else boxes_k4[idx],
                None if mask_input_k1hw is None else mask_input_k1hw[torch.as_tensor(idx)],
                tps[r],
                multimask,
                autocast,
                decoder,
            )
            res.decoder_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            ious_bc = mask_iou_batch(masks_bchw, gt_khw[idx][:, None])
            best_b = ious_bc.argmax(axis=1)  # oracle: closest to the ground truth; C = 1: token 0
            rows = np.arange(idx.size)
            pred_khw[idx] = masks_bchw[rows, best_b]
            res.iou[idx, r] = ious_bc[rows, best_b]
            res.biou[idx, r] = [boundary_iou(gt_khw[i], pred_khw[i]) for i in idx]
            low_b1hw = low_bchw[torch.as_tensor(rows), torch.as_tensor(best_b)][:, None]
            if mask_input_k1hw is None:
                mask_input_k1hw = torch.zeros((k, *low_b1hw.shape[1:]), dtype=low_b1hw.dtype, device=low_b1hw.device)
            mask_input_k1hw[torch.as_tensor(idx)] = low_b1hw
            res.metrics_s += time.perf_counter() - t0
        if r + 1 in keep_rounds:
            res.kept[r + 1] = pred_khw.copy()
    return res


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class EvalModel:
    """One column of the results: a loaded model and how it is prompted.

    Attributes:
      name: ``eval.models`` key, or ``<key>@tp0`` for the task-prompt-0 variant.
      predictor: its `SumPredictor` (shared by a model and its @tp0 variant).
      source: the checkpoint ('' = ``model.checkpoint``).
      method: ``meta.method`` of a SUM checkpoint, or None (foundation model, plain SAM weights).
      use_task_prompt, continuous_task_prompt: from the method (False for no method).
      fingerprint: `encoder_fingerprint` of its encoder.
      protocols: the protocols it runs.
      force_tp0: the @tp0 variant (task prompt 0 in every round).
    """

    name: str
    predictor: object
    source: str
    method: Optional[str]
    use_task_prompt: bool
    continuous_task_prompt: bool
    fingerprint: str
    protocols: List[str]
    force_tp0: bool = False

    def task_prompts(self, benchmark_task: str, trained_tasks: Collection[str], rounds: int) -> List[int]:
        if self.force_tp0:
            return [0] * rounds
        return task_prompts(benchmark_task, trained_tasks, rounds, self.use_task_prompt, self.continuous_task_prompt)


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
                f"eval.models.{name}: checkpoint {uri} not found (train it with `sum finetune`, "
                f"point eval.models.{name} at another file, or drop the model with ~eval.models.{name})"
            )


def load_eval_model(name: str, uri: str, cfg, s3=None):
    """Load one model of ``eval.models`` on ``model.device`` with the encoder fast path of
    ``model.fast_path``; return ``(model, method_config or None)``.

    '' loads ``cfg.model`` (`load_model`, seeded as every stage so an uninitialised test model is
    the one the ``embed`` stage encoded with). Otherwise a SUM checkpoint builds the model its
    stored config describes, with the method it was trained with (`checkpoint_method`: its stored
    ``meta.method_config``, or for older checkpoints the method ``meta.method`` names); a plain
    SAM state dict is loaded into ``cfg.model``'s architecture, without a method.

    Raises:
      FileNotFoundError: naming ``eval.models.<name>`` when a local file is missing.
      ValueError: naming ``eval.models.<name>`` for an unreadable checkpoint or unknown method.
    """
    from sum.model.build import build_sum_model
    from sum.model.checkpoint import (
        CheckpointError,
        apply_state_dict,
        config_from_dict,
        load_model,
        read_checkpoint,
        resolve_device,
    )
    from sum.model.fast import enable_fast_path
    from sum.train.method import checkpoint_method

    if not uri:
        torch.manual_seed(0)
        return load_model(cfg.model, s3=s3).eval(), None
    check_checkpoints({name: uri})
    try:
        ckpt = read_checkpoint(uri, s3=s3)
        mcfg = config_from_dict(ckpt.model_config, ckpt.source) if ckpt.model_config is not None else cfg.model
        mcfg = dataclasses.replace(mcfg, checkpoint=None, checkpoint_sha256=None)
        model = apply_state_dict(build_sum_model(mcfg), ckpt.state_dict, ckpt.source)
        method = checkpoint_method(cfg, ckpt.meta)
    except CheckpointError as e:
        raise ValueError(f"eval.models.{name}: {e}") from None
    except ValueError as e:  # unknown method name
        raise ValueError(f"eval.models.{name}: {uri}: {e}") from None
    device = resolve_device(cfg.model.device)
    model = model.to(device).eval()
    enable_fast_path(model, cfg.model.fast_path, device=device)
    return model.eval(), method


def load_eval_models(cfg, s3=None) -> List[EvalModel]:
    """The models of ``eval.models`` and, for those whose method uses task prompts, their @tp0
    variants (spec §13 A3) on the protocols of ``eval.task_prompt_zero``."""
    from sum.model.predictor import SumPredictor

    ev = cfg.eval
    check_checkpoints(dict(ev.models))
    out: List[EvalModel] = []
    for name, uri in ev.models.items():
        model, method = load_eval_model(name, str(uri or ""), cfg, s3=s3)
        predictor = SumPredictor(model)
        uses_tp = bool(method is not None and method.use_task_prompt)
        em = EvalModel(
            name=name,
            predictor=predictor,
            source=str(uri or ""),
            method=None if method is None else method.name,
            use_task_prompt=uses_tp,
            continuous_task_prompt=bool(uses_tp and method.continuous_task_prompt),
            fingerprint=predictor.fingerprint(),
            protocols=list(ev.protocols),
        )
        out.append(em)
        tp0 = [p for p in ev.protocols if p in ev.task_prompt_zero]
        if uses_tp and tp0:
            out.append(dataclasses.replace(em, name=name + TP0_SUFFIX, protocols=tp0, force_tp0=True))
        log.info("model %s: %s, method %s, encoder %s...", name, uri or cfg.model.checkpoint or "(model.checkpoint)",
                 em.method, em.fingerprint[:12])
    return out


# ---------------------------------------------------------------------------------------------
# Benchmarks


@dataclass
class MaskRecord:
    """Scores of one target mask under one model and protocol (a row of the per-mask CSV)."""

    model: str
    protocol: str
    dataset: str
    image_id: str
    ann_id: str
    area: int
    task_prompt: int
    iou: List[float]
    biou: List[float]
    clicks: List[Click]
    noc: Dict[str, int] = field(default_factory=dict)
    image_area: int = 0  # H * W of its image (for the size bands of the report)


@dataclass
class PanelRow:
    """One panel image: the picture, its targets and each model's masks and clicks."""

    dataset: str
    image_id: str
    image: np.ndarray
    gt_khw: np.ndarray
    protocol: str
    masks: Dict[str, Dict[int, np.ndarray]] = field(default_factory=dict)  # model -> round -> (K, H, W)
    clicks: Dict[str, Dict[int, List[List[Click]]]] = field(default_factory=dict)  # model -> round -> per target


class EmbeddingSource:
    """An image's embedding for each distinct encoder: from the `EmbeddingCache` when it was made
    by that encoder (decoder-mode fine-tunes share the foundation's), else encoded here once."""

    def __init__(self, cache_dir: str, models: Sequence[EvalModel]):
        from sum.model.embeddings import EmbeddingCache

        self.cache = EmbeddingCache(cache_dir)
        self.groups: Dict[str, List[EvalModel]] = {}
        for m in models:
            self.groups.setdefault(m.fingerprint, []).append(m)
        self.from_cache: Dict[tuple, bool] = {}
        self.loaded = self.encoded = 0

    def cached(self, dataset: str, fingerprint: str) -> bool:
        key = (dataset, fingerprint)
        if key not in self.from_cache:
            try:
                self.from_cache[key] = self.cache.index(dataset).get("fingerprint") == fingerprint
            except FileNotFoundError:
                self.from_cache[key] = False
        return self.from_cache[key]

    def embed(self, dataset: str, sample, fingerprint: str):
        """The `ImageEmbedding` of ``sample`` for the encoder ``fingerprint``."""
        if self.cached(dataset, fingerprint):
            self.loaded += 1
            return self.cache.load(dataset, sample.image_id, fingerprint=fingerprint, original_size=sample.image.shape[:2])
        predictor = self.groups[fingerprint][0].predictor
        predictor.set_image(sample.image)
        self.encoded += 1
        return predictor.get_embedding()


def evaluate_benchmarks(
    models: Sequence[EvalModel],
    benchmarks: Dict[str, object],
    dataset_task: Dict[str, str],
    trained_tasks: Collection[str],
    ev,
    embeddings: EmbeddingSource,
    autocast=None,
    timings: Optional[Dict[str, float]] = None,
):
    """Run every model's protocols on every benchmark (module docstring).

    Arguments:
      models: `load_eval_models`' list.
      benchmarks: name -> dataset (`build_dataset`).
      dataset_task: name -> task name.
      trained_tasks: task names of the labeled datasets (A3).
      ev: the `EvalConfig`.
      embeddings: where image embeddings come from.
      autocast: the decoder's autocast context.
      timings: accumulates seconds under ``data``, ``embeddings``, ``decoder``, ``metrics``.

    Returns:
      ``(records, panels)``: a `MaskRecord` per target, model and protocol, and the `PanelRow`s of
      the first ``eval.n_panels`` evaluated images of each benchmark.
    """
    from tqdm.auto import tqdm

    timings = timings if timings is not None else {}
    for key in ("data", "embeddings", "decoder", "metrics"):
        timings.setdefault(key, 0.0)
    panel_protocol = "point" if "point" in ev.protocols else ev.protocols[0]
    panel_rounds = sorted({1, min(3, protocol_rounds(ev, panel_protocol))})
    records: List[MaskRecord] = []
    panels: List[PanelRow] = []
    for name, ds in benchmarks.items():
        n_images = len(ds) if not ev.max_images else min(ev.max_images, len(ds))
        n_panel = 0
        for i in tqdm(range(n_images), desc=f"evaluate {name}", unit="img", disable=None):
            t0 = time.perf_counter()
            sample = ds[i]
            targets = select_targets(sample.masks, ev.max_masks_per_image)
            timings["data"] += time.perf_counter() - t0
            if targets.size == 0:
                continue
            gt_khw = sample.masks[targets]
            panel = None
            if n_panel < ev.n_panels:
                panel = PanelRow(name, sample.image_id, sample.image, gt_khw, panel_protocol)
                panels.append(panel)
                n_panel += 1
            for fingerprint, group in embeddings.groups.items():
                t0 = time.perf_counter()
                emb = embeddings.embed(name, sample, fingerprint)
                timings["embeddings"] += time.perf_counter() - t0
                done: Dict[tuple, ProtocolResult] = {}  # identical prompting -> identical result
                for m in group:
                    m.predictor.set_embedding(emb)
                    for protocol in m.protocols:
                        rounds = protocol_rounds(ev, protocol)
                        tps = m.task_prompts(dataset_task[name], trained_tasks, rounds)
                        key = (id(m.predictor), protocol, tuple(tps))
                        if key not in done:
                            keep = panel_rounds if (panel is not None and protocol == panel_protocol) else ()
                            done[key] = run_protocol(
                                m.predictor, gt_khw, protocol, rounds, ev.selection, tps, keep,
                                ev.boundary_width, autocast, ev.decoder,
                            )
                            timings["decoder"] += done[key].decoder_s
                            timings["metrics"] += done[key].metrics_s
                        res = done[key]
                        if panel is not None and protocol == panel_protocol:
                            panel.masks[m.name] = res.kept
                            panel.clicks[m.name] = {
                                r: [c[: res.clicks_at[j, r - 1]] for j, c in enumerate(res.clicks)] for r in res.kept
                            }
                        for j, t in enumerate(targets):
                            rec = MaskRecord(
                                model=m.name,
                                protocol=protocol,
                                dataset=name,
                                image_id=str(sample.image_id),
                                ann_id=str(sample.ann_ids[t]) if len(sample.ann_ids) > t else str(t),
                                area=int(gt_khw[j].sum()),
                                image_area=int(gt_khw.shape[1] * gt_khw.shape[2]),
                                task_prompt=int(tps[0]),
                                iou=[float(v) for v in res.iou[j]],
                                biou=[float(v) for v in res.biou[j]],
                                clicks=list(res.clicks[j]),
                            )
                            if protocol == "point":
                                rec.noc = {k: noc(res.iou[j], thr) for k, thr in NOC_THRESHOLDS.items()}
                            records.append(rec)
    return records, panels


def summarise(records: Sequence[MaskRecord], dataset_task: Dict[str, str]) -> Dict:
    """Aggregate per-mask scores the paper's way (spec §10.2, `aggregate`), at every round.

    Returns:
      ``{model: {protocol: {"rounds": R, "n_masks": {dataset: n}, "miou": [per round
      {"datasets", "tasks", "overall"}], "mbiou": [...], "noc85": {...}, "noc90": {...}}}}``
      (NoC for the point protocol only); models and protocols in the order first seen.
    """
    groups: Dict[str, Dict[str, Dict[str, List[MaskRecord]]]] = {}
    for rec in records:
        groups.setdefault(rec.model, {}).setdefault(rec.protocol, {}).setdefault(rec.dataset, []).append(rec)
    out: Dict = {}
    for model, protocols in groups.items():
        out[model] = {}
        for protocol, by_dataset in protocols.items():
            rounds = len(next(iter(by_dataset.values()))[0].iou)
            tasks = {d: dataset_task[d] for d in by_dataset}
            entry = {
                "rounds": rounds,
                "n_masks": {d: len(rs) for d, rs in by_dataset.items()},
                "miou": [aggregate({d: [x.iou[r] for x in rs] for d, rs in by_dataset.items()}, tasks) for r in range(rounds)],
                "mbiou": [aggregate({d: [x.biou[r] for x in rs] for d, rs in by_dataset.items()}, tasks) for r in range(rounds)],
            }
            if protocol == "point":
                for key in NOC_THRESHOLDS:
                    entry[key] = aggregate({d: [x.noc[key] for x in rs] for d, rs in by_dataset.items()}, tasks)
            out[model][protocol] = entry
    return out


# ---------------------------------------------------------------------------------------------
# The stage


def run_evaluate(cfg) -> Dict:
    """The ``evaluate`` stage: every model of ``eval.models`` on the benchmarks (spec §10).

    Writes ``eval.metrics``, the curves under ``eval.plots_dir`` and, under ``eval.out_dir``,
    ``table.md``, ``panels/<benchmark>.png``, ``per_mask.csv`` and ``run.json``; logs them to
    MLflow when ``tracking.enabled``.

    Returns:
      the ``eval.metrics`` content (model -> protocol -> overall / tasks / datasets).

    Raises:
      ValueError: naming the ``eval.<key>`` of a bad setting, or ``eval.models.<name>`` of an
        unreadable checkpoint.
      FileNotFoundError: naming ``eval.models.<name>`` and the path of a missing checkpoint.
    """
    names = check_eval_config(cfg.eval, cfg.data.datasets)
    check_checkpoints(dict(cfg.eval.models))
    # eval.threads: alone on the machine all cores help (1.5x with 2 on the embedded default), but
    # on a shared 2-core machine two threads of two processes made the decoder 10x slower
    # (measured: 1.0 s against 0.085 s per mask), where one thread stays near 1x.
    threads = torch.get_num_threads()
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    try:
        return _run_evaluate(cfg, names)
    finally:
        torch.set_num_threads(threads)


def _run_evaluate(cfg, names: List[str]) -> Dict:
    from sum.data.dataset import build_dataset
    from sum.eval import report
    from sum.io import S3Options, md5_file
    from sum.model.checkpoint import resolve_device
    from sum.tracking import EVAL_MD5_TAG, NullTracker, flatten, start_run

    ev = cfg.eval
    t_start = time.perf_counter()
    autocast_ctx = decoder_autocast(ev.precision, resolve_device(cfg.model.device))
    timings: Dict[str, float] = {}

    t0 = time.perf_counter()
    models = load_eval_models(cfg, s3=S3Options.from_config(cfg.storage.s3))
    timings["load_models"] = time.perf_counter() - t0
    dataset_task = {n: cfg.data.datasets[n].task for n in names}
    trained_tasks = sorted({d.task for d in cfg.data.datasets.values() if d.role == "labeled"})
    benchmarks = {n: build_dataset(cfg.data.datasets[n], n) for n in names}
    embeddings = EmbeddingSource(cfg.embed.out_dir, models)

    tracker = NullTracker() if not cfg.tracking.enabled else start_run(
        experiment=cfg.tracking.experiment,
        run_name="evaluate",
        uri=cfg.tracking.uri,
        tags={"stage": "evaluate"},
        system_metrics=cfg.tracking.system_metrics,
    )
    status = "FAILED"
    try:
        params = {
            **flatten(cfg),
            **{f"eval.method.{m.name}": str(m.method) for m in models},
            **{f"eval.encoder.{m.name}": m.fingerprint[:16] for m in models},
        }
        tracker.log_params({report.mlflow_key(k): v for k, v in params.items()})
        records, panels = evaluate_benchmarks(
            models, benchmarks, dataset_task, trained_tasks, ev, embeddings, autocast_ctx, timings
        )
        if not records:
            raise ValueError(f"eval.datasets: no non-empty target mask in {names}")
        summary = summarise(records, dataset_task)
        t0 = time.perf_counter()
        metrics = report.metrics_json(summary, dataset_task)
        info = {
            "models": {
                m.name: {
                    "checkpoint": m.source or str(cfg.model.checkpoint or ""),
                    "method": m.method,
                    "task_prompt_round1": {n: m.task_prompts(dataset_task[n], trained_tasks, 1)[0] for n in names},
                    "encoder_fingerprint": m.fingerprint,
                    "protocols": m.protocols,
                }
                for m in models
            },
            "benchmarks": {
                n: {
                    "task": dataset_task[n],
                    "images_evaluated": len({r.image_id for r in records if r.dataset == n}),
                    "masks_evaluated": summary[models[0].name][models[0].protocols[0]]["n_masks"].get(n, 0),
                }
                for n in names
            },
            "trained_tasks": trained_tasks,
            "embeddings": {"from_cache": embeddings.loaded, "encoded": embeddings.encoded},
            "eval": flatten(ev),
        }
        paths = report.write_outputs(cfg, summary, metrics, records, panels, dataset_task, info)
        timings["outputs"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        info["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        report.write_run_json(paths["run"], info)
        log.info("evaluate: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        log.info("evaluate: table %s, curves %s/, panels %s/, metrics %s",
                 paths["table"], ev.plots_dir, Path(ev.out_dir) / "panels", ev.metrics)

        tracker.set_tags({EVAL_MD5_TAG: md5_file(paths["metrics"])})  # how `sum register` finds this run
        tracker.log_metrics(report.mlflow_metrics(metrics), step=0)
        for step, values in report.mlflow_curves(summary).items():
            tracker.log_metrics(values, step=step)
        tracker.log_metrics({f"timing/{k}_s": v for k, v in timings.items()}, step=0)
        for key, path in paths.items():
            if key == "panels":
                for p in path:
                    tracker.log_artifact(p, artifact_path="eval/panels")
            else:
                tracker.log_artifact(path, artifact_path="eval")
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return metrics
