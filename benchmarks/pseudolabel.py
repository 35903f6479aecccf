"""Automatic mask generation (spec §3.3): segment_anything's ``SamAutomaticMaskGenerator`` at its
fastest ``points_per_batch`` of a few tried (on the first image) against
`sum.pseudo.amg.MaskGenerator` as the ``pseudolabel`` stage builds it (``params.yaml``'s
``pseudo`` settings, `sum.pseudo.settings.amg_params`), each from the image, encoding included, with
the generator settings both share (points per side and thresholds) equal.

Ours runs with the encoder fast path of the model config (the pipeline's precision); the check
compares mask sets generated with the fp32 encoder on both sides (same count, every official mask
matched by one of ours at IoU >= 0.95, and how many are bit-identical), re-running ours in fp32
when its timed run was not. With a bf16 encoder the timed masks are matched too (``extra``).

On a CPU with T >= 2 threads each side also runs as T processes of one thread over the images (the
``pseudolabel`` stage's layout: ``pseudo.n_workers`` Dask workers of one thread each), the wall
time of the set from the first start to the last end; each side is given its faster layout, both
layouts' times are in ``settings.layouts``, and the masks of the parallel runs are matched too.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from benchmarks.common import REPO, Result, load_bench_model, synthetic_image, timed
from sum.config import load_params
from sum.model.fast import OFF, apply_fast_path, resolve_fast_path
from sum.pseudo.amg import MaskGenerator
from sum.pseudo.settings import amg_params

log = logging.getLogger(__name__)
MATCH_IOU = 0.95  # a reference mask counts as matched by one of ours at this IoU
BF16_MEAN_IOU = 0.99  # the bf16 decoder's masks: mean best IoU against the reference's


@dataclass(frozen=True)
class AmgSizes:
    images: int
    image_hw: tuple
    points_per_side: int
    official_points_per_batch: Sequence[int]
    # (pred_iou_thresh, stability_score_thresh) instead of params.yaml's: a random tiny model
    # predicts low IoUs, so the smoke run lowers them to have masks to compare
    thresholds: Optional[Tuple[float, float]] = None


def match(ref: List[dict], out: List[dict]) -> Dict:
    """How ``out``'s COCO-RLE masks match ``ref``'s: counts, each reference mask's best IoU with
    any of ours (their min and mean), how many of ours have a reference partner, masks equal bit
    for bit at the same position; ``ok`` when the counts agree and every reference mask has a
    partner at IoU >= `MATCH_IOU`."""
    best: List[float] = []
    ours_matched = 0
    if ref and out:
        ious = np.asarray(mask_utils.iou([o["segmentation"] for o in out], [r["segmentation"] for r in ref], [0] * len(ref)))
        best = ious.max(axis=0).tolist()  # (ours, ref) -> per reference mask
        ours_matched = int((ious.max(axis=1) >= MATCH_IOU).sum())
    identical = sum(a["segmentation"] == b["segmentation"] for a, b in zip(ref, out))
    matched = sum(v >= MATCH_IOU for v in best)
    min_iou = min(best) if best else (1.0 if len(ref) == len(out) else 0.0)
    iou_sum = float(sum(best))
    return {"official": len(ref), "ours": len(out), "matched": matched, "ours_matched": ours_matched, "min_iou": min_iou,
            "mean_iou": iou_sum / len(ref) if ref else 1.0, "iou_sum": iou_sum, "identical": identical,
            "ok": len(ref) == len(out) and matched == len(ref)}


def summed(checks: List[Dict]) -> Dict:
    total = {k: sum(c[k] for c in checks) for k in ("official", "ours", "matched", "ours_matched", "identical", "iou_sum")}
    total["min_iou"] = min((c["min_iou"] for c in checks), default=1.0)
    total["mean_iou"] = total["iou_sum"] / total["official"] if total["official"] else 1.0
    total["ok"] = all(c["ok"] for c in checks)
    return total


def bf16_ok(check: Dict) -> Dict:
    """The bf16 decoder's check (issue 21's rule for bf16: mean IoU >= `BF16_MEAN_IOU` against
    fp32): every reference mask matched by one of ours at IoU >= `MATCH_IOU` and every one of
    ours by a reference mask (the counts may differ by near-duplicates that fall on the other
    side of the box NMS), and the reference masks' mean best IoU >= `BF16_MEAN_IOU`."""
    ok = (check["matched"] == check["official"] and check["ours_matched"] == check["ours"]
          and check["mean_iou"] >= BF16_MEAN_IOU)
    return {**check, "ok": bool(ok)}


def plain_settings(params: Dict) -> Dict:
    """The generator settings that are JSON scalars (for the result's ``settings``)."""
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}


def generators(model, sizes: AmgSizes, decoder_precision: Optional[str] = None):
    """Ours as the pipeline builds it (with ``decoder_precision`` instead of the pipeline's, if
    given), and the official keyword arguments both share."""
    pcfg = replace(load_params(REPO / "params.yaml").pseudo, points_per_side=sizes.points_per_side)
    if decoder_precision is not None:
        pcfg = replace(pcfg, decoder_precision=decoder_precision)
    if sizes.thresholds is not None:
        pcfg = replace(pcfg, pred_iou_thresh=sizes.thresholds[0], stability_score_thresh=sizes.thresholds[1])
    params = amg_params(pcfg)
    ours = MaskGenerator(model, output_mode="coco_rle", task_prompt=0, **params)
    official_args = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters) - {"self", "model", "points_per_batch"}
    shared = {k: v for k, v in params.items() if k in official_args}
    return ours, shared, params


def _generate_share(job: Tuple) -> None:
    """One process of a parallel layout: one thread, its share of the images (every n-th), the
    generator built as in `run`; after the barrier, (index, masks) and its start/end wall clock
    on the queue."""
    name, side, ppb, fast_mode, sizes, rank, n_procs, barrier, queue, precision = job
    torch.set_num_threads(1)
    model, _ = load_bench_model(name, "cpu")
    h, w = sizes.image_hw
    mine = [(i, synthetic_image(h, w, i)) for i in range(rank, sizes.images, n_procs)]
    if side == "official":
        apply_fast_path(model, OFF)
        _, shared, _ = generators(model, sizes)
        gen = SamAutomaticMaskGenerator(model, points_per_batch=ppb, output_mode="coco_rle", **shared)
    else:
        gen, _, _ = generators(model, sizes, precision)
        apply_fast_path(model, resolve_fast_path(model, fast_mode, "cpu"))
    barrier.wait()
    t0 = time.time()
    out = [(i, gen.generate(image)) for i, image in mine]
    queue.put((rank, t0, time.time(), out))


def parallel_layout(name: str, side: str, ppb: int, fast_mode: str, sizes: AmgSizes, n_procs: int,
                    precision: Optional[str] = None) -> Tuple[List[List[dict]], float]:
    """``side`` ("official" or "ours", ours with decoder ``precision`` if given) over the images
    in ``n_procs`` one-thread processes: (masks per image, wall seconds from the first process's
    start to the last one's end)."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_generate_share, args=((name, side, ppb, fast_mode, sizes, r, n_procs, barrier, queue, precision),))
             for r in range(n_procs)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"pseudolabel benchmark: a {side} process exited with {proc.exitcode}")
    masks: Dict[int, List[dict]] = {i: out for _, _, _, outs in results for i, out in outs}
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return [masks[i] for i in range(sizes.images)], wall


def run(model, name: str, weights: str, device: str, fast_mode: str, sizes: AmgSizes, bf16_decoder: bool = True) -> List[Result]:
    """The official generator at its best ``points_per_batch`` vs ours (module docstring): a row
    for ours at the pipeline's decoder precision and, with ``bf16_decoder`` where that is fp32, a
    row for ours with ``decoder_precision="bf16"`` against the same official timing and masks
    (checked by `bf16_ok`)."""
    plan = resolve_fast_path(model, fast_mode, device)
    h, w = sizes.image_hw
    images = [synthetic_image(h, w, seed) for seed in range(sizes.images)]
    ours, shared, params = generators(model, sizes)

    def official_on(ppb: int, image):
        apply_fast_path(model, OFF)
        gen = SamAutomaticMaskGenerator(model, points_per_batch=ppb, output_mode="coco_rle", **shared)
        return timed(lambda: gen.generate(image), device)

    def ours_on(p, image, gen=ours):
        apply_fast_path(model, p)
        return timed(lambda: gen.generate(image), device)

    if device.startswith("cuda"):  # kernels, allocator: not timed
        ours_on(plan, images[0])
        official_on(sizes.official_points_per_batch[0], images[0])
    trials = {}
    for ppb in sizes.official_points_per_batch:
        trials[ppb] = official_on(ppb, images[0])
        log.info("  official points_per_batch=%d: %.2f s", ppb, trials[ppb][1])
    best = min(trials, key=lambda p: trials[p][1])
    t_ref, t_ours, checks, timed_checks, reference_masks = 0.0, 0.0, [], [], []
    for i, image in enumerate(images):
        ref, dt_ref = trials[best] if i == 0 else official_on(best, image)
        reference_masks.append(ref)
        out, dt_out = ours_on(plan, image)
        t_ref += dt_ref
        t_ours += dt_out
        timed_checks.append(match(ref, out))
        log.info("  image %d: official %.2f s, ours %.2f s", i, dt_ref, dt_out)
        checks.append(timed_checks[-1] if plan == OFF else match(ref, ours_on(OFF, image)[0]))
    apply_fast_path(model, OFF)
    n = len(images)
    threads = torch.get_num_threads()
    layouts = {"official": {f"1x{threads}": t_ref / n}, "ours": {f"1x{threads}": t_ours / n}}
    parallel_checks = {}
    procs = min(threads, n) if device == "cpu" and threads >= 2 and n >= 2 else 0
    if procs:
        for side in ("official", "ours"):
            masks, wall = parallel_layout(name, side, best, fast_mode, sizes, procs)
            layouts[side][f"{procs}x1"] = wall / n
            parallel_checks[side] = summed([match(r, m) for r, m in zip(reference_masks, masks)])
            log.info("  %s as %d one-thread processes: %.2f s per image", side, procs, wall / n)
    ref_layout = min(layouts["official"], key=layouts["official"].get)
    our_layout = min(layouts["ours"], key=layouts["ours"].get)
    total = summed(checks)
    if our_layout != f"1x{threads}" and plan == OFF:  # the timed masks are the parallel ones: they must match too
        total["ok"] = total["ok"] and parallel_checks["ours"]["ok"]
    reference = f"SamAutomaticMaskGenerator ppb={best}, {ref_layout} (procs x threads)"
    settings = {"images": n, "image_hw": [h, w], "weights": weights, "points_per_side": sizes.points_per_side,
                "official_points_per_batch_tried": {str(p): t[1] for p, t in trials.items()},
                "layouts": layouts,  # processes x threads -> s/image, per side
                "ours_params": plain_settings(params)}
    rows = [Result(
        benchmark="pseudolabel", model=name, reference=reference,
        ours=f"sum.pseudo MaskGenerator ({params.get('decoder', '?')}, {params.get('decoder_precision', '?')} decoder), {our_layout}",
        unit="s/image", reference_s=layouts["official"][ref_layout], ours_s=layouts["ours"][our_layout],
        check={**total, "summary": f"{total['ours']}/{total['official']} masks, {total['matched']} matched "
                                  f"(IoU>={MATCH_IOU}), {total['identical']} bit-identical"},
        settings=settings,
        extra={"encoder_plan": dataclasses.asdict(plan), "timed_masks_vs_official": summed(timed_checks),
               "parallel_masks_vs_official": parallel_checks},
    )]
    if not bf16_decoder or params.get("decoder") != "fast" or params.get("decoder_precision") != "fp32":
        return rows

    # ours again with the bf16 decoder (the pipeline's encoder plan), same images, same layouts
    gen16, _, params16 = generators(model, sizes, "bf16")
    if device.startswith("cuda"):
        ours_on(plan, images[0], gen16)
    t16, checks16 = 0.0, []
    for ref, image in zip(reference_masks, images):
        out, dt = ours_on(plan, image, gen16)
        t16 += dt
        checks16.append(match(ref, out))
    apply_fast_path(model, OFF)
    layouts16 = {f"1x{threads}": t16 / n}
    total16 = summed(checks16)
    if procs:
        masks, wall = parallel_layout(name, "ours", best, fast_mode, sizes, procs, "bf16")
        layouts16[f"{procs}x1"] = wall / n
        total16 = summed([total16, summed([match(r, m) for r, m in zip(reference_masks, masks)])])
        log.info("  ours (bf16 decoder) as %d one-thread processes: %.2f s per image", procs, wall / n)
    layout16 = min(layouts16, key=layouts16.get)
    total16 = bf16_ok(total16)
    rows.append(Result(
        benchmark="pseudolabel", model=name, reference=reference,
        ours=f"sum.pseudo MaskGenerator (fast, bf16 decoder), {layout16}", unit="s/image",
        reference_s=layouts["official"][ref_layout], ours_s=layouts16[layout16],
        check={**total16, "summary": f"{total16['ours']}/{total16['official']} masks, {total16['matched']} of theirs and "
                                    f"{total16['ours_matched']} of ours matched (IoU>={MATCH_IOU}), mean IoU "
                                    f"{total16['mean_iou']:.4f} (>= {BF16_MEAN_IOU}), {total16['identical']} bit-identical"},
        settings={**settings, "layouts": {"official": layouts["official"], "ours": layouts16},
                  "ours_params": plain_settings(params16)},
        extra={"encoder_plan": dataclasses.asdict(plan), "masks": "every layout's masks against the official generator's"},
    ))
    return rows
