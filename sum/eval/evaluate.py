"""The ``evaluate`` stage: interactive segmentation benchmarks of several models (spec §10).

`run_evaluate` is the one library call the CLI, DVC and Prefect reach. For every benchmark image
and every model of ``eval.models`` it simulates the protocols of spec §10.3 on the image's target
masks and scores every round with IoU and boundary IoU at the original resolution (spec §10.2):

- ``point``: a positive click at the ground truth's interior-most point (`first_click`), then one
  corrective click per round at the interior-most point of the larger error (`next_click`, pixels
  already clicked excluded); mIoU after ``eval.rounds`` clicks (reported after 1, 3, 5 and the
  last), and NoC@85 / 90 / 95 and NoF@95 over ``eval.noc_max_clicks`` clicks (RITM's 20,
  `sum.eval.metrics.noc` / `nof`); beyond ``eval.rounds`` a target that has reached IoU 0.95 gets
  no further click, which leaves every NoC and NoF as they would be;
- ``box``: the tight ground-truth box, no jitter, then corrective clicks with the box kept,
  ``eval.box_rounds`` rounds in all;
- ``boundary``: one click at the 'median' boundary point (`boundary_click`, Tab. 5), one round.

Every round's prompts are the accumulated prompts of the mask, the mask input is the previous
round's low-res logits of the selected output (spec §10.3 [REC]), and the output is selected as
``eval.selection`` says: ``oracle`` takes, when a round has a single prompt (first click, box
alone, boundary click), the output of three closest to the ground truth (highest IoU) and the one
output of multi-prompt rounds; ``predicted_iou`` takes there the output of highest predicted IoU
(``SamPredictor``'s ``scores``: what an interactive tool shows, no ground truth used) and the one
output of multi-prompt rounds; ``token0`` asks for one output (``multimask_output=False``)
everywhere. ``<name>@piou`` is each model with ``predicted_iou`` selection, on the protocols of
``eval.predicted_iou``, reported beside the oracle columns. A mask whose prediction has no error
left gets no further click: its last scores stand for the remaining rounds.

Task prompt at test time (spec §13 A3, `task_prompts`): a model whose method trains task prompts
(``meta.method`` of its checkpoint, `resolve_method`) gets, in round 1 only, the id of the
benchmark's task when that task is among the labeled datasets' tasks, else 0; ``<name>@tp0`` is
the same model with id 0 everywhere (on the protocols of ``eval.task_prompt_zero``).

Targets (spec §13 A8): the non-empty masks of an image; with ``eval.max_masks_per_image`` = n,
n of them drawn uniformly without replacement, seeded by ``eval.target_seed`` and the image id
(`select_targets`): fixed by the image, the same for every model, no size forced in. Each target
carries the model's scale rule (`target_scale`): sub-resolution when narrower than one low-res
cell at the model's input scale (4 px at 1024) or under 0.1% of the image, from its ground truth
alone; the part task is also reported split by it. Benchmarks whose dataset holds fewer than
``eval.min_images`` images are examples (`example_benchmarks`): scored and listed apart, outside
every task and overall mean and every comparison.

Speed: an image's embedding is read from the `EmbeddingCache` when the cache was made by the
model's encoder (`encoder_fingerprint`; decoder-mode fine-tunes share the foundation encoder),
else encoded once per distinct encoder and shared by the models that have it. All targets of an
image go through the decoder in one call per round and model. The decoder runs under
``eval.precision`` autocast (`decoder_autocast`); upsampling and every metric are fp32. With
``eval.decoder: fast`` (default) it is computed by `sum.model.decoder.decode` folded, the
same function as SAM's ``MaskDecoder``, faster (every target carries its own mask input from
round 2 on); ``exact`` calls SAM's decoder (bit-identical to `SumPredictor.predict`; the fast
one agrees to float rounding, so a pixel whose logit is within rounding of 0 may flip).

Outputs (`sum.eval.report`): ``eval.metrics`` (DVC metrics JSON), per-round curves under
``eval.plots_dir``, and under ``eval.out_dir`` the markdown table, PNG panels, a per-mask CSV and
``run.json`` (models, benchmarks, timings); all logged to MLflow when tracking is on.

The pieces: `sum.eval.protocol` (settings, task prompts, targets), `sum.eval.scoring` (the models,
one decoder call, one protocol on an image), `sum.eval.loop` (every image of every benchmark,
aggregation); this module runs the stage and writes and logs its outputs.
"""


from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

from sum.data.skipped import left_out, open_dataset
from sum.eval import report
from sum.eval.loop import EncoderEmbeddings, evaluate_benchmarks, summarise
from sum.eval.protocol import check_checkpoints, check_eval_config, decoder_autocast, example_benchmarks
from sum.eval.scoring import load_eval_models
from sum.io import S3Options, md5_file, remove_temporaries
from sum.redact import redact
from sum.model.checkpoint import resolve_device
from sum.tracking import EVAL_MD5_TAG, NullTracker, flatten, start_run

log = logging.getLogger(__name__)


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
    ev = cfg.eval
    t_start = time.perf_counter()
    for path in (ev.metrics, ev.plots_dir, ev.out_dir):
        remove_temporaries(path)  # of a killed run, so that the outputs are this run's alone
    autocast_ctx = decoder_autocast(ev.precision, resolve_device(cfg.model.device))
    timings: Dict[str, float] = {}
    work: Dict[str, int] = {}

    t0 = time.perf_counter()
    models = load_eval_models(cfg, s3=S3Options.from_config(cfg.storage.s3))
    timings["load_models"] = time.perf_counter() - t0
    dataset_task = {n: cfg.data.datasets[n].task for n in names}
    trained_tasks = sorted({d.task for d in cfg.data.datasets.values() if d.role == "labeled"})
    benchmarks = {n: CountedBenchmark(open_dataset(cfg.data, n)) for n in names}
    examples = example_benchmarks({n: len(ds) for n, ds in benchmarks.items()}, ev.min_images)
    embeddings = EncoderEmbeddings(cfg.embed.out_dir, models)

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
            models, benchmarks, dataset_task, trained_tasks, ev, embeddings, autocast_ctx, timings, work
        )
        if not records:
            raise ValueError(f"eval.datasets: no non-empty target mask in {names}")
        summary = summarise(records, dataset_task, examples)
        t0 = time.perf_counter()
        metrics = report.metrics_json(summary, dataset_task, examples)
        info = _run_info(cfg, models, benchmarks, dataset_task, trained_tasks, records, summary, embeddings, examples)
        _report_left_out(info, benchmarks)
        paths = report.write_outputs(cfg, summary, metrics, records, panels, dataset_task, info, examples)
        timings["outputs"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        info["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        info["work"] = dict(work)
        report.write_run_json(paths["run"], redact(info))  # no checkpoint URI's signature in a file
        log.info("evaluate: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        log.info("evaluate: table %s, curves %s/, panels %s/, metrics %s",
                 paths["table"], ev.plots_dir, Path(ev.out_dir) / "panels", ev.metrics)

        _log_outputs(tracker, paths, metrics, summary, timings)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return metrics


class CountedBenchmark:
    """A benchmark as the evaluation loop reads it (``len``, indexing), counting the target masks
    it reads empty: targets are the non-empty masks (spec §13 A8, `select_targets`), and what is
    left out is reported in ``run.json``, never dropped silently.

    Arguments:
      dataset: the `SegDataset` (`open_dataset`).
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.empty_masks = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        self.empty_masks += int((~sample.masks.any(axis=(1, 2))).sum())  # (K, H, W) -> (K,)
        return sample


def _report_left_out(info: Dict, benchmarks: Dict[str, CountedBenchmark]) -> None:
    """Per benchmark in ``info["benchmarks"]``: what reading it left out (`left_out`: the images
    and, by reason, the problems of the skip list, or the annotations of no image) and the empty
    target masks read (``empty_masks_skipped``); a warning line for each that left anything out."""
    for name, bench in benchmarks.items():
        entry = info["benchmarks"][name]
        entry["left_out"] = left_out(bench.dataset)
        entry["empty_masks_skipped"] = bench.empty_masks
        if entry["left_out"]["problems"] or bench.empty_masks:
            log.warning("evaluate %s (%s): left out %d images and %s; %d empty target masks skipped", name,
                        bench.dataset.source, entry["left_out"]["images"], entry["left_out"]["problems"], bench.empty_masks)


def _run_info(cfg, models, benchmarks, dataset_task, trained_tasks, records, summary, embeddings, examples) -> Dict:
    """``run.json``'s content but the timings: models, benchmarks, trained tasks, embeddings, ``eval``."""
    names = list(benchmarks)
    first = [r for r in records if (r.model, r.protocol) == (models[0].name, models[0].protocols[0])]
    return {
        "models": {
            m.name: {
                "checkpoint": m.source or str(cfg.model.checkpoint or ""),
                "method": m.method,
                "task_prompt_round1": {n: m.task_prompts(dataset_task[n], trained_tasks, 1)[0] for n in names},
                "encoder_fingerprint": m.fingerprint,
                "protocols": m.protocols,
                "selection": m.selection or cfg.eval.selection,
            }
            for m in models
        },
        "benchmarks": {
            n: {
                "task": dataset_task[n],
                "images": len(benchmarks[n]),
                "example": n in examples,
                "images_evaluated": len({r.image_id for r in records if r.dataset == n}),
                "masks_evaluated": summary[models[0].name][models[0].protocols[0]]["n_masks"].get(n, 0),
                "sub_resolution_masks": sum(1 for r in first if r.dataset == n and not r.resolvable),
            }
            for n in names
        },
        "trained_tasks": trained_tasks,
        "embeddings": {"from_cache": embeddings.loaded, "encoded": embeddings.encoded},
        "eval": flatten(cfg.eval),
    }


def _log_outputs(tracker, paths: Dict, metrics: Dict, summary: Dict, timings: Dict[str, float]) -> None:
    """Tag the run with the metrics file's md5 and log metrics, curves, timings and output files."""
    tracker.set_tags({EVAL_MD5_TAG: md5_file(paths["metrics"])})  # how `sumseg register` finds this run
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
