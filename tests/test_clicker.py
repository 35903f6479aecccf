"""Click simulator of spec §10.3 on masks whose right click is known."""

from __future__ import annotations

import numpy as np
import pytest

from sum.eval.clicker import Click, boundary_click, click_arrays, first_click, interior_distance, next_click


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def reference_click(region: np.ndarray) -> tuple[int, int, float]:
    """Independent interior-most point: scipy's exact EDT of the zero-padded region, first argmax."""
    ndimage = pytest.importorskip("scipy.ndimage")
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), region.shape)
    return int(x), int(y), float(dist.max())


def test_interior_distance_is_exact_euclidean_with_border_as_edge():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    masks = [disk(40, 50, 20, 25, 15), rng.random((40, 50)) < 0.8, np.ones((7, 9), bool)]
    for m in masks:
        expected = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        np.testing.assert_allclose(interior_distance(m), expected, rtol=1e-6)
    # by hand: a 3x5 block on the image border
    block = np.ones((3, 5), bool)
    np.testing.assert_allclose(interior_distance(block)[1], [1, 2, 2, 2, 1])


def test_first_click_ring_lands_in_thick_part():
    # hole shifted left: the ring is thickest on the right
    ring = disk(64, 64, 32, 32, 24) & ~disk(64, 64, 32, 24, 8)
    c = first_click(ring)
    assert c.label == 1
    assert ring[c.y, c.x]
    assert c.x > 40  # right of the hole, in the thick part
    assert (c.x, c.y) == reference_click(ring)[:2]


def test_first_click_two_blobs_picks_larger_centre():
    gt = disk(60, 80, 15, 15, 6) | disk(60, 80, 35, 50, 12)
    assert first_click(gt) == Click(50, 35, 1)


def test_first_click_ties_go_to_first_in_row_major_order():
    gt = np.zeros((30, 30), bool)
    gt[20:25, 2:7] = True  # same 5x5 squares, this one lower
    gt[3:8, 20:25] = True  # this one higher: first in row-major order
    assert first_click(gt) == Click(22, 5, 1)
    side = np.zeros((10, 30), bool)
    side[2:7, 20:25] = True
    side[2:7, 3:8] = True  # same rows: the left one wins
    assert first_click(side) == Click(5, 4, 1)


def test_first_click_image_border_counts_as_boundary():
    gt = np.zeros((21, 40), bool)
    gt[5:16, :11] = True  # an 11x11 square cut by the left image border
    # padded depth min(x + 1, 11 - x, y - 4, 16 - y) peaks only at the centre (5, 10); unpadded,
    # column 0 would tie with it and win in row-major order
    assert first_click(gt) == Click(5, 10, 1)
    # whole image: depth min(x + 1, 7 - x, y + 1, 5 - y) is 3 on row 2 for x 2..4 -> first is x = 2
    assert first_click(np.ones((5, 7), bool)) == Click(2, 2, 1)


def test_first_click_equals_next_click_from_empty_prediction():
    gt = disk(50, 50, 20, 28, 13) & ~disk(50, 50, 20, 28, 3)
    assert next_click(gt, np.zeros_like(gt)) == first_click(gt)


def test_first_click_rejects_empty_ground_truth():
    with pytest.raises(ValueError, match="empty"):
        first_click(np.zeros((4, 4), bool))


def test_next_click_negative_when_false_positive_dominates():
    gt = np.zeros((60, 60), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[5:8, 5:8] = False  # small false negative (3x3 corner)
    pred[35:56, 30:51] = True  # large false positive, 21x21, centre (40, 45)
    c = next_click(gt, pred)
    assert c == Click(40, 45, 0)
    assert pred[c.y, c.x] and not gt[c.y, c.x]
    assert (c.x, c.y) == reference_click(pred & ~gt)[:2]


def test_next_click_positive_when_false_negative_dominates():
    gt = np.zeros((60, 60), bool)
    gt[5:30, 5:30] = True  # 25x25
    pred = np.zeros_like(gt)
    pred[5:30, 5:12] = True  # covers the left strip: the false negative is 25 x 18
    pred[40:45, 40:45] = True  # small false positive
    c = next_click(gt, pred)
    assert c.label == 1
    assert gt[c.y, c.x] and not pred[c.y, c.x]
    assert (c.x, c.y) == reference_click(gt & ~pred)[:2]
    # FN is x 12..29, y 5..29: depth min(x - 11, 30 - x, y - 4, 30 - y) peaks at 9 for x in {20, 21},
    # y in 13..21; the first of those in row-major order is (20, 13).
    assert c == Click(20, 13, 1)


def test_next_click_compares_depth_not_area():
    # FP: a long 1-px line (area 50, depth 1); FN: a 3x3 block (area 9, depth 2) -> positive
    gt = np.zeros((20, 60), bool)
    gt[10:13, 10:13] = True
    pred = np.zeros_like(gt)
    pred[2, 5:55] = True
    c = next_click(gt, pred)
    assert c == Click(11, 11, 1)


def test_next_click_depth_tie_goes_positive():
    gt = np.zeros((20, 20), bool)
    gt[2:5, 2:5] = True  # FN 3x3
    pred = np.zeros_like(gt)
    pred[12:15, 12:15] = True  # FP 3x3, same depth
    assert next_click(gt, pred) == Click(3, 3, 1)


def test_next_click_none_without_error_and_skips_clicked_pixels():
    gt = disk(30, 30, 15, 15, 8)
    assert next_click(gt, gt.copy()) is None
    pred = np.zeros_like(gt)
    first = next_click(gt, pred)
    second = next_click(gt, pred, clicked=[first])
    assert second is not None and (second.x, second.y) != (first.x, first.y)
    one_px = np.zeros((5, 5), bool)
    one_px[2, 2] = True
    assert next_click(one_px, np.zeros_like(one_px), clicked=[Click(2, 2, 1)]) is None


def test_next_click_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="5x6.*5x5"):
        next_click(np.ones((5, 5)), np.ones((5, 6)))


def test_boundary_click_is_row_major_median_of_band():
    gt = np.zeros((40, 50), bool)
    gt[5:35, 5:45] = True  # 30 x 40
    # erosion by 10 leaves rows 15..24, cols 15..34; the band has 1200 - 200 = 1000 pixels:
    # rows 5..14 give 400, then 20 per row (cols 5..14 and 35..44); index 500 is row 20, col 5.
    c = boundary_click(gt)
    assert c == Click(5, 20, 1)
    assert gt[c.y, c.x]


def test_boundary_click_matches_scipy_band_and_border_convention():
    ndimage = pytest.importorskip("scipy.ndimage")
    gt = disk(60, 70, 30, 10, 22)  # cut by the left image border
    for border_is_edge, border_value in ((False, 1), (True, 0)):
        eroded = ndimage.binary_erosion(gt, structure=np.ones((3, 3)), iterations=10, border_value=border_value)
        pts = np.argwhere(gt & ~eroded)
        y, x = pts[len(pts) // 2]
        assert boundary_click(gt, border_is_edge=border_is_edge) == Click(int(x), int(y), 1)
    # without the border as edge no band pixel lies on column 0
    eroded = ndimage.binary_erosion(gt, structure=np.ones((3, 3)), iterations=10, border_value=1)
    assert not (gt & ~eroded)[25:36, 0].any()


def test_boundary_click_whole_image_mask_and_errors():
    assert boundary_click(np.ones((5, 7), bool)) == Click(3, 2, 1)  # empty band: median of the mask
    with pytest.raises(ValueError, match="empty"):
        boundary_click(np.zeros((5, 5), bool))


def test_click_arrays():
    coords, labels = click_arrays([Click(3, 4, 1), Click(10, 2, 0)])
    np.testing.assert_array_equal(coords, [[3, 4], [10, 2]])
    np.testing.assert_array_equal(labels, [1, 0])
    coords, labels = click_arrays([])
    assert coords.shape == (0, 2) and labels.shape == (0,)


def blobs(rng, k: int, h: int, w: int, sigma: float = 3.0) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(rng.random((h, w)), (0, 0), sigma) > 0.5 for _ in range(k)])


def test_interior_distance_sq_is_scipys_exact_transform_squared():
    """The batched torch transform against scipy's EDT of the zero-padded masks (small chunks so
    that the chunk loop runs), and a hand-made case: a 3x5 block on the border."""
    import torch
    from scipy import ndimage

    from sum.eval.clicker import interior_distance_sq

    rng = np.random.default_rng(1)
    masks = np.concatenate([blobs(rng, 4, 33, 47), (rng.random((2, 33, 47)) < 0.8), np.ones((1, 33, 47), bool),
                            disk(33, 47, 16, 20, 12)[None], np.zeros((1, 33, 47), bool)])
    got = interior_distance_sq(torch.from_numpy(masks), chunk_elems=3000).numpy()
    want = np.stack([ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] ** 2 for m in masks])
    np.testing.assert_array_equal(got, np.rint(want).astype(np.int64))
    block = interior_distance_sq(torch.ones((1, 3, 5), dtype=torch.bool))[0].numpy()
    np.testing.assert_array_equal(block, [[1, 1, 1, 1, 1], [1, 4, 4, 4, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"expected \(B, H, W\)"):
        interior_distance_sq(torch.ones((3, 5)))


def test_batched_next_clicks_equal_the_per_mask_clicker(monkeypatch):
    """`next_clicks` on random masks and predictions, with earlier clicks excluded, gives the clicks
    of `next_click` (computed with scipy's exact transform: cv2's rounds ties at 1e-6)."""
    import torch
    from scipy import ndimage

    import sum.eval.clicker as clicker

    monkeypatch.setattr(clicker, "interior_distance",
                        lambda m: ndimage.distance_transform_edt(np.pad(np.asarray(m, bool), 1))[1:-1, 1:-1])
    rng = np.random.default_rng(2)
    gt, pred = blobs(rng, 12, 40, 53), blobs(rng, 12, 40, 53, sigma=4.0)
    pred[0] = gt[0]  # no error: no click
    pred[1] = ~gt[1]
    clicked = [[clicker.first_click(g)] if g.any() else [] for g in gt]
    clicked_khw = np.zeros_like(gt)
    for i, cs in enumerate(clicked):
        for c in cs:
            clicked_khw[i, c.y, c.x] = True
    xy, label, has = clicker.next_clicks(torch.from_numpy(gt), torch.from_numpy(pred), torch.from_numpy(clicked_khw))
    for i in range(len(gt)):
        want = clicker.next_click(gt[i], pred[i], clicked[i])
        got = Click(int(xy[i, 0]), int(xy[i, 1]), int(label[i])) if bool(has[i]) else None
        assert got == want, i
    assert not bool(has[0]) and bool(has[1:].all())
