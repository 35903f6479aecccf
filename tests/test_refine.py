"""The mask-refinement module (spec §4.1): pair filtering, training, checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from sum.model.build import build_sum_model
from sum.uncertainty.refine import (
    ImageData,
    Pair,
    RefineConfig,
    RefinementModule,
    batch_loss,
    load_refiner,
    loss_frame,
    pair_filter,
    save_refiner,
    select_pairs,
    split_images,
    target_frame,
    train_refiner,
)


def test_pair_filter_thresholds():
    iou = torch.tensor([0.69, 0.70, 0.90, 0.90, 0.95])
    pred = torch.tensor([0.95, 0.95, 0.87, 0.95, 0.95])
    stab = torch.tensor([0.99, 0.99, 0.99, 0.94, 0.95])
    assert pair_filter(iou, pred, stab).tolist() == [False, True, False, False, True]


class _FakePredictor:
    """Returns fixed multimask logits: output 0 = ``outs[b][0]`` ... (3 outputs per prompt)."""

    def __init__(self, outs_b3hw: torch.Tensor, iou_b3: torch.Tensor):
        self.outs, self.iou = outs_b3hw, iou_b3
        self.transform = ResizeLongestSide(64)
        self.original_size = (64, 64)
        self.device = torch.device("cpu")

    def predict_torch(self, coords, labels, multimask_output=True, return_logits=True):
        b = coords.shape[0]
        assert b == self.outs.shape[0] and multimask_output
        low = torch.nn.functional.interpolate(self.outs, (16, 16), mode="bilinear", align_corners=False)
        return self.outs, self.iou, low


def _square(y0, y1, x0, x1, size=64):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_select_pairs_excludes_low_iou_and_keeps_best_output():
    gt = np.stack([_square(10, 30, 10, 30), _square(40, 60, 40, 60)])  # two GT masks, 400 px each
    logit = lambda m: torch.as_tensor(np.where(m, 10.0, -10.0), dtype=torch.float32)  # noqa: E731
    # GT 0: best output is exact (IoU 1); GT 1: best output covers 20x12 of the 20x20 GT (IoU 0.6)
    outs = torch.stack(
        [
            torch.stack([logit(_square(0, 5, 0, 5)), logit(gt[0]), logit(_square(10, 20, 10, 20))]),
            torch.stack([logit(_square(40, 60, 40, 52)), logit(_square(0, 5, 0, 5)), logit(_square(40, 50, 40, 45))]),
        ]
    )
    iou_pred = torch.full((2, 3), 0.95)
    cfg = RefineConfig(points_per_mask=1)
    pairs, counts = select_pairs(_FakePredictor(outs, iou_pred), "img", gt, cfg, torch.Generator().manual_seed(0))
    assert counts == {"candidates": 2, "kept": 1, "low_iou": 1, "low_quality": 0}
    (pair,) = pairs
    assert pair.gt_index == 0 and pair.iou_to_gt == pytest.approx(1.0)
    assert pair.s.shape == (16, 16) and pair.s.dtype == np.float16
    assert pair.box_xyxy.tolist() == [10, 10, 29, 29]
    assert gt[0][int(pair.point_xy[1]), int(pair.point_xy[0])]  # the point lies in its GT mask
    # the same candidates with a low predicted IoU fail the AMG filter instead
    _, counts = select_pairs(_FakePredictor(outs, torch.full((2, 3), 0.5)), "img", gt, cfg, torch.Generator().manual_seed(0))
    assert counts == {"candidates": 2, "kept": 0, "low_iou": 1, "low_quality": 1}


def test_split_images_is_seeded_and_disjoint():
    ids = [str(i) for i in range(10)]
    tr, va = split_images(ids, 0.2, seed=3)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(tr + va, key=int) == ids
    assert split_images(ids, 0.2, seed=3) == (tr, va)
    assert split_images(ids[:2], 0.01, seed=0)[1] != []  # at least one val image


def test_loss_and_target_frames_crop_the_padding():
    logits = torch.zeros(3, 1, 32, 32)
    assert loss_frame(logits, (96, 128), 128, 32).shape == (3, 1, 24, 32)
    assert loss_frame(logits, (96, 128), 128, 128).shape == (3, 1, 96, 128)  # spec A10 frame
    gt = np.zeros((2, 48, 64), bool)
    gt[0, :24] = True
    t = target_frame(gt, (96, 128), 128, 32)
    assert t.shape == (2, 1, 24, 32) and t[0, 0, :12].all() and not t[0, 0, 12:].any() and not t[1].any()


def _tiny_refiner(tiny_cfg):
    torch.manual_seed(0)
    return RefinementModule.from_sam(build_sum_model(tiny_cfg))


def _fake_image(rng, image_id="a", n_pairs=4, size=(48, 64)):
    gt = np.zeros((2, *size), bool)
    gt[0, 10:30, 12:40] = True
    gt[1, 20:44, 30:60] = True
    pairs = []
    for j in range(n_pairs):
        k = j % 2
        ys, xs = np.nonzero(gt[k])
        pairs.append(
            Pair(
                image_id=image_id,
                gt_index=k,
                point_xy=np.array([xs[len(xs) // 2], ys[len(ys) // 2]], np.float64),
                box_xyxy=np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64),
                s=rng.normal(0, 2, (32, 32)).astype(np.float16),
                iou_to_gt=0.8,
                predicted_iou=0.9,
                stability=0.96,
            )
        )
    return ImageData(
        image_id=image_id,
        features=torch.as_tensor(rng.normal(0, 1, (1, 32, 8, 8)), dtype=torch.float32),
        original_size=size,
        input_size=ResizeLongestSide.get_preprocess_shape(size[0], size[1], 128),
        gt_khw=gt,
        pairs=pairs,
    )


def test_training_decreases_the_loss_on_a_fixed_batch(tiny_cfg):
    refiner = _tiny_refiner(tiny_cfg)
    rng = np.random.default_rng(0)
    data = [_fake_image(rng, "a"), _fake_image(rng, "b")]
    cfg = RefineConfig(epochs=8, batch_size=8, lr=3e-3, loss_size=32)
    targets = {d.image_id: target_frame(d.gt_khw, d.input_size, 128, 32) for d in data}
    batch = [(d, p) for d in data for p in d.pairs]
    with torch.no_grad():
        before = float(batch_loss(refiner, batch, targets, 32)["loss"])
    history = train_refiner(refiner, data, cfg)
    with torch.no_grad():
        after = float(batch_loss(refiner, batch, targets, 32)["loss"])
    assert len(history) == 8 and np.isfinite(before)
    assert after < 0.8 * before, (before, after)


def test_refiner_checkpoint_round_trip(tmp_path, tiny_cfg):
    refiner = _tiny_refiner(tiny_cfg)
    with torch.no_grad():
        refiner.mask_decoder.iou_token.weight.add_(1.0)  # differ from any fresh build
    cfg = RefineConfig(epochs=1)
    path = save_refiner(refiner, tmp_path / "m" / "refiner.ckpt", tiny_cfg, cfg, {"val_miou_refined": 0.5})
    assert not list(path.parent.glob("*.tmp"))
    loaded, meta = load_refiner(path)
    assert meta["metrics"] == {"val_miou_refined": 0.5} and meta["refine_config"]["epochs"] == 1
    for k, v in refiner.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not any(k.startswith("image_encoder") for k in loaded.state_dict())
    data = _fake_image(np.random.default_rng(1))
    targets = {"a": target_frame(data.gt_khw, data.input_size, 128, 32)}
    with torch.no_grad():
        a = batch_loss(refiner.eval(), [(data, p) for p in data.pairs], targets, 32)["loss"]
        b = batch_loss(loaded, [(data, p) for p in data.pairs], targets, 32)["loss"]
    assert torch.equal(a, b)


def test_load_refiner_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_refiner(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(ValueError, match="bad.ckpt: not a refinement-module checkpoint"):
        load_refiner(bad)
