"""The mask-refinement module (spec §4.1): pair filtering, training, checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from sum.model.build import build_sum_model
from sum.config import RefineConfig
from sum.uncertainty.pairs import ImageData, Pair, pair_filter, select_pairs, split_images
from sum.uncertainty.refine_train import batch_loss, loss_frame, target_frame, train_refiner
from sum.uncertainty.refiner import RefinementModule, load_refiner, save_refiner


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


def _prompt_batch(rng, b=5, img_size=128, low=32):
    pts = torch.as_tensor(rng.uniform(0, img_size, (b, 1, 2)), dtype=torch.float32)
    xy0 = rng.uniform(0, img_size / 2, (b, 2))
    boxes = torch.as_tensor(np.concatenate([xy0, xy0 + rng.uniform(8, img_size / 2, (b, 2))], 1), dtype=torch.float32)
    masks = torch.as_tensor(rng.normal(0, 4, (b, 1, low, low)), dtype=torch.float32)
    return pts, torch.ones(b, 1, dtype=torch.int), boxes, masks


def test_folded_decoder_is_sams_decoder_forward_and_backward(tiny_cfg):
    folded = _tiny_refiner(tiny_cfg)
    plain = RefinementModule(folded.prompt_encoder, folded.mask_decoder, folded.img_size, folded=False)
    assert folded.folded and not plain.folded
    rng = np.random.default_rng(0)
    with torch.no_grad():
        folded.mask_decoder.mask_tokens.weight.normal_()  # away from any symmetric initialisation
    feats = torch.as_tensor(rng.normal(0, 1, (1, 32, 8, 8)), dtype=torch.float32)
    prompts = _prompt_batch(rng)
    r_f, iou_f = folded(feats, *prompts)
    r_p, iou_p = plain(feats, *prompts)
    assert r_f.shape == r_p.shape == (5, 1, 32, 32) and iou_f.shape == iou_p.shape == (5, 1)
    torch.testing.assert_close(r_f, r_p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou_f, iou_p, atol=1e-5, rtol=1e-4)
    grads = []
    for module, (r, iou) in ((folded, (r_f, iou_f)), (plain, (r_p, iou_p))):
        module.zero_grad()
        (torch.sigmoid(r).square().mean() + iou.square().mean()).backward()
        grads.append({k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
    for k, g in grads[1].items():
        if k.endswith("k_proj.bias"):
            continue  # mathematically zero (a key bias cancels in the softmax): rounding noise only
        g_f = grads[0].get(k, torch.zeros_like(g))  # multimask-only parts get no gradient at all
        torch.testing.assert_close(g_f, g, atol=1e-5 + 1e-3 * float(g.abs().max()), rtol=1e-3, msg=k)


def test_one_call_for_pairs_of_several_images_equals_one_call_per_image(tiny_cfg):
    from sum.uncertainty.refine_train import _forward_groups

    refiner = _tiny_refiner(tiny_cfg).eval()
    rng = np.random.default_rng(3)
    groups = [(d, d.pairs[:k]) for d, k in ((_fake_image(rng, "a"), 3), (_fake_image(rng, "b", size=(64, 48)), 2))]
    with torch.no_grad():
        together = _forward_groups(refiner, groups)
        alone = [_forward_groups(refiner, [g])[0] for g in groups]
    for (r_t, iou_t), (r_a, iou_a) in zip(together, alone):
        torch.testing.assert_close(r_t, r_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iou_t, iou_a, atol=1e-6, rtol=1e-5)


def test_point_predictor_gives_sams_three_outputs(tiny_cfg):
    from sum.model.predictor import SumPredictor
    from sum.uncertainty.pairs import PointPredictor

    torch.manual_seed(0)
    sam = build_sum_model(tiny_cfg).eval()
    predictor = SumPredictor(sam)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    predictor.set_image(image)
    coords = predictor.transform.apply_coords_torch(torch.tensor([[[10.0, 20.0]], [[40.0, 5.0]], [[63.0, 47.0]]]), (48, 64))
    labels = torch.ones(3, 1, dtype=torch.int)
    ours = PointPredictor(predictor).predict_torch(coords, labels)
    theirs = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one positive point"):
        PointPredictor(predictor).predict_torch(coords, torch.zeros(3, 1, dtype=torch.int))


def test_training_decreases_the_loss_on_a_fixed_batch(tiny_cfg):
    refiner = _tiny_refiner(tiny_cfg)
    rng = np.random.default_rng(0)
    data = [_fake_image(rng, "a"), _fake_image(rng, "b")]
    cfg = RefineConfig(epochs=8, batch_size=8, lr=3e-3, loss_size=32)
    targets = {d.image_id: target_frame(d.gt_khw, d.input_size, 128, 32) for d in data}
    batch = [(d, p) for d in data for p in d.pairs]
    with torch.no_grad():
        before = float(batch_loss(refiner, batch, targets, 32)["loss"])
    history, curve = train_refiner(refiner, data, cfg)
    with torch.no_grad():
        after = float(batch_loss(refiner, batch, targets, 32)["loss"])
    assert len(history) == 8 and curve == [] and np.isfinite(before)
    assert after < 0.8 * before, (before, after)


def test_bf16_training_decreases_the_loss_too(tiny_cfg):
    refiner = _tiny_refiner(tiny_cfg)
    rng = np.random.default_rng(0)
    data = [_fake_image(rng, "a"), _fake_image(rng, "b")]
    targets = {d.image_id: target_frame(d.gt_khw, d.input_size, 128, 32) for d in data}
    batch = [(d, p) for d in data for p in d.pairs]
    with torch.no_grad():
        before = float(batch_loss(refiner, batch, targets, 32)["loss"])
    train_refiner(refiner, data, RefineConfig(epochs=8, batch_size=8, lr=3e-3, loss_size=32, bf16=True))
    assert all(p.dtype == torch.float32 for p in refiner.parameters())
    with torch.no_grad():
        after = float(batch_loss(refiner, batch, targets, 32)["loss"])
    assert after < 0.8 * before, (before, after)


def test_early_stopping_restores_the_best_epoch_on_val(tiny_cfg, monkeypatch):
    import sum.uncertainty.refine_train as refine

    refiner = _tiny_refiner(tiny_cfg)
    rng = np.random.default_rng(0)
    train, val = [_fake_image(rng, "a"), _fake_image(rng, "b")], [_fake_image(rng, "v")]
    scripted = iter([0.50, 0.60, 0.58, 0.55, 0.99])  # epoch 0 (SAM), 1 (best), 2, 3: stop; 4 never
    monkeypatch.setattr(refine, "evaluate_pairs", lambda module, images: {"miou_refined": next(scripted)})
    snapshots = {}

    def on_step(step, rec):  # 8 pairs, batch 4: two steps an epoch
        if step % 2 == 1:
            snapshots[rec["epoch"]] = {k: v.clone() for k, v in refiner.state_dict().items()}

    cfg = RefineConfig(epochs=10, batch_size=4, lr=1e-2, loss_size=32, patience=2)
    history, curve = train_refiner(refiner, train, cfg, val, on_step=on_step)
    assert [c["epoch"] for c in curve] == [0, 1, 2, 3] and len(history) == 6
    assert [c["val_miou_refined"] for c in curve] == [0.50, 0.60, 0.58, 0.55]
    assert not refiner.training
    for k, v in refiner.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in refiner.state_dict().items())


def test_training_never_ends_worse_than_sam_on_val(tiny_cfg, monkeypatch):
    import sum.uncertainty.refine_train as refine

    refiner = _tiny_refiner(tiny_cfg)
    start = {k: v.clone() for k, v in refiner.state_dict().items()}
    rng = np.random.default_rng(0)
    scripted = iter([0.7, 0.6, 0.5])
    monkeypatch.setattr(refine, "evaluate_pairs", lambda module, images: {"miou_refined": next(scripted)})
    cfg = RefineConfig(epochs=2, batch_size=4, lr=1e-2, loss_size=32, patience=0)
    _, curve = train_refiner(refiner, [_fake_image(rng, "a")], cfg, [_fake_image(rng, "v")])
    assert [c["epoch"] for c in curve] == [0, 1, 2]
    for k, v in refiner.state_dict().items():
        assert torch.equal(v, start[k]), k


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


class _Images:
    """A dataset of ``n`` images, one square mask each, named ``name`` (as `SegDataset`)."""

    def __init__(self, name: str, n: int, side: int = 48) -> None:
        self.name, self.n, self.side = name, n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from sum.data.sample import Sample

        masks = np.zeros((1, self.side, self.side), bool)
        masks[0, 8 + i : 30 + i, 10:34] = True
        image = np.full((self.side, self.side, 3), 40, np.uint8)
        image[masks[0]] = 220
        return Sample(image_id=f"im{i}", image=image, masks=masks, boxes=np.zeros((1, 4), np.float32),
                      ann_ids=["1"], task_id=1, path=f"{self.name}/im{i}.png")


def test_pairs_come_from_every_dataset_with_ids_unique_across_them(tiny_cfg):
    """refine.datasets: the images of every set, in order, ``<dataset>/<image id>`` (the two
    sets share image ids), max_images per set, one seeded split over all of them."""
    from sum.uncertainty.pairs import prepare_images

    torch.manual_seed(0)
    model = build_sum_model(tiny_cfg).eval()
    cfg = RefineConfig(iou_filter=0.0, pred_iou_thresh=-1e9, stability_thresh=0.0, points_per_mask=2, max_images=2)
    images, counts = prepare_images(model, [_Images("salient", 3), _Images("part", 2)], cfg)
    assert [d.image_id for d in images] == ["salient/im0", "salient/im1", "part/im0", "part/im1"]
    assert counts["kept"] == 8 and all(len(d.pairs) == 2 for d in images)
    assert all(p.image_id == d.image_id for d in images for p in d.pairs)
    train, val = split_images([d.image_id for d in images], 0.25, 0)
    assert len(val) == 1 and sorted(train + val) == sorted(d.image_id for d in images)
