"""The evaluation loop of the ``evaluate`` stage (spec §10): every model's protocols on every
benchmark image (`evaluate_benchmarks`), with each image's embedding read from the cache or encoded
once per encoder (`EncoderEmbeddings`), and the per-mask scores aggregated the paper's way
(`summarise`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Sequence

import numpy as np

from sum.eval.clicker import Click
from sum.eval.columns import NOC_THRESHOLDS, NOF_THRESHOLDS, PART_SPLIT, noc_budget
from sum.eval.metrics import aggregate, aggregate_counts, noc, nof
from sum.eval.protocol import low_res_cell_px, protocol_rounds, select_targets, simulated_rounds, target_scale
from sum.eval.scoring import EvalModel, MaskRecord, ProtocolResult, run_protocol
from sum.model import embeddings as model_embeddings
from sum.progress import progress_bar


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


class EncoderEmbeddings:
    """An image's embedding for each distinct encoder: one `sum.model.embeddings.EmbeddingSource`
    per encoder fingerprint, reading the cache where that encoder made it (decoder-mode fine-tunes
    share the foundation's) and encoding here otherwise, once per image and encoder.

    Arguments:
      cache_dir: the ``embed`` stage's folder.
      models: the `EvalModel`s; the first of each encoder group encodes for the group.
    """

    def __init__(self, cache_dir: str, models: Sequence[EvalModel]):
        self.groups: Dict[str, List[EvalModel]] = {}
        for m in models:
            self.groups.setdefault(m.fingerprint, []).append(m)
        self.sources = {
            fp: model_embeddings.EmbeddingSource(cache_dir, group[0].predictor, fingerprint=fp, same_encoder_only=True)
            for fp, group in self.groups.items()
        }

    @property
    def loaded(self) -> int:
        return sum(s.loaded for s in self.sources.values())

    @property
    def encoded(self) -> int:
        return sum(s.encoded for s in self.sources.values())

    def embed(self, dataset: str, sample, fingerprint: str):
        """The `ImageEmbedding` of ``sample`` for the encoder ``fingerprint``."""
        return self.sources[fingerprint].load(dataset, sample.image_id, image=sample.image, original_size=sample.image.shape[:2])


def evaluate_benchmarks(
    models: Sequence[EvalModel],
    benchmarks: Dict[str, object],
    dataset_task: Dict[str, str],
    trained_tasks: Collection[str],
    ev,
    embeddings: EncoderEmbeddings,
    autocast=None,
    timings: Optional[Dict[str, float]] = None,
    work: Optional[Dict[str, int]] = None,
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
      work: accumulates ``decoded_target_rounds``, the target-rounds through the decoder (what
        the time scales with, whatever the machine's load).

    Returns:
      ``(records, panels)``: a `MaskRecord` per target, model and protocol, and the `PanelRow`s of
      the first ``eval.n_panels`` evaluated images of each benchmark.
    """
    timings = timings if timings is not None else {}
    for key in ("data", "embeddings", "decoder", "metrics"):
        timings.setdefault(key, 0.0)
    work = work if work is not None else {}
    work.setdefault("decoded_target_rounds", 0)
    panel_protocol = "point" if "point" in ev.protocols else ev.protocols[0]
    run = _Run(ev, dataset_task, trained_tasks, autocast, timings, work, panel_protocol,
               sorted({1, min(3, protocol_rounds(ev, panel_protocol))}))
    model0 = models[0].predictor.model
    img_size, cell_px = model0.image_encoder.img_size, low_res_cell_px(model0)
    records: List[MaskRecord] = []
    panels: List[PanelRow] = []
    for name, ds in benchmarks.items():
        n_images = len(ds) if not ev.max_images else min(ev.max_images, len(ds))
        n_panel = 0
        for i in progress_bar(n_images, f"evaluate {name}", unit="img", iterable=range(n_images)):
            t0 = time.perf_counter()
            sample = ds[i]
            targets = select_targets(sample.masks, ev.max_masks_per_image, str(sample.image_id), ev.target_seed)
            if targets.size == 0:
                timings["data"] += time.perf_counter() - t0
                continue
            scales = [target_scale(g, img_size, cell_px) for g in sample.masks[targets]]
            timings["data"] += time.perf_counter() - t0
            panel = None
            if n_panel < ev.n_panels:
                panel = PanelRow(name, sample.image_id, sample.image, sample.masks[targets], panel_protocol)
                panels.append(panel)
                n_panel += 1
            for fingerprint, group in embeddings.groups.items():
                t0 = time.perf_counter()
                emb = embeddings.embed(name, sample, fingerprint)
                timings["embeddings"] += time.perf_counter() - t0
                records += run.score(group, emb, name, sample, targets, scales, panel)
    return records, panels


@dataclass
class _Run:
    """What `evaluate_benchmarks` scores every image with."""

    ev: object
    dataset_task: Dict[str, str]
    trained_tasks: Collection[str]
    autocast: object
    timings: Dict[str, float]
    work: Dict[str, int]
    panel_protocol: str
    panel_rounds: List[int]

    def score(self, group, emb, name: str, sample, targets: np.ndarray, scales, panel) -> List[MaskRecord]:
        """Every protocol of every model of one encoder group on one image's ``targets``; the
        panel's masks and clicks filled in when ``panel`` is not None."""
        ev, records = self.ev, []
        gt_khw = sample.masks[targets]
        done: Dict[tuple, ProtocolResult] = {}  # identical prompting -> identical result
        for m in group:
            m.predictor.set_embedding(emb)
            selection = m.selection or ev.selection
            for protocol in m.protocols:
                rounds, run_rounds = protocol_rounds(ev, protocol), simulated_rounds(ev, protocol)
                tps = m.task_prompts(self.dataset_task[name], self.trained_tasks, run_rounds)
                key = (id(m.predictor), protocol, tuple(tps), selection)
                shown = panel is not None and protocol == self.panel_protocol
                if key not in done:
                    done[key] = run_protocol(
                        m.predictor, gt_khw, protocol, run_rounds, selection, tps, self.panel_rounds if shown else (),
                        ev.boundary_width, self.autocast, ev.decoder,
                        stop_iou=max(NOC_THRESHOLDS.values()), stop_after=rounds,
                    )
                    self.timings["decoder"] += done[key].decoder_s
                    self.timings["metrics"] += done[key].metrics_s
                    self.work["decoded_target_rounds"] += done[key].decoded
                res = done[key]
                if shown:
                    panel.masks[m.name] = res.kept
                    panel.clicks[m.name] = {
                        r: [c[: res.clicks_at[j, r - 1]] for j, c in enumerate(res.clicks)] for r in res.kept
                    }
                records += _mask_records(
                    m.name, protocol, name, sample, targets, gt_khw, scales, tps, rounds, noc_budget(ev), res
                )
        return records


def _mask_records(
    model: str,
    protocol: str,
    dataset: str,
    sample,
    targets: np.ndarray,
    gt_khw: np.ndarray,
    scales: Sequence[tuple],
    tps: Sequence[int],
    rounds: int,
    budget: int,
    res: ProtocolResult,
) -> List[MaskRecord]:
    """A `MaskRecord` per target of one image under one model and protocol: IoU, boundary IoU and
    clicks of the ``rounds`` reported; for ``point`` NoC and NoF over the ``budget`` clicks."""
    records = []
    for j, t in enumerate(targets):
        rec = MaskRecord(
            model=model,
            protocol=protocol,
            dataset=dataset,
            image_id=str(sample.image_id),
            ann_id=str(sample.ann_ids[t]) if len(sample.ann_ids) > t else str(t),
            area=int(gt_khw[j].sum()),
            image_area=int(gt_khw.shape[1] * gt_khw.shape[2]),
            task_prompt=int(tps[0]),
            iou=[float(v) for v in res.iou[j, :rounds]],
            biou=[float(v) for v in res.biou[j, :rounds]],
            clicks=list(res.clicks[j][: res.clicks_at[j, rounds - 1]]),
            width_px=float(scales[j][0]),
            resolvable=bool(scales[j][1]),
        )
        if protocol == "point":
            rec.noc = {k: noc(res.iou[j], thr, budget) for k, thr in NOC_THRESHOLDS.items()}
            rec.nof = {k: nof(res.iou[j], thr, budget) for k, thr in NOF_THRESHOLDS.items()}
        records.append(rec)
    return records


def summarise(records: Sequence[MaskRecord], dataset_task: Dict[str, str], examples: Collection[str] = ()) -> Dict:
    """Aggregate per-mask scores the paper's way (spec §10.2, `aggregate`), at every reported round.

    Benchmarks in ``examples`` keep their own means but enter no task and no overall mean (nor a
    count). When a part benchmark is among the others, ``part_resolution`` splits the part task by
    the scale rule (`sum.eval.protocol.target_scale`) into ``resolvable`` and ``sub_resolution``,
    each aggregated like a task (per benchmark the mean over its targets of that kind, then the
    mean over the part benchmarks that have any); the ``part`` task itself is the mean over all its
    targets, as without the split.

    Returns:
      ``{model: {protocol: {"rounds": R, "n_masks": {dataset: n}, "miou": [per round
      {"datasets", "tasks", "overall"}], "mbiou": [...], "noc85" / "noc90" / "noc95": {...},
      "nof95": {"datasets", "tasks", "overall"} (sums), "part_resolution": {kind: {"n_masks": n,
      "miou": [per round], "mbiou": [...], "noc85": ..., "nof95": ...}}}}}`` (NoC and NoF for the
      point protocol only; a kind without targets has ``n_masks`` 0 and None values); models and
      protocols in the order first seen.
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
                "miou": [_aggregate(by_dataset, lambda x, r=r: x.iou[r], tasks, examples) for r in range(rounds)],
                "mbiou": [_aggregate(by_dataset, lambda x, r=r: x.biou[r], tasks, examples) for r in range(rounds)],
            }
            if protocol == "point":
                for key in NOC_THRESHOLDS:
                    entry[key] = _aggregate(by_dataset, lambda x, key=key: x.noc[key], tasks, examples)
                for key in NOF_THRESHOLDS:
                    entry[key] = aggregate_counts(
                        {d: [x.nof[key] for x in rs] for d, rs in by_dataset.items()}, tasks, examples
                    )
            parts = [d for d in by_dataset if tasks[d] == "part" and d not in set(examples)]
            if parts:
                entry["part_resolution"] = {
                    kind: _part_kind(protocol, rounds, {d: [x for x in by_dataset[d] if x.resolvable == flag] for d in parts})
                    for kind, (_, flag) in PART_SPLIT.items()
                }
            out[model][protocol] = entry
    return out


def _aggregate(by_dataset: Dict[str, List[MaskRecord]], value, tasks: Dict[str, str], examples: Collection[str]) -> Dict:
    return aggregate({d: [value(x) for x in rs] for d, rs in by_dataset.items()}, tasks, examples)


def _part_kind(protocol: str, rounds: int, by_dataset: Dict[str, List[MaskRecord]]) -> Dict:
    """One row of ``part_resolution``: the part benchmarks' targets of one kind, aggregated as a
    task (mean over the benchmarks that have any); None values when there are none."""
    present = {d: rs for d, rs in by_dataset.items() if rs}
    only = {d: "part" for d in present}

    def mean(value):
        return _aggregate(present, value, only, ())["overall"] if present else None

    row: Dict = {
        "n_masks": sum(len(rs) for rs in present.values()),
        "miou": [mean(lambda x, r=r: x.iou[r]) for r in range(rounds)],
        "mbiou": [mean(lambda x, r=r: x.biou[r]) for r in range(rounds)],
    }
    if protocol == "point":
        for key in NOC_THRESHOLDS:
            row[key] = mean(lambda x, key=key: x.noc[key])
        for key in NOF_THRESHOLDS:
            row[key] = sum(x.nof[key] for rs in present.values() for x in rs)
    return row
