"""SUM losses (spec §5): hand-computed values, an independent loop re-implementation, and the
labeled/pseudo-labeled mixing rules."""

import math

import numpy as np
import pytest
import torch

from sum.model.losses import (
    LossWeights,
    calc_iou,
    combined_loss,
    iou_prediction_loss,
    multimask_min_loss,
    sam_loss,
    uncertainty_aware_dice_loss,
    uncertainty_aware_focal_loss,
)


def assert_close(actual, expected, atol=1e-8, rtol=1e-6):
    # not torch.testing.assert_close: its first call imports torch.distributed (seconds)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)

LN3 = math.log(3.0)

# The 2x2 case of the hand computations: p = σ(x) = [[0.5, 0.75], [0.25, 0.5]],
# y = [[1, 1], [0, 0]].
LOGITS_1122 = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]], dtype=torch.float64)
TARGET_1122 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)


# ---------- independent reference (plain Python loops over numpy arrays, spec §5.2-5.6) ----------


def ref_focal(x, y, c, alpha=0.25, gamma=2.0):
    n, _, h, w = x.shape
    out = np.zeros(n)
    for k in range(n):
        total = 0.0
        for i in range(h):
            for j in range(w):
                xi, yi = float(x[k, 0, i, j]), float(y[k, 0, i, j])
                p = 1.0 / (1.0 + math.exp(-xi))
                ce = -(yi * math.log(p) + (1 - yi) * math.log(1 - p))
                p_t = p if yi == 1 else 1 - p
                a_t = alpha if yi == 1 else 1 - alpha
                ci = 1.0 if c is None else float(c[k, 0, i, j])
                total += ci * a_t * ce * (1 - p_t) ** gamma
        out[k] = total / (h * w)
    return out


def ref_dice(x, y, c, theta=0.6, eps=1.0):
    n, _, h, w = x.shape
    out = np.zeros(n)
    for k in range(n):
        inter = total = 0.0
        for i in range(h):
            for j in range(w):
                if c is not None and not float(c[k, 0, i, j]) > theta:
                    continue
                p = 1.0 / (1.0 + math.exp(-float(x[k, 0, i, j])))
                yi = float(y[k, 0, i, j])
                inter += yi * p
                total += yi + p
        out[k] = 1 - (2 * inter + eps) / (total + eps)
    return out


def ref_iou(prob, y):
    pred = (prob >= 0.5).astype(np.float64).reshape(len(prob), -1)
    y = y.reshape(len(y), -1)
    inter = (pred * y).sum(1)
    return inter / (pred.sum(1) + y.sum(1) - inter + 1e-7)


@pytest.fixture()
def rand_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(3, 1, 5, 6, generator=g) > 0.5).to(torch.float64)
    c = torch.rand(3, 1, 5, 6, generator=g, dtype=torch.float64)
    return x, y, c


# ---------- focal (spec §5.2-5.3) ----------


def test_focal_hand_computed():
    # per pixel α_t·ce·(1−p_t)^2:
    #   (x=0,y=1):    0.25·ln2·0.25        = ln2/16
    #   (x=ln3,y=1):  0.25·ln(4/3)·0.0625  = ln(4/3)/64
    #   (x=−ln3,y=0): 0.75·ln(4/3)·0.0625  = 3·ln(4/3)/64
    #   (x=0,y=0):    0.75·ln2·0.25        = 3·ln2/16
    # mean over 4 pixels = ln2/16 + ln(4/3)/64 ≈ 0.047817
    expected = math.log(2) / 16 + math.log(4 / 3) / 64
    got = uncertainty_aware_focal_loss(LOGITS_1122, TARGET_1122)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(0.047817, abs=1e-6)


def test_focal_certainty_weights_and_divides_by_all_pixels():
    # c = [[1, 0], [0.5, 0]]: (ln2/16·1 + 0 + 3·ln(4/3)/64·0.5 + 0) / 4,
    # divided by m = 4 pixels, not by Σc = 1.5
    c = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]], dtype=torch.float64)
    expected = (math.log(2) / 16 + 3 * math.log(4 / 3) / 128) / 4
    got = uncertainty_aware_focal_loss(LOGITS_1122, TARGET_1122, c)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_focal_matches_reference_loops(rand_batch):
    x, y, c = rand_batch
    for cert in (None, c):
        got = uncertainty_aware_focal_loss(x, y, cert).numpy()
        ref = ref_focal(x.numpy(), y.numpy(), None if cert is None else cert.numpy())
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_focal_zero_certainty_pixel_gets_no_gradient():
    x = LOGITS_1122.clone().requires_grad_(True)
    c = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]], dtype=torch.float64)
    uncertainty_aware_focal_loss(x, TARGET_1122, c).sum().backward()
    assert x.grad[0, 0, 0, 1] == 0
    assert (x.grad[0, 0].flatten()[[0, 2, 3]] != 0).all()


# ---------- Dice (spec §5.4) ----------


def test_dice_hand_computed():
    # I = 0.5·1 + 0.75·1 = 1.25; S = Σy + Σp = 2 + 2 = 4; 1 − (2.5 + 1)/(4 + 1) = 0.3
    got = uncertainty_aware_dice_loss(LOGITS_1122, TARGET_1122)
    assert got.item() == pytest.approx(0.3, rel=1e-12)


def test_dice_hand_computed_with_certainty_threshold():
    # c = [[1, 0.6], [0.2, 0.9]], θ = 0.6, kept when c > θ: M = [[1, 0], [0, 1]] (0.6 is dropped)
    # I = 0.5·1 = 0.5; S = (1 + 0.5) + (0 + 0.5) = 2; 1 − (1 + 1)/(2 + 1) = 1/3
    c = torch.tensor([[[[1.0, 0.6], [0.2, 0.9]]]], dtype=torch.float64)
    got = uncertainty_aware_dice_loss(LOGITS_1122, TARGET_1122, c, threshold=0.6)
    assert got.item() == pytest.approx(1 / 3, rel=1e-12)
    # θ = 0.5 (the released default, HQ-arch) keeps the c = 0.6 pixel too:
    # I = 0.5 + 0.75 = 1.25; S = 1.5 + 1.75 + 0.5 = 3.75; 1 − 3.5/4.75
    got05 = uncertainty_aware_dice_loss(LOGITS_1122, TARGET_1122, c, threshold=0.5)
    assert got05.item() == pytest.approx(1 - 3.5 / 4.75, rel=1e-12)


def test_dice_default_threshold_is_paper_value():
    c = torch.tensor([[[[1.0, 0.6], [0.2, 0.9]]]], dtype=torch.float64)
    assert uncertainty_aware_dice_loss(LOGITS_1122, TARGET_1122, c).item() == pytest.approx(1 / 3)


def test_dice_matches_reference_loops(rand_batch):
    x, y, c = rand_batch
    for cert in (None, c):
        got = uncertainty_aware_dice_loss(x, y, cert, threshold=0.6).numpy()
        ref = ref_dice(x.numpy(), y.numpy(), None if cert is None else cert.numpy())
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_dice_ignores_pixels_at_or_below_threshold(rand_batch):
    x, y, c = rand_batch
    c = c.clone()
    c[:, :, 0, :] = 0.6  # exactly θ: ignored too
    ignored = c <= 0.6
    g = torch.Generator().manual_seed(5)
    x2 = torch.where(ignored, torch.randn(x.shape, generator=g, dtype=x.dtype) * 5, x)
    y2 = torch.where(ignored, 1 - y, y)
    assert_close(
        uncertainty_aware_dice_loss(x, y, c), uncertainty_aware_dice_loss(x2, y2, c)
    )


def test_all_ones_certainty_equals_plain_losses(rand_batch):
    x, y, _ = rand_batch
    ones = torch.ones_like(y)
    assert_close(uncertainty_aware_focal_loss(x, y, ones), uncertainty_aware_focal_loss(x, y))
    assert_close(uncertainty_aware_dice_loss(x, y, ones), uncertainty_aware_dice_loss(x, y))
    iou = torch.rand(3, 1, dtype=x.dtype)
    a, b = sam_loss(x, iou, y, ones), sam_loss(x, iou, y)
    for k in a:
        assert_close(a[k], b[k])


# ---------- IoU head (spec §5.6) ----------


def test_calc_iou_hand_computed():
    # 1[p ≥ 0.5] = [[1, 1], [0, 1]], y = [[1, 1], [0, 0]]: |∩| = 2, |∪| = 3 + 2 − 2 = 3 → 2/3
    got = calc_iou(torch.sigmoid(LOGITS_1122), TARGET_1122)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(2 / 3, rel=1e-6)


def test_calc_iou_matches_reference_and_has_no_grad(rand_batch):
    x, y, _ = rand_batch
    prob = torch.sigmoid(x).requires_grad_(True)
    got = calc_iou(prob, y)
    assert not got.requires_grad
    np.testing.assert_allclose(got.numpy(), ref_iou(prob.detach().numpy(), y.numpy()), rtol=1e-10)


def test_iou_prediction_loss_is_mse():
    pred = torch.tensor([[0.5, 1.0, 0.0], [0.2, 0.2, 0.2]])
    tgt = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.4, 0.0]])
    # row 0: (0.25 + 0 + 1)/3; row 1: (0 + 0.04 + 0.04)/3
    assert_close(iou_prediction_loss(pred, tgt), torch.tensor([1.25 / 3, 0.08 / 3]))
    assert iou_prediction_loss(pred, tgt).mean().item() == pytest.approx(
        torch.nn.functional.mse_loss(pred, tgt).item()
    )


# ---------- multimask and the total (spec §5.7, A4) ----------


def test_multimask_min_picks_best_output_per_sample():
    loss_nm = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 0.7]], requires_grad=True)
    loss_n, best_n = multimask_min_loss(loss_nm)
    assert best_n.tolist() == [1, 0]
    assert loss_n.tolist() == [1.0, 0.5]
    loss_n.sum().backward()
    assert loss_nm.grad.tolist() == [[0, 1, 0], [1, 0, 0]]


def test_sam_loss_single_output_is_20_1_1(rand_batch):
    x, y, c = rand_batch
    iou_pred = torch.tensor([[0.1], [0.5], [0.9]], dtype=x.dtype)
    out = sam_loss(x, iou_pred, y, c)
    focal = ref_focal(x.numpy(), y.numpy(), c.numpy())
    dice = ref_dice(x.numpy(), y.numpy(), c.numpy())
    iou = (iou_pred[:, 0].numpy() - ref_iou(torch.sigmoid(x).numpy(), y.numpy())) ** 2
    np.testing.assert_allclose(out["focal"].numpy(), focal, rtol=1e-10)
    np.testing.assert_allclose(out["dice"].numpy(), dice, rtol=1e-10)
    np.testing.assert_allclose(out["iou"].numpy(), iou, rtol=1e-6)
    np.testing.assert_allclose(out["loss"].numpy(), 20 * focal + dice + iou, rtol=1e-6)
    assert out["best"].tolist() == [0, 0, 0]


def test_sam_loss_multimask_takes_min_mask_loss_and_iou_on_all_outputs():
    g = torch.Generator().manual_seed(2)
    y = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).double()
    c = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    logits[0, 2] = (2 * y[0, 0] - 1) * 8  # sample 0: output 2 is almost perfect
    logits[1, 1] = (2 * y[1, 0] - 1) * 8  # sample 1: output 1
    iou_pred = torch.rand(2, 3, generator=g, dtype=torch.float64)
    out = sam_loss(logits.clone().requires_grad_(True), iou_pred, y, c)
    assert out["best"].tolist() == [2, 1]
    per_out = np.stack(
        [
            20 * ref_focal(logits[:, j : j + 1].numpy(), y.numpy(), c.numpy())
            + ref_dice(logits[:, j : j + 1].numpy(), y.numpy(), c.numpy())
            for j in range(3)
        ],
        axis=1,
    )
    np.testing.assert_allclose(out["mask"].detach().numpy(), per_out.min(1), rtol=1e-10)
    probs = torch.sigmoid(logits).numpy()
    tgt = np.stack([ref_iou(probs[:, j], y[:, 0].numpy()) for j in range(3)], 1)
    mse = ((iou_pred.numpy() - tgt) ** 2).mean(1)
    np.testing.assert_allclose(out["iou"].numpy(), mse, rtol=1e-6)


def test_sam_loss_gradient_only_through_chosen_output():
    y = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = (2 * y[0, 0] - 1) * 6
    logits.requires_grad_(True)
    sam_loss(logits, torch.zeros(1, 3), y)["mask"].sum().backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0


def test_combined_loss_mixed_batch_labeled_rows_use_plain_loss(rand_batch):
    x, y, c = rand_batch
    iou_pred = torch.full((3, 1), 0.5, dtype=x.dtype)
    is_pseudo = torch.tensor([True, False, True])
    out = combined_loss(x, iou_pred, y, c, is_pseudo_n=is_pseudo)
    c_mixed = c.clone()
    c_mixed[1] = 1.0  # a human label has u ≡ 0
    per = sam_loss(x, iou_pred, y, c_mixed)
    for k in ("loss", "mask", "focal", "dice", "iou"):
        assert_close(out[k], per[k].mean())
    # the labeled row equals the plain SAM loss
    plain = sam_loss(x[1:2], iou_pred[1:2], y[1:2])
    assert_close(per["loss"][1], plain["loss"][0])
    # all labeled: certainty None gives the same as is_pseudo all False
    none = combined_loss(x, iou_pred, y)
    all_labeled = combined_loss(x, iou_pred, y, c, is_pseudo_n=torch.zeros(3, dtype=torch.bool))
    assert_close(none["loss"], all_labeled["loss"])


def test_combined_loss_averages_per_image_then_over_images(rand_batch):
    x, y, c = rand_batch
    iou_pred = torch.full((3, 1), 0.5, dtype=x.dtype)
    per = sam_loss(x, iou_pred, y, c)["loss"]
    out = combined_loss(x, iou_pred, y, c, image_ids_n=torch.tensor([7, 7, 3]))
    # image 7 holds masks 0 and 1, image 3 mask 2: ((l0 + l1)/2 + l2)/2
    assert_close(out["loss"], ((per[0] + per[1]) / 2 + per[2]) / 2)


def test_custom_weights():
    w = LossWeights(focal=1.0, dice=0.0, iou=0.0)
    out = sam_loss(LOGITS_1122, torch.zeros(1, 1, dtype=torch.float64), TARGET_1122, weights=w)
    assert out["loss"].item() == pytest.approx(math.log(2) / 16 + math.log(4 / 3) / 64)


def test_shapes_must_be_4d():
    with pytest.raises(ValueError, match="D4"):
        uncertainty_aware_focal_loss(LOGITS_1122[0], TARGET_1122[0])
    with pytest.raises(ValueError, match="certainty"):
        uncertainty_aware_dice_loss(LOGITS_1122, TARGET_1122, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="iou_pred"):
        sam_loss(LOGITS_1122, torch.zeros(1, 3), TARGET_1122)
