"""Training-step speed and memory: the trainer's step (`sum.train.trainer.TrainStep`) against a
plain loop written the way the reference code does it.

Both variants train the same model from the same state on the same global batch (same images,
masks and generator seeds, so the same prompts), one after the other in separate child processes
so that each gets its own peak memory:

- **ours**: the `TrainStep` that `finetune`'s loop calls, then AdamW with layer decay: the rank's
  batch, the cached embeddings (decoder mode) or the batched encoder (full mode), the interactive
  rounds (box- and point-prompted masks of an image in one decoder call per round, losses on the
  un-padded part of the loss frame, backward after every round), the gradient all-reduce; bf16
  autocast and the fused-attention encoder fast path on CUDA.
- **reference**: the straightforward loop: per image, per round, one ``prompt_encoder`` +
  ``mask_decoder`` forward per prompt kind (box, point), losses on the whole padded frame
  (``postprocess_masks``-style upsampling, no crop), summed over the batch and back-propagated
  once, fp32 everywhere, the official attention. Its batches are `TrainStep.batch`'s.
  Data loading, prompt sampling and loss formulas are the repo's (`sum.train.sampling`,
  `sum.model.losses`), so the comparison isolates the loop structure and precision.

Parts:

- ``cpu``: MobileSAM (real weights when ``data/raw/mobile_sam/mobile_sam.pt`` exists) in
  ``decoder`` mode on the embedded world (``data/world/hq_train`` labeled + ``unlabeled`` with its
  hidden entity masks as pseudo labels and a synthetic u), embeddings computed up front;
- ``cuda``: SAM ViT-B and ViT-H (random weights; speed does not depend on them) in ``full`` mode at
  1024 px.

Usage (the smallest run, a smoke test: ``--part cpu --synthetic --batch-size 2 --max-masks 1
--loss-size 64 --steps 1 --warmup 0``)::

    python benchmarks/train_step.py --part cpu --batch-size 4 --max-masks 8 --loss-size 256
    python benchmarks/train_step.py --part cuda --models vit_b vit_h --batch-size 2 --max-masks 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sum.config import ModelConfig, WorldSetConfig  # noqa: E402
from sum.data.dataset import CocoDataset  # noqa: E402
from sum.data.prompts import sample_first_points  # noqa: E402
from sum.data.sample import Sample  # noqa: E402
from sum.data.synthetic import generate_set  # noqa: E402
from sum.model.build import build_sum_model  # noqa: E402
from sum.model.checkpoint import load_model  # noqa: E402
from sum.model.fast import enable_fast_path  # noqa: E402
from sum.model.losses import combined_loss  # noqa: E402
from sum.model.predictor import SumPredictor  # noqa: E402
from sum.train.build import set_train_modes  # noqa: E402
from sum.train.data import LABELED, UNLABELED, Pool, cached_features, global_batch, split_batch  # noqa: E402
from sum.train.distributed import DistInfo  # noqa: E402
from sum.train.optim import build_optimizer, set_trainable  # noqa: E402
from sum.train.rounds import RoundOptions, to_input_frame  # noqa: E402
from sum.train.sampling import (  # noqa: E402
    PROMPT_ERROR_POINT,
    add_jitter_to_boxes,
    round_schedule,
    sample_error_clicks,
    sample_first_prompt_is_box,
)
from sum.train.trainer import TrainStep  # noqa: E402

MOBILE_SAM_CHECKPOINT = REPO / "data" / "raw" / "mobile_sam" / "mobile_sam.pt"
WORLD = REPO / "data" / "world"


# ---- data ------------------------------------------------------------------------------------


@dataclass
class AsPseudo:
    """A COCO set read as pseudo labels: task 0 and a synthetic u (0.5 on a band around each
    mask's border, 0 elsewhere), so that the uncertainty-aware paths do their real work."""

    ds: CocoDataset

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        s = self.ds[i]
        kernel = np.ones((9, 9), np.uint8)
        u = np.stack([
            (cv2.dilate(m.astype(np.uint8), kernel) - cv2.erode(m.astype(np.uint8), kernel)).astype(np.float32) * 0.5
            for m in s.masks
        ]) if len(s.masks) else np.zeros(s.masks.shape, np.float32)
        return Sample(s.image_id, s.image, s.masks, s.boxes, s.ann_ids, 0, s.path, u)


def world_pools(synthetic: bool):
    if synthetic or not (WORLD / "hq_train").is_dir():
        out = Path(tempfile.mkdtemp())
        hq = generate_set(out, "hq_train", WorldSetConfig(task="salient", role="labeled", n_images=8, seed=1), 512)
        ent = generate_set(out, "unlabeled", WorldSetConfig(task="entity", role="labeled", n_images=8, seed=2), 512)
        lab = CocoDataset(hq / "images", hq / "annotations.json", name="hq_train")
        unl = CocoDataset(ent / "images", ent / "annotations.json", task="unspecified", name="unlabeled")
    else:
        lab = CocoDataset(WORLD / "hq_train" / "images", WORLD / "hq_train" / "annotations.json", name="hq_train")
        unl = CocoDataset(WORLD / "unlabeled" / "images", WORLD / "unlabeled" / "hidden_gt" / "annotations_entity.json",
                          task="unspecified", name="unlabeled")
    return {LABELED: Pool(LABELED, [("hq_train", lab)]), UNLABELED: Pool(UNLABELED, [("unlabeled", AsPseudo(unl))])}


# ---- the reference loop ------------------------------------------------------------------------


def reference_loss(sam, batch, features, schedule, opts, img_size, loss_scale):
    """Per image, per round, per prompt kind: one SAM prompt-encoder + decoder forward; losses on
    the padded frame; fp32 (module docstring)."""
    L = opts.loss_size
    total = 0.0
    for i, (item, g) in enumerate(batch):
        if item.n_masks == 0:
            continue
        emb = features[i : i + 1]
        hl, wl = item.masks_k1hw.shape[-2:]
        pad = (0, L - wl, 0, L - hl)
        c = item.certainty_k1hw if item.is_pseudo else None
        c_loss = c if opts.use_uncertainty_loss else None
        c_click = c if opts.use_uncertainty_sampling else None
        is_box = sample_first_prompt_is_box(item.n_masks, generator=g, box_probability=opts.box_probability)
        order = torch.cat([is_box.nonzero()[:, 0], (~is_box).nonzero()[:, 0]])
        kb = int(is_box.sum())
        target = item.masks_k1hw[order].float()
        c_loss = None if c_loss is None else c_loss[order]
        c_click = None if c_click is None else c_click[order]
        target_pad = F.pad(target, pad)
        c_pad = None if c_loss is None else F.pad(c_loss, pad, value=1.0)
        groups = []  # per prompt kind: dict(rows, boxes, points)
        if kb:
            groups.append({"rows": slice(0, kb), "boxes": add_jitter_to_boxes(item.boxes_k4[order[:kb]], item.input_hw, generator=g, mode=opts.jitter), "points": None})
        if kb < item.n_masks:
            first = sample_first_points(item.masks_k1hw[order[kb:]], None if c_click is None else c_click[kb:], generator=g)
            groups.append({"rows": slice(kb, None), "boxes": None, "points": (to_input_frame(first.coords, item.frame_scale), first.labels)})
        mask_input = pred = None
        for spec in schedule:
            if spec.new_prompt == PROMPT_ERROR_POINT:
                click = sample_error_clicks(pred, target, c_click, generator=g)
                xy = to_input_frame(click.coords, item.frame_scale)
                for grp in groups:
                    r = grp["rows"]
                    new = (xy[r], click.labels[r])
                    grp["points"] = new if grp["points"] is None else (torch.cat([grp["points"][0], new[0]], 1), torch.cat([grp["points"][1], new[1]], 1))
            task = item.task_id if spec.task_prompt_on else 0
            lows, ious = [], []
            for grp in groups:
                r = grp["rows"]
                sparse, dense = sam.prompt_encoder(points=grp["points"], boxes=grp["boxes"],
                                                   masks=None if (mask_input is None or not spec.mask_input) else mask_input[r], task_prompt=task)
                low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=spec.multimask)
                lows.append(low)
                ious.append(iou)
            low, iou = torch.cat(lows), torch.cat(ious)
            logits = F.interpolate(low, (L, L), mode="bilinear", align_corners=False) if low.shape[-1] != L else low
            total = total + combined_loss(logits, iou, target_pad, c_pad, threshold=opts.dice_threshold)["loss"]
            best = iou.detach().argmax(1)
            k = torch.arange(low.shape[0])
            mask_input = low.detach()[k, best][:, None]
            pred = (logits.detach()[k, best][:, None] > 0)[..., :hl, :wl]
    return total * loss_scale


# ---- one variant, in its own process ------------------------------------------------------------


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Embeddings:
    """Decoder mode: the embeddings of the steps' images, computed up front."""

    def __init__(self):
        self.store = {}

    def load(self, dataset, image_id):
        return self.store[(dataset, image_id)]


def build_variant_model(args, device, mode):
    """``args.model`` (MobileSAM's real weights when present, else random), trainable as in
    ``mode``; the encoder fast path for ours on CUDA. Returns the model and its weights' name."""
    name = args.model
    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "params" / "model" / f"{name}.yaml")))
    torch.manual_seed(0)
    if name == "mobile_sam" and MOBILE_SAM_CHECKPOINT.is_file():
        sam = load_model(mcfg, MOBILE_SAM_CHECKPOINT, device=str(device), fast_path="off")
        weights = "mobile_sam.pt"
    else:
        sam, weights = build_sum_model(mcfg).to(device), "random"
    set_trainable(sam, mode)
    set_train_modes(sam, mode)
    if args.variant == "ours" and device.type == "cuda":
        enable_fast_path(sam, "auto", device=device)
    return sam, weights


def precompute_embeddings(sam, pools, steps, batch_size, n_lab, sizes, device, mode) -> Embeddings:
    """The image embeddings of the first ``steps`` global batches, with the encoder fast path."""
    embeddings = Embeddings()
    enable_fast_path(sam, "auto", device=device)
    predictor = SumPredictor(sam)
    for step in range(steps):
        for s in global_batch(step, batch_size, n_lab, sizes, 0):
            dname, ds, i = pools[s.kind].locate(s.index)
            sample = ds[i]
            if (dname, sample.image_id) not in embeddings.store:
                predictor.set_image(sample.image)
                embeddings.store[(dname, sample.image_id)] = predictor.get_embedding()
    enable_fast_path(sam, "off", device=device)
    set_train_modes(sam, mode)
    return embeddings


def reference_step(step_fn: TrainStep, step: int, opt) -> int:
    """The reference loop's step up to the optimizer update, on `TrainStep.batch`'s batch; its
    number of masks."""
    sam, device = step_fn.sam, step_fn.info.device
    batch = step_fn.batch(step)
    if step_fn.mode == "decoder":
        features = cached_features(step_fn.embeddings, batch, device)
    else:
        x = torch.cat([sam.preprocess(it.image_3hw[None].to(device, torch.float32)) for it, _ in batch])
        features = sam.image_encoder(x)
    opt.zero_grad(set_to_none=True)
    loss = reference_loss(sam, batch, features, step_fn.schedule, step_fn.opts, step_fn.img_size, 1.0 / step_fn.batch_size)
    loss.backward()
    return sum(it.n_masks for it, _ in batch)


def run_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.part == "cuda" else "cpu")
    mode = "full" if args.part == "cuda" else "decoder"
    sam, weights = build_variant_model(args, device, mode)
    pools = world_pools(args.synthetic)
    sizes = {k: len(p) for k, p in pools.items()}
    n_lab, _ = split_batch(args.batch_size, 0.5, True)
    img_size = sam.image_encoder.img_size
    opts = RoundOptions(loss_size=args.loss_size or img_size)
    opt = build_optimizer(sam, mode=mode, lr=1e-5, weight_decay=0.1, layer_decay=0.8)
    steps = args.warmup + args.steps
    embeddings = precompute_embeddings(sam, pools, steps, args.batch_size, n_lab, sizes, device, mode) if mode == "decoder" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and args.variant == "ours") else torch.autocast("cpu", enabled=False)
    step_fn = TrainStep(sam, opt, pools, embeddings, round_schedule(7), opts, autocast, DistInfo(0, 1, 0, device, False),
                        mode=mode, batch_size=args.batch_size, n_labeled=n_lab, sizes=sizes, seed=0, img_size=img_size,
                        max_masks=args.max_masks)
    baseline_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, masks = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n_masks = step_fn(step)["masks"] if args.variant == "ours" else reference_step(step_fn, step, opt)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            masks.append(float(n_masks))
    return variant_result(args, weights, mode, device, opts.loss_size, statistics.median(times), masks, baseline_rss)


def variant_result(args, weights, mode, device, loss_size, sec, masks, baseline_rss) -> dict:
    out = {
        "variant": args.variant,
        "model": args.model,
        "weights": weights,
        "mode": mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads} threads",
        "batch_size": args.batch_size,
        "max_masks": args.max_masks,
        "masks_per_step": statistics.mean(masks),
        "loss_size": loss_size,
        "s_per_step": round(sec, 4),
        "samples_per_s": round(args.batch_size / sec, 3),
        "steps": args.steps,
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_steps_mb": round(baseline_rss, 1),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None, help="default: mobile_sam (cpu), vit_b vit_h (cuda)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-masks", type=int, default=8)
    p.add_argument("--loss-size", type=int, default=0, help="0 = the model's img_size (spec A10)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--variants", nargs="+", default=["ours", "reference"])
    p.add_argument("--synthetic", action="store_true", help="generate a small world instead of data/world")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return 0
    models = args.models or (["mobile_sam"] if args.part == "cpu" else ["vit_b", "vit_h"])
    results = []
    for model in models:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--part", args.part, "--batch-size", str(args.batch_size), "--max-masks", str(args.max_masks),
                   "--loss-size", str(args.loss_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--variant", variant, "--model", model] + (["--synthetic"] if args.synthetic else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{model} {variant}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            mem = f"peak cuda {res['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in res else f"peak rss {res['peak_rss_mb']:.0f} MB (before steps {res['rss_before_steps_mb']:.0f} MB)"
            print(f"{model:10s} {res['mode']:7s} {variant:9s} B={res['batch_size']} masks/step={res['masks_per_step']:.1f} loss {res['loss_size']}px "
                  f"on {res['device']}: {res['s_per_step']:.3f} s/step, {res['samples_per_s']:.2f} samples/s, {mem}", flush=True)
    for model in models:
        pair = {r["variant"]: r for r in results if r["model"] == model}
        if {"ours", "reference"} <= set(pair):
            print(f"{model}: ours {pair['reference']['s_per_step'] / pair['ours']['s_per_step']:.2f}x the reference's samples/s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
