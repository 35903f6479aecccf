"""Interactive evaluation (spec §10.3, point protocol): segment_anything's ``SamPredictor``
re-prompted once per click and target (`reference_target`) against `sum.eval.scoring.run_protocol`
as the ``evaluate`` stage runs it (``params.yaml``'s ``eval.decoder`` and ``eval.precision``), for
the same targets and rounds, oracle selection.

Both follow the protocol: the interior-most first click, then `sum.eval.clicker.next_click` on
the previous round's selected mask, the clicks accumulating with the selected low-res logits as
mask input, IoU and boundary IoU after every round; a target with no error left stops. The image
embedding is set on both before timing (the encoder has its own benchmark). The check compares
the IoUs of every target and round.

Where the time goes (``extra``): both sides' FLOPs per image (``torch.utils.flop_counter`` over one
more untimed pass of every image), the GFLOP/s each achieved, and the rate of an fp32 matmul of the
decoder's own shape (4096 image tokens x 256 channels, `matmul_gflops`) timed in the same run;
``ratio_if_all_at_matmul_rate`` is the ratio ours would reach if every one of its FLOPs ran at that
rate and nothing else took time: a ceiling for the work ours does.

Data: a procedural world's entity set (`sum.data.synthetic.generate_set`), targets drawn by
`sum.eval.protocol.select_targets`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import REPO, Result, timed
from sum.config import WorldSetConfig, load_params
from sum.data.dataset import CocoDataset
from sum.data.synthetic import generate_set
from sum.eval.clicker import first_click, next_click
from sum.eval.metrics import boundary_iou
from sum.eval.protocol import decoder_autocast, select_targets
from sum.eval.scoring import run_protocol
from sum.model.fast import OFF, apply_fast_path
from sum.model.predictor import SumPredictor

IOU_TOL = 1e-3  # mean |IoU difference| over targets and rounds


@dataclass(frozen=True)
class EvalSizes:
    images: int
    image_size: int  # px of the procedural world's images
    masks_per_image: int
    rounds: int


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def reference_target(predictor: SamPredictor, gt: np.ndarray, rounds: int) -> tuple[list, list]:
    """One target through ``rounds`` rounds, one ``SamPredictor.predict`` call per click; its IoU
    and boundary IoU after each round."""
    clicks = [first_click(gt)]
    ious, bious, low, pred = [], [], None, None
    for r in range(rounds):
        if r > 0:
            click = next_click(gt, pred, clicks)
            if click is None:  # nothing left to correct: the last scores stand
                ious += ious[-1:] * (rounds - r)
                bious += bious[-1:] * (rounds - r)
                break
            clicks.append(click)
        masks, _, lows = predictor.predict(
            np.array([[c.x, c.y] for c in clicks], np.float32), np.array([c.label for c in clicks]),
            mask_input=low, multimask_output=len(clicks) == 1,
        )
        scores = [iou(m, gt) for m in masks]
        best = int(np.argmax(scores))  # oracle of the 3 outputs; the only one otherwise
        pred, low = masks[best], lows[best][None]
        ious.append(scores[best])
        bious.append(boundary_iou(gt, pred))
    return ious, bious


def matmul_gflops(device: str, m: int = 4096, k: int = 256, n: int = 4096, warmup: int = 2, rounds: int = 10) -> float:
    """GFLOP/s of an fp32 ``(m, k) @ (k, n)`` matmul on ``device`` (default: the shape of the
    decoder's products of the 4096 image tokens with 256 channels), mean of ``rounds``."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    for _ in range(warmup):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(rounds)], device)
    return 2 * m * k * n * rounds / seconds / 1e9


def counted_flops(fn) -> int:
    """FLOPs of ``fn()`` (``torch.utils.flop_counter``: matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def benchmark_images(root: Path, sizes: EvalSizes):
    """(image, targets (K, H, W)) of the procedural entity set."""
    out = generate_set(root, "bench", WorldSetConfig(task="entity", n_images=sizes.images, seed=7), sizes.image_size, workers=1)
    ds = CocoDataset(out / "images", out / "annotations.json", task="entity", name="bench")
    pairs = []
    for i in range(len(ds)):
        s = ds[i]
        idx = select_targets(s.masks, sizes.masks_per_image, str(s.image_id))
        if idx.size:
            pairs.append((s.image, s.masks[idx].astype(bool)))
    return pairs


def run(model, name: str, weights: str, device: str, sizes: EvalSizes) -> Result:
    """Per-click ``SamPredictor`` vs ``run_protocol`` (module docstring)."""
    ev = load_params(REPO / "params.yaml").eval
    autocast = decoder_autocast(ev.precision, torch.device(device))
    apply_fast_path(model, OFF)
    reference, ours = SamPredictor(model), SumPredictor(model)
    t_ref = t_ours = 0.0
    ref_iou, our_iou, n_targets = [], [], 0
    with tempfile.TemporaryDirectory(prefix="sum-bench-eval-") as tmp:
        pairs = benchmark_images(Path(tmp), sizes)
    if device.startswith("cuda"):  # kernels, allocator: not timed
        ours.set_image(pairs[0][0])
        run_protocol(ours, pairs[0][1], "point", sizes.rounds, "oracle", autocast=autocast, decoder=ev.decoder)
    for image, gt_khw in pairs:
        reference.set_image(image)
        ours.set_image(image)
        refs, dt = timed(lambda: [reference_target(reference, g, sizes.rounds) for g in gt_khw], device)
        t_ref += dt
        res, dt = timed(lambda: run_protocol(ours, gt_khw, "point", sizes.rounds, "oracle", autocast=autocast,
                                             decoder=ev.decoder), device)
        t_ours += dt
        ref_iou.append(np.array([r[0] for r in refs]))
        our_iou.append(np.asarray(res.iou))
        n_targets += len(gt_khw)
    flops_ref = flops_ours = 0
    for image, gt_khw in pairs:  # one more, untimed pass under the FLOP counter
        reference.set_image(image)
        ours.set_image(image)
        flops_ref += counted_flops(lambda: [reference_target(reference, g, sizes.rounds) for g in gt_khw])
        flops_ours += counted_flops(lambda: run_protocol(ours, gt_khw, "point", sizes.rounds, "oracle", autocast=autocast,
                                                         decoder=ev.decoder))
    a, b = np.concatenate(ref_iou), np.concatenate(our_iou)
    diff = np.abs(a - b)
    check = {"ok": bool(diff.mean() <= IOU_TOL), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
             "identical": int((diff == 0).sum()), "values": int(diff.size), "tolerance": IOU_TOL,
             "reference_miou_last": float(a[:, -1].mean()), "ours_miou_last": float(b[:, -1].mean())}
    check["summary"] = (f"{check['identical']}/{check['values']} IoUs identical, mean |diff| {check['mean_abs_diff']:.1e}, "
                        f"mIoU@{sizes.rounds} {check['reference_miou_last']:.4f} vs {check['ours_miou_last']:.4f}")
    n = len(pairs)
    rate = matmul_gflops(device)
    extra = {"gflop_per_image_reference": flops_ref / n / 1e9, "gflop_per_image_ours": flops_ours / n / 1e9,
             "reference_gflops": flops_ref / t_ref / 1e9, "ours_gflops": flops_ours / t_ours / 1e9,
             "fp32_matmul_gflops": rate}
    extra["ours_fraction_of_matmul"] = extra["ours_gflops"] / rate
    extra["ratio_if_all_at_matmul_rate"] = (t_ref / n) / (flops_ours / n / 1e9 / rate)
    return Result(
        benchmark="interactive", model=name, reference="SamPredictor per click", ours=f"run_protocol ({ev.decoder}, {ev.precision})",
        unit="s/image", reference_s=t_ref / n, ours_s=t_ours / n, check=check,
        settings={"images": n, "targets": n_targets, "rounds": sizes.rounds, "image_size": sizes.image_size,
                  "masks_per_image": sizes.masks_per_image, "weights": weights, "protocol": "point", "selection": "oracle"},
        extra=extra,
    )
