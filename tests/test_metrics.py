"""Metrics of spec §10.2 against hand-computed values, pycocotools and a brute-force Boundary IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_utils

from sum.data.masks import mask_iou, mask_iou_matrix
from sum.eval.metrics import (
    aggregate,
    boundary_dilation,
    boundary_iou,
    dataset_mean,
    mask_iou_batch,
    mask_to_boundary,
    noc,
    overall_mean,
    task_means,
)

# ---------------------------------------------------------------- independent reference


def brute_boundary(mask: np.ndarray, ratio: float) -> np.ndarray:
    """Boundary-iou-api definition written out: a mask pixel is interior iff the (2d+1)² window
    around it, with everything beyond the image counted as background, is all foreground."""
    h, w = mask.shape
    d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
    padded = np.pad(mask.astype(bool), d, constant_values=False)
    interior = sliding_window_view(padded, (2 * d + 1, 2 * d + 1)).all(axis=(-2, -1))
    return mask.astype(bool) & ~interior


def brute_boundary_iou(gt: np.ndarray, pred: np.ndarray, ratio: float) -> float:
    bg, bp = brute_boundary(gt, ratio), brute_boundary(pred, ratio)
    union = (bg | bp).sum()
    return float((bg & bp).sum() / union) if union else 0.0


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def hand_masks(h: int = 48, w: int = 64) -> dict[str, np.ndarray]:
    """Masks that stress the boundary definition."""
    out = {}
    out["empty"] = np.zeros((h, w), bool)
    out["full"] = np.ones((h, w), bool)
    hline = np.zeros((h, w), bool)
    hline[20, 5:60] = True
    out["hline_1px"] = hline
    out["diag_1px"] = np.eye(h, w, k=3, dtype=bool)
    vline_border = np.zeros((h, w), bool)
    vline_border[:, 0] = True
    out["vline_on_border"] = vline_border
    holed = disk(h, w, 24, 30, 18) & ~disk(h, w, 24, 30, 6) & ~disk(h, w, 12, 22, 2)
    out["disk_with_holes"] = holed
    corner = np.zeros((h, w), bool)
    corner[:15, :25] = True
    out["corner_touching_border"] = corner
    band = np.zeros((h, w), bool)
    band[10:40, :] = True
    out["band_across_image"] = band
    out["two_disks"] = disk(h, w, 10, 10, 6) | disk(h, w, 35, 50, 9)
    return out


# ---------------------------------------------------------------- mask IoU


def test_mask_iou_hand_computed():
    a = np.array([[1, 1, 0], [0, 1, 0]])
    b = np.array([[1, 0, 0], [0, 1, 1]])
    assert mask_iou(a, b) == pytest.approx(2 / 4)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, 1 - a) == 0.0
    c = np.zeros((4, 4), bool)
    c[:2, :2] = True  # 4 px
    d = np.zeros((4, 4), bool)
    d[1:4, 1:4] = True  # 9 px, overlap 1 px
    assert mask_iou(c, d) == pytest.approx(1 / 12)


def test_mask_iou_empty_cases():
    z = np.zeros((3, 4), bool)
    one = z.copy()
    one[1, 2] = True
    assert mask_iou(z, z) == 0.0  # documented convention: empty union -> 0
    assert mask_iou(z, one) == 0.0  # empty prediction counts 0 (spec §10.2 [REC])
    assert mask_iou(one, z) == 0.0


def test_mask_iou_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="3x4.*3x5"):
        mask_iou(np.zeros((3, 4)), np.zeros((3, 5)))


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_mask_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    masks = list(hand_masks().values())
    masks += [rng.random((48, 64)) < p for p in (0.05, 0.3, 0.7)]
    for pred in masks:
        for gt in masks:
            ref = float(mask_utils.iou([rle(pred)], [rle(gt)], [0])[0, 0])
            assert mask_iou(pred, gt) == pytest.approx(ref, abs=1e-12)


def test_mask_iou_batch_matches_single_and_broadcasts():
    rng = np.random.default_rng(1)
    preds = rng.random((5, 16, 20)) < 0.4
    preds[2] = False
    gts = rng.random((5, 16, 20)) < 0.4
    gts[2] = False
    batch = mask_iou_batch(preds, gts)
    assert batch.shape == (5,) and batch.dtype == np.float64
    np.testing.assert_allclose(batch, [mask_iou(p, g) for p, g in zip(preds, gts)])
    # oracle-of-3: three outputs against one ground truth
    one = mask_iou_batch(preds[:3], gts[0])
    np.testing.assert_allclose(one, [mask_iou(p, gts[0]) for p in preds[:3]])
    with pytest.raises(ValueError):
        mask_iou_batch(preds, gts[:, :, :-1])


# ---------------------------------------------------------------- boundary IoU


def test_boundary_dilation():
    assert boundary_dilation(20, 20) == 1  # 0.02 * 28.3 = 0.57 -> 1
    assert boundary_dilation(3, 4) == 1  # 0.1 rounds to 0, floor of 1
    assert boundary_dilation(300, 400) == 10  # 0.02 * 500
    assert boundary_dilation(48, 64, 0.05) == 4  # 0.05 * 80


@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.1])
def test_mask_to_boundary_matches_brute_force(ratio):
    for name, m in hand_masks().items():
        np.testing.assert_array_equal(mask_to_boundary(m, ratio), brute_boundary(m, ratio), err_msg=name)


def test_mask_to_boundary_matches_scipy_iterated_erosion():
    ndimage = pytest.importorskip("scipy.ndimage")
    for name, m in hand_masks().items():
        d = boundary_dilation(*m.shape, 0.05)
        eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3)), iterations=d, border_value=0)
        np.testing.assert_array_equal(mask_to_boundary(m, 0.05), m & ~eroded, err_msg=name)


def test_mask_to_boundary_special_cases():
    masks = hand_masks()
    assert not mask_to_boundary(masks["empty"]).any()
    # thin structures are all boundary
    np.testing.assert_array_equal(mask_to_boundary(masks["hline_1px"]), masks["hline_1px"])
    np.testing.assert_array_equal(mask_to_boundary(masks["vline_on_border"]), masks["vline_on_border"])
    # the image border is an edge: the full mask's boundary is a frame of width d = 2 (0.02 * 80 = 1.6)
    full = mask_to_boundary(masks["full"])
    frame = np.ones((48, 64), bool)
    frame[2:-2, 2:-2] = False
    np.testing.assert_array_equal(full, frame)
    # holes have boundary around them too
    holed = masks["disk_with_holes"]
    assert mask_to_boundary(holed)[24, 30 + 7]  # just outside the 6-px central hole


def test_boundary_iou_hand_computed():
    gt = np.zeros((20, 20), bool)
    gt[5:10, 5:10] = True
    pred = np.zeros((20, 20), bool)
    pred[5:10, 6:11] = True
    # d = 1: each boundary is the 16-px outer ring of its 5x5 square; the rings share the
    # 4 + 4 pixels of their top and bottom rows at columns 6..9.
    assert boundary_iou(gt, pred) == pytest.approx(8 / 24)
    assert mask_iou(pred, gt) == pytest.approx(20 / 30)
    assert boundary_iou(gt, gt) == 1.0


def test_boundary_iou_matches_brute_force():
    rng = np.random.default_rng(2)
    masks = hand_masks()
    names = list(masks)
    pairs = [(a, b) for a in names for b in names]
    pairs = [pairs[i] for i in rng.choice(len(pairs), size=30, replace=False)]
    pairs += [("two_disks", "disk_with_holes"), ("corner_touching_border", "band_across_image"), ("empty", "empty")]
    for ratio in (0.02, 0.05):
        for a, b in pairs:
            got = boundary_iou(masks[a], masks[b], ratio)
            assert got == pytest.approx(brute_boundary_iou(masks[a], masks[b], ratio), abs=1e-12), (a, b, ratio)
            assert got == pytest.approx(boundary_iou(masks[b], masks[a], ratio)), "symmetric"


def test_boundary_iou_matches_boundary_iou_api_on_thin_holed_and_border_masks():
    from conftest import api_boundary_iou

    masks = hand_masks()
    names = [n for n in masks if n != "empty"]
    for ratio in (0.02, 0.05):
        for a in names:
            for b in names:
                want = api_boundary_iou(masks[a], masks[b], ratio)
                assert boundary_iou(masks[a], masks[b], ratio) == pytest.approx(want, abs=1e-12), (a, b, ratio)


def test_boundary_iou_empty_cases():
    z = np.zeros((10, 12), bool)
    one = z.copy()
    one[3:6, 3:6] = True
    assert boundary_iou(z, z) == 0.0
    assert boundary_iou(one, z) == 0.0
    assert boundary_iou(z, one) == 0.0


def test_boundary_iou_is_stricter_than_iou_on_a_large_mask():
    gt = disk(96, 128, 48, 64, 40)
    pred = disk(96, 128, 48, 66, 40)  # shifted by 2 px
    assert boundary_iou(gt, pred) < mask_iou(pred, gt)


# ---------------------------------------------------------------- NoC


def test_noc_hand_sequences():
    ious = [0.50, 0.80, 0.86, 0.89, 0.91, 0.95]
    assert noc(ious, 0.85) == 3
    assert noc(ious, 0.90) == 5
    assert noc([0.9, 0.2], 0.85) == 1  # first round already there
    assert noc([0.85], 0.85) == 1  # reached means >=
    assert noc([0.5, 0.6, 0.7], 0.9) == 3  # never reached: the click budget
    assert noc([0.5, 0.6, 0.7], 0.9, max_clicks=20) == 20
    assert noc([0.5, 0.6, 0.95], 0.9, max_clicks=2) == 2  # rounds past the budget do not count
    assert noc([0.1, 0.92, 0.3], 0.9) == 2  # a later drop does not undo it


def test_noc_rejects_percentages_and_empty():
    with pytest.raises(ValueError, match="fraction"):
        noc([0.9], 85)
    with pytest.raises(ValueError):
        noc([], 0.85)


# ---------------------------------------------------------------- aggregation

# Paper Tab. 5, SUM column, mIoU (spec §11.8): 14 datasets, reported averages 81.2 / 69.1 / 44.6
# and "All" 65.5; the mean of the three task means would be 65.0.
TAB5_SUM = {
    "COIFT": 91.0, "DIS-VD": 66.1, "HRSOD": 86.8, "ThinObject5K": 85.7, "BIG": 79.5, "VOCEVAL": 78.0,
    "EntitySeg-0": 67.2, "EntitySeg-1": 69.0, "EntitySeg-2": 71.0,
    "Bodypart": 54.4, "EasyPortrait": 45.2, "Fashionpedia": 48.4, "Fashionpedia-subpart": 31.6, "PACO": 43.4,
}  # fmt: skip
TAB5_TASK = {name: "salient" for name in list(TAB5_SUM)[:6]}
TAB5_TASK |= {name: "entity" for name in list(TAB5_SUM)[6:9]}
TAB5_TASK |= {name: "part" for name in list(TAB5_SUM)[9:]}


def test_aggregation_reproduces_paper_table5():
    tasks = task_means(TAB5_SUM, TAB5_TASK)
    assert list(tasks) == ["salient", "entity", "part"]
    assert round(tasks["salient"], 1) == 81.2
    assert round(tasks["entity"], 1) == 69.1
    assert round(tasks["part"], 1) == 44.6
    assert round(overall_mean(TAB5_SUM), 1) == 65.5
    assert round(float(np.mean(list(tasks.values()))), 1) == 65.0  # the rule it is not


def test_aggregate_from_per_mask_scores():
    per_mask = {"A": [1.0, 0.5], "B": [0.2], "C": [0.4, 0.6, 0.8]}
    out = aggregate(per_mask, {"A": "salient", "B": "salient", "C": "part"})
    assert out["datasets"] == pytest.approx({"A": 0.75, "B": 0.2, "C": 0.6})
    assert out["tasks"] == pytest.approx({"salient": 0.475, "part": 0.6})
    assert out["overall"] == pytest.approx((0.75 + 0.2 + 0.6) / 3)  # not the mean over all 6 masks
    assert dataset_mean([0.25, 0.75]) == 0.5


def test_aggregation_errors_name_the_dataset():
    with pytest.raises(ValueError, match="'X'"):
        task_means({"X": 0.5}, {"A": "salient"})
    with pytest.raises(ValueError, match="'B'"):
        aggregate({"A": [0.5], "B": []}, {"A": "salient", "B": "salient"})
    with pytest.raises(ValueError):
        overall_mean({})


def test_iou_matrix_equals_pycocotools():
    """Every pair of 5 x 4 random masks (one empty on each side) against pycocotools' ``iou``."""
    rng = np.random.default_rng(7)
    a = rng.random((5, 37, 53)) < rng.random((5, 1, 1))
    b = rng.random((4, 37, 53)) < rng.random((4, 1, 1))
    a[2] = False
    b[1] = False
    got = mask_iou_matrix(a, b)
    ref = mask_utils.iou([rle(m) for m in a], [rle(m) for m in b], [0] * len(b))
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert got[2, 1] == 0.0  # both empty
    with pytest.raises(ValueError, match="cannot be compared"):
        mask_iou_matrix(a, b[:, :, :50])


def test_device_metrics_equal_the_numpy_ones():
    """`mask_iou_t` and `boundary_iou_t` on torch masks give `mask_iou_batch` and `boundary_iou`
    exactly, on random blobs of several sizes (the erosion's d changes with the diagonal), with an
    empty pair and a full mask cut by the border."""
    import cv2
    import torch

    from sum.eval.metrics import boundary_iou_t, mask_iou_t

    rng = np.random.default_rng(4)
    for h, w in [(20, 31), (97, 64), (150, 211)]:
        g = np.stack([cv2.GaussianBlur(rng.random((h, w)), (0, 0), 5) > 0.5 for _ in range(5)])
        p = np.stack([cv2.GaussianBlur(rng.random((h, w)), (0, 0), 5) > 0.5 for _ in range(5)])
        g[0], p[0] = False, False
        g[1] = True
        np.testing.assert_array_equal(mask_iou_t(torch.from_numpy(p), torch.from_numpy(g)).numpy(), mask_iou_batch(p, g))
        want = [boundary_iou(g[i], p[i]) for i in range(5)]
        np.testing.assert_array_equal(boundary_iou_t(torch.from_numpy(g), torch.from_numpy(p)).numpy(), want)
