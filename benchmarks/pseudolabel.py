"""Automatic mask generation (spec §3.3): segment_anything's ``SamAutomaticMaskGenerator`` at its
fastest ``points_per_batch`` of a few tried (on the first image) against
`sum.pseudo.amg.MaskGenerator` as the ``pseudolabel`` stage builds it (``params.yaml``'s
``pseudo`` settings, `sum.pseudo.run.amg_params`), each from the image, encoding included, with
the generator settings both share (points per side and thresholds) equal.

Ours runs with the encoder fast path of the model config (the pipeline's precision); the check
compares mask sets generated with the fp32 encoder on both sides (same count, every official mask
matched by one of ours at IoU >= 0.95, and how many are bit-identical), re-running ours in fp32
when its timed run was not. With a bf16 encoder the timed masks are matched too (``extra``).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from benchmarks.common import REPO, Result, synthetic_image, timed
from sum.config import load_params
from sum.model.fast import OFF, apply_fast_path, resolve_fast_path
from sum.pseudo.amg import MaskGenerator
from sum.pseudo.run import amg_params

log = logging.getLogger(__name__)
MATCH_IOU = 0.95  # a reference mask counts as matched by one of ours at this IoU


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
    any of ours, masks equal bit for bit at the same position; ``ok`` when the counts agree and
    every reference mask has a partner at IoU >= `MATCH_IOU`."""
    best: List[float] = []
    if ref and out:
        ious = np.asarray(mask_utils.iou([o["segmentation"] for o in out], [r["segmentation"] for r in ref], [0] * len(ref)))
        best = ious.max(axis=0).tolist()  # (ours, ref) -> per reference mask
    identical = sum(a["segmentation"] == b["segmentation"] for a, b in zip(ref, out))
    matched = sum(v >= MATCH_IOU for v in best)
    min_iou = min(best) if best else (1.0 if len(ref) == len(out) else 0.0)
    return {"official": len(ref), "ours": len(out), "matched": matched, "min_iou": min_iou, "identical": identical,
            "ok": len(ref) == len(out) and matched == len(ref)}


def summed(checks: List[Dict]) -> Dict:
    total = {k: sum(c[k] for c in checks) for k in ("official", "ours", "matched", "identical")}
    total["min_iou"] = min((c["min_iou"] for c in checks), default=1.0)
    total["ok"] = all(c["ok"] for c in checks)
    return total


def generators(model, sizes: AmgSizes):
    """Ours as the pipeline builds it, and the official keyword arguments both share."""
    pcfg = replace(load_params(REPO / "params.yaml").pseudo, points_per_side=sizes.points_per_side)
    if sizes.thresholds is not None:
        pcfg = replace(pcfg, pred_iou_thresh=sizes.thresholds[0], stability_score_thresh=sizes.thresholds[1])
    params = amg_params(pcfg)
    ours = MaskGenerator(model, output_mode="coco_rle", task_prompt=0, **params)
    official_args = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters) - {"self", "model", "points_per_batch"}
    shared = {k: v for k, v in params.items() if k in official_args}
    return ours, shared, params


def run(model, name: str, weights: str, device: str, fast_mode: str, sizes: AmgSizes) -> Result:
    """The official generator at its best ``points_per_batch`` vs ours (module docstring)."""
    plan = resolve_fast_path(model, fast_mode, device)
    h, w = sizes.image_hw
    images = [synthetic_image(h, w, seed) for seed in range(sizes.images)]
    ours, shared, params = generators(model, sizes)

    def official_on(ppb: int, image):
        apply_fast_path(model, OFF)
        gen = SamAutomaticMaskGenerator(model, points_per_batch=ppb, output_mode="coco_rle", **shared)
        return timed(lambda: gen.generate(image), device)

    def ours_on(p, image):
        apply_fast_path(model, p)
        return timed(lambda: ours.generate(image), device)

    if device.startswith("cuda"):  # kernels, allocator: not timed
        ours_on(plan, images[0])
        official_on(sizes.official_points_per_batch[0], images[0])
    trials = {}
    for ppb in sizes.official_points_per_batch:
        trials[ppb] = official_on(ppb, images[0])
        log.info("  official points_per_batch=%d: %.2f s", ppb, trials[ppb][1])
    best = min(trials, key=lambda p: trials[p][1])
    t_ref, t_ours, checks, timed_checks = 0.0, 0.0, [], []
    for i, image in enumerate(images):
        ref, dt_ref = trials[best] if i == 0 else official_on(best, image)
        out, dt_out = ours_on(plan, image)
        t_ref += dt_ref
        t_ours += dt_out
        timed_checks.append(match(ref, out))
        log.info("  image %d: official %.2f s, ours %.2f s", i, dt_ref, dt_out)
        checks.append(timed_checks[-1] if plan == OFF else match(ref, ours_on(OFF, image)[0]))
    apply_fast_path(model, OFF)
    total = summed(checks)
    n = len(images)
    return Result(
        benchmark="pseudolabel", model=name, reference=f"SamAutomaticMaskGenerator ppb={best}",
        ours=f"sum.pseudo MaskGenerator ({params.get('decoder', '?')})", unit="s/image",
        reference_s=t_ref / n, ours_s=t_ours / n,
        check={**total, "summary": f"{total['ours']}/{total['official']} masks, {total['matched']} matched "
                                  f"(IoU>={MATCH_IOU}), {total['identical']} bit-identical"},
        settings={"images": n, "image_hw": [h, w], "weights": weights, "points_per_side": sizes.points_per_side,
                  "official_points_per_batch_tried": {str(p): t[1] for p, t in trials.items()},
                  "ours_params": {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}},
        extra={"encoder_plan": dataclasses.asdict(plan), "timed_masks_vs_official": summed(timed_checks)},
    )
