"""Scoring one image in the ``evaluate`` stage (spec §10): the models under evaluation
(`load_eval_models`, with their method and their @tp0 and @piou variants), one decoder call on a
batch of prompts (`predict_round`), one protocol simulated on an image's targets (`run_protocol`)
and the record of one target's scores (`MaskRecord`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Sequence

import numpy as np
import torch

from sum.eval.clicker import Click, first_prompts, next_click
from sum.eval.columns import PIOU_SUFFIX, TP0_SUFFIX
from sum.eval.device_masks import DeviceMasks
from sum.eval.metrics import boundary_iou, mask_iou_batch
from sum.eval.protocol import PROTOCOLS, SELECTIONS, check_checkpoints, task_prompts
from sum.redact import redact_text
from sum.model.checkpoint import CheckpointError, load_model, read_checkpoint
from sum.model.decoder import decode
from sum.model.predictor import SumPredictor
from sum.train.method import checkpoint_method

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class EvalModel:
    """One column of the results: a loaded model and how it is prompted.

    Attributes:
      name: ``eval.models`` key, ``<key>@tp0`` for the task-prompt-0 variant, ``<key>@piou`` for
        the predicted-IoU variant.
      predictor: its `SumPredictor` (shared by a model and its variants).
      source: the checkpoint ('' = ``model.checkpoint``).
      method: ``meta.method`` of a SUM checkpoint, or None (foundation model, plain SAM weights).
      use_task_prompt, continuous_task_prompt: from the method (False for no method).
      fingerprint: `encoder_fingerprint` of its encoder.
      protocols: the protocols it runs.
      force_tp0: the @tp0 variant (task prompt 0 in every round).
      selection: its output selection; '' = ``eval.selection`` (the @piou variant: ``predicted_iou``).
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
    selection: str = ""

    def task_prompts(self, benchmark_task: str, trained_tasks: Collection[str], rounds: int) -> List[int]:
        if self.force_tp0:
            return [0] * rounds
        return task_prompts(benchmark_task, trained_tasks, rounds, self.use_task_prompt, self.continuous_task_prompt)


def load_eval_models(cfg, s3=None) -> List[EvalModel]:
    """The models of ``eval.models`` on ``model.device`` with the encoder fast path of
    ``model.fast_path`` (`load_model`); for those whose method uses task prompts, their @tp0
    variants (spec §13 A3) on the protocols of ``eval.task_prompt_zero``; and for every model its
    @piou variant, the same model with ``predicted_iou`` selection (what an interactive tool
    shows), on the protocols of ``eval.predicted_iou`` (none when ``eval.selection`` is already
    ``predicted_iou``). Order: each model, then its @tp0, then its @piou.

    '' is ``cfg.model``, seeded as every stage so that an uninitialised test model is the one the
    ``embed`` stage encoded with. Otherwise a SUM checkpoint gives the model its stored config
    describes, with the method it was trained with (`checkpoint_method`: its stored
    ``meta.method_config``, or for older checkpoints the method ``meta.method`` names); a plain
    SAM state dict is loaded into ``cfg.model``'s architecture, without a method.

    Raises:
      FileNotFoundError: naming ``eval.models.<name>`` when a local file is missing.
      ValueError: naming ``eval.models.<name>`` for an unreadable checkpoint or unknown method.
    """
    ev = cfg.eval
    check_checkpoints(dict(ev.models))
    out: List[EvalModel] = []
    for name, uri in ev.models.items():
        uri = str(uri or "")
        if not uri:
            torch.manual_seed(0)
            model, method = load_model(cfg.model, s3=s3), None
        else:
            try:
                ckpt = read_checkpoint(uri, s3=s3)
                model = load_model(cfg.model, ckpt, s3=s3)
            except CheckpointError as e:
                raise ValueError(f"eval.models.{name}: {e}") from None
            try:
                method = checkpoint_method(cfg, ckpt.meta)
            except ValueError as e:  # unknown method name
                raise ValueError(f"eval.models.{name}: {uri}: {e}") from None
        predictor = SumPredictor(model)
        uses_tp = bool(method is not None and method.use_task_prompt)
        em = EvalModel(
            name=name,
            predictor=predictor,
            source=uri,
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
        piou = [p for p in ev.protocols if p in ev.predicted_iou] if ev.selection != "predicted_iou" else []
        if piou:
            out.append(dataclasses.replace(em, name=name + PIOU_SUFFIX, protocols=piou, selection="predicted_iou"))
        log.info("model %s: %s, method %s, encoder %s...", name, redact_text(uri or cfg.model.checkpoint or "(model.checkpoint)"),
                 em.method, em.fingerprint[:12])
    return out


# ---------------------------------------------------------------------------------------------
# One round, one protocol


def predict_round(
    predictor,
    point_coords: Optional[np.ndarray],
    point_labels: Optional[np.ndarray],
    boxes: Optional[np.ndarray],
    mask_input: Optional[torch.Tensor],
    task_prompt: int,
    multimask: bool,
    autocast=None,
    decoder: str = "fast",
    to_host: bool = True,
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
      decoder: ``fast`` (`sum.model.decoder.decode` folded) or ``exact`` (SAM's ``MaskDecoder``).
      to_host: masks and predicted IoU as numpy (default), or as tensors left on the device.

    Returns:
      masks (B, C, H, W) bool numpy at the original size, low-res logits (B, C, 256, 256) fp32
      tensor on the model's device, predicted IoU (B, C) float32 numpy.
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
            pe = model.prompt_encoder.get_dense_pe()
            low_res_bchw, iou_bc = decode(
                model.mask_decoder, predictor.features, pe, sparse_bnc, dense_bchw, multimask, exact=decoder == "exact"
            )
        low_res_bchw = low_res_bchw.float()
        masks_bchw = model.postprocess_masks(low_res_bchw, predictor.input_size, predictor.original_size)
        masks_bchw = masks_bchw > model.mask_threshold
    if not to_host:
        return masks_bchw, low_res_bchw, iou_bc.float()
    return masks_bchw.cpu().numpy(), low_res_bchw, iou_bc.float().cpu().numpy()


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
      decoded: target-rounds through the decoder (the work, whatever the machine's load).
    """

    iou: np.ndarray
    biou: np.ndarray
    clicks: List[List[Click]]
    clicks_at: np.ndarray
    kept: Dict[int, np.ndarray] = field(default_factory=dict)
    decoder_s: float = 0.0
    metrics_s: float = 0.0
    decoded: int = 0


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
    stop_iou: Optional[float] = None,
    stop_after: int = 0,
    on_device: Optional[bool] = None,
) -> ProtocolResult:
    """Simulate one protocol of spec §10.3 on K targets of the predictor's image, batched.

    Arguments:
      predictor: a `SumPredictor` with the image's embedding set.
      gt_khw: (K, H, W) bool non-empty targets at the image's resolution.
      protocol: ``point``, ``box`` or ``boundary`` (module docstring).
      rounds: rounds to run (``boundary`` runs 1 whatever this says).
      selection: ``oracle``, ``token0`` or ``predicted_iou`` (`sum.eval.evaluate`'s docstring).
      task_prompt_ids: task id of each round (`task_prompts`); default 0 everywhere.
      keep_rounds: 1-based rounds whose selected masks are returned (for panels).
      boundary_width: band width of the boundary click (px).
      autocast: the decoder's autocast context (`decoder_autocast`).
      decoder: ``fast`` or ``exact`` (`predict_round`).
      stop_iou, stop_after: the NoC rounds past the ``stop_after`` reported ones (`_next_clicks`);
        there boundary IoU is not computed (NaN). ``stop_after`` 0: every round is reported.
      on_device: masks, scores and clicks stay on the model's device (`sum.eval.device_masks.DeviceMasks`): no mask is
        copied to the host, one small copy of the round's scores and clicks a round. Default: on
        any device but the CPU, where the host path (cv2) is faster and the clicks are the same
        (`sum.eval.clicker`).

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
    boxes_k4, res.clicks = first_prompts(gt_khw, protocol, boundary_width)
    res.metrics_s += time.perf_counter() - t0

    active = np.ones(k, bool)
    on_device = predictor.device.type != "cpu" if on_device is None else on_device
    pred_khw = DeviceMasks(gt_khw, res.clicks, predictor.device) if on_device else np.zeros_like(gt_khw)
    mask_input_k1hw: Optional[torch.Tensor] = None
    for r in range(rounds):
        t0 = time.perf_counter()
        if r > 0:
            _next_clicks(gt_khw, pred_khw, res, active, r, stop_iou if r >= stop_after else None)
            res.iou[:, r], res.biou[:, r] = res.iou[:, r - 1], res.biou[:, r - 1]
        res.clicks_at[:, r] = [len(c) for c in res.clicks]
        idx = np.flatnonzero(active)
        res.metrics_s += time.perf_counter() - t0
        if idx.size:
            mask_input_k1hw = _decode_round(
                predictor, res, r, idx, gt_khw, pred_khw, boxes_k4, mask_input_k1hw, tps[r], selection, autocast,
                decoder, boundary=stop_after <= 0 or r < stop_after,
            )
        if r + 1 in keep_rounds:
            res.kept[r + 1] = pred_khw.pred.cpu().numpy().copy() if on_device else pred_khw.copy()
    if stop_after > 0:
        res.biou[:, stop_after:] = np.nan
    return res


def _next_clicks(gt_khw, pred_khw, res: ProtocolResult, active: np.ndarray, r: int, stop_iou: Optional[float]) -> None:
    """Round ``r``'s corrective click of every active target, in place. A target with no error
    left, or (``stop_iou``) whose IoU has reached ``stop_iou``, gets none and turns inactive: its
    last scores stand (once IoU 0.95 is reached, NoC@85/90/95 and NoF@95 are known)."""
    if stop_iou is not None:
        active &= res.iou[:, r - 1] < stop_iou
    if isinstance(pred_khw, DeviceMasks):
        pred_khw.next_clicks(res.clicks, active)
        return
    for i in np.flatnonzero(active):
        c = next_click(gt_khw[i], pred_khw[i], res.clicks[i])
        if c is None:
            active[i] = False
        else:
            res.clicks[i].append(c)


def _decode_round(
    predictor,
    res: ProtocolResult,
    r: int,
    idx: np.ndarray,
    gt_khw: np.ndarray,
    pred_khw: np.ndarray,
    boxes_k4: Optional[np.ndarray],
    mask_input_k1hw: Optional[torch.Tensor],
    task_prompt: int,
    selection: str,
    autocast,
    decoder: str,
    boundary: bool = True,
) -> torch.Tensor:
    """Round ``r`` of `run_protocol` for the active targets ``idx``: one `predict_round` call with their
    accumulated prompts, the output selected by ``selection``, scored into ``res`` (boundary IoU
    only when ``boundary``) and written to ``pred_khw``; returns the (K, 1, 256, 256) mask inputs
    of the next round."""
    k = gt_khw.shape[0]
    n_clicks = len(res.clicks[idx[0]])
    n_prompts = n_clicks + (boxes_k4 is not None)
    multimask = selection != "token0" and n_prompts == 1
    coords = labels = None
    if n_clicks:
        coords = np.array([[(c.x, c.y) for c in res.clicks[i]] for i in idx], np.float32)
        labels = np.array([[c.label for c in res.clicks[i]] for i in idx], np.int64)
    t0 = time.perf_counter()
    masks_bchw, low_bchw, piou_bc = predict_round(
        predictor,
        coords,
        labels,
        None if boxes_k4 is None else boxes_k4[idx],
        None if mask_input_k1hw is None else mask_input_k1hw[torch.as_tensor(idx)],
        task_prompt,
        multimask,
        autocast,
        decoder,
        to_host=not isinstance(pred_khw, DeviceMasks),
    )
    res.decoder_s += time.perf_counter() - t0
    res.decoded += int(idx.size)
    t0 = time.perf_counter()
    if isinstance(pred_khw, DeviceMasks):
        best_b = pred_khw.score(res, r, idx, masks_bchw, piou_bc, selection, boundary)
    else:
        best_b = _score_on_host(res, r, idx, gt_khw, pred_khw, masks_bchw, piou_bc, selection, boundary)
    rows = np.arange(idx.size)
    low_b1hw = low_bchw[torch.as_tensor(rows), torch.as_tensor(best_b, device=low_bchw.device)][:, None]
    if mask_input_k1hw is None:
        mask_input_k1hw = torch.zeros((k, *low_b1hw.shape[1:]), dtype=low_b1hw.dtype, device=low_b1hw.device)
    mask_input_k1hw[torch.as_tensor(idx)] = low_b1hw
    res.metrics_s += time.perf_counter() - t0
    return mask_input_k1hw


def _score_on_host(res, r, idx, gt_khw, pred_khw, masks_bchw, piou_bc, selection, boundary) -> np.ndarray:
    """Host path of `_decode_round`'s scoring: the selected outputs into ``pred_khw`` and their
    IoU (and boundary IoU) into ``res``; returns the selected output of each prompt."""
    ious_bc = mask_iou_batch(masks_bchw, gt_khw[idx][:, None])
    # oracle: closest to the ground truth; predicted_iou: highest predicted IoU; C = 1: token 0
    best_b = (piou_bc if selection == "predicted_iou" else ious_bc).argmax(axis=1)
    rows = np.arange(idx.size)
    pred_khw[idx] = masks_bchw[rows, best_b]
    res.iou[idx, r] = ious_bc[rows, best_b]
    if boundary:
        res.biou[idx, r] = [boundary_iou(gt_khw[i], pred_khw[i]) for i in idx]
    return best_b


@dataclass
class MaskRecord:
    """Scores of one target mask under one model and protocol (a row of the per-mask CSV).

    ``iou`` and ``biou`` hold the reported rounds; ``noc`` and ``nof`` (point protocol) come from
    every simulated click (`sum.eval.protocol.noc_budget`); ``width_px`` and ``resolvable`` are the
    target's scale rule (`sum.eval.protocol.target_scale`), from its ground truth alone.
    """

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
    nof: Dict[str, int] = field(default_factory=dict)  # 1 when the threshold is never reached within the budget
    width_px: float = 0.0
    resolvable: bool = True
