"""Prompt sampling (spec §6) and the round schedule (spec §7)."""

import numpy as np
import pytest
import torch

from sum.data.prompts import sample_first_points
from sum.train.sampling import (
    PROMPT_BOX_OR_POINT,
    PROMPT_ERROR_POINT,
    PROMPT_NONE,
    add_jitter_to_boxes,
    masks_to_boxes,
    round_schedule,
    sample_error_click,
    sample_error_clicks,
    sample_first_point,
    sample_first_prompt_is_box,
)


def assert_close(actual, expected, atol=1e-8, rtol=1e-6):
    # not torch.testing.assert_close: its first call imports torch.distributed (seconds)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)

# Upper 0.1% points of the chi-square distribution (standard tables), by degrees of freedom.
CHI2_CRIT_0001 = {1: 10.828, 3: 16.266, 6: 22.458, 7: 24.322}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def chi_square(observed, weights):
    """Pearson's statistic; scipy is not a project dependency (and costs seconds to import)."""
    observed = np.asarray(observed, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    expected = weights / weights.sum() * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def counts_at(coords_k2, h, w):
    idx = (coords_k2[:, 1] * w + coords_k2[:, 0]).long()
    return torch.bincount(idx, minlength=h * w).numpy()


# 3x3 target with 8 pixels in the mask; certainty c = 1 − u, zero at (row 1, col 1).
MASK_33 = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.float32)
CERT_33 = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.5], [0.9, 0.6, 0.8]])


# ---------- first point (spec §6.2) ----------


def test_first_point_never_where_certainty_zero_or_outside_mask():
    k = 3000
    out = sample_first_points(
        MASK_33.expand(k, 1, 3, 3), CERT_33.expand(k, 1, 3, 3), generator=gen(1)
    )
    assert out.coords.shape == (k, 1, 2) and out.labels.shape == (k, 1)
    assert (out.labels == 1).all() and not out.is_fallback.any()
    counts = counts_at(out.coords[:, 0], 3, 3)
    assert counts[1 * 3 + 1] == 0  # c = 0
    assert counts[2 * 3 + 0] == 0  # outside the mask (even though c = 0.9 there)


def test_first_point_frequencies_match_certainty_weights():
    k = 4000
    out = sample_first_points(
        MASK_33.expand(k, 1, 3, 3), CERT_33.expand(k, 1, 3, 3), generator=gen(2)
    )
    counts = counts_at(out.coords[:, 0], 3, 3)
    w = (MASK_33 * CERT_33).flatten().numpy()
    support = w > 0  # 7 cells: df = 6
    assert chi_square(counts[support], w[support]) < CHI2_CRIT_0001[6], (counts, w)


def test_first_point_uniform_over_mask_without_certainty():
    k = 3000
    out = sample_first_points(MASK_33.expand(k, 1, 3, 3), generator=gen(3))
    counts = counts_at(out.coords[:, 0], 3, 3)
    assert counts[6] == 0
    inside = MASK_33.flatten().bool().numpy()
    assert chi_square(counts[inside], np.ones(8)) < CHI2_CRIT_0001[7]


def test_first_point_coords_are_xy():
    mask = torch.zeros(4, 6)
    mask[3, 5] = 1  # row 3, column 5 → (x, y) = (5, 3)
    out = sample_first_point(mask, generator=gen())
    assert out.coords.tolist() == [5.0, 3.0] and out.labels.item() == 1


def test_single_and_batched_draw_the_same():
    a = sample_first_point(MASK_33, CERT_33, generator=gen(9))
    b = sample_first_points(MASK_33[None, None], CERT_33[None, None], generator=gen(9))
    assert a.coords.tolist() == b.coords[0, 0].tolist()


def test_first_point_fallbacks():
    certainty_zero = torch.zeros(1, 1, 3, 3)
    backup = torch.tensor([[7.0, 8.0]])
    out = sample_first_points(
        MASK_33[None, None], certainty_zero, generator=gen(), backup_points_k2=backup
    )
    assert out.coords[0, 0].tolist() == [7.0, 8.0]
    assert out.labels.item() == 1 and out.is_fallback.item()
    # no backup: a uniform point inside the mask
    out = sample_first_points(MASK_33[None, None], certainty_zero, generator=gen())
    x, y = out.coords[0, 0].long().tolist()
    assert MASK_33[y, x] == 1 and out.is_fallback.item()
    with pytest.raises(ValueError, match="empty"):
        sample_first_points(torch.zeros(2, 1, 3, 3), generator=gen())


# ---------- error clicks (spec §6.3-6.4) ----------


def test_error_clicks_positive_in_false_negatives_negative_in_false_positives():
    target = torch.zeros(3, 3)
    target[:, :2] = 1
    pred_fn = torch.zeros(3, 3)
    pred_fn[:, 0] = 1  # column 1 is FN
    pred_fp = target.clone()
    pred_fp[:, 2] = 1  # column 2 is FP
    k = 200
    targets = target.expand(k, 1, 3, 3)
    fn = sample_error_clicks(pred_fn.expand(k, 1, 3, 3), targets, generator=gen(4))
    assert (fn.coords[:, 0, 0] == 1).all() and (fn.labels == 1).all()
    fp = sample_error_clicks(pred_fp.expand(k, 1, 3, 3), targets, generator=gen(5))
    assert (fp.coords[:, 0, 0] == 2).all() and (fp.labels == 0).all()


def test_error_click_label_is_target_and_fn_fp_split_follows_weighted_area():
    target = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=torch.float32)
    # FN = {(0,1), (1,0)}, FP = {(1,2), (2,1), (2,2)}
    cert = torch.tensor([[1.0, 0.2, 1.0], [0.6, 1.0, 0.0], [1.0, 0.3, 0.9]])
    k = 4000
    out = sample_error_clicks(
        pred.expand(k, 1, 3, 3),
        target.expand(k, 1, 3, 3),
        cert.expand(k, 1, 3, 3),
        generator=gen(6),
    )
    xy = out.coords[:, 0].long()
    assert (out.labels[:, 0] == target[xy[:, 1], xy[:, 0]].long()).all()
    counts = counts_at(out.coords[:, 0], 3, 3)
    assert counts[1 * 3 + 2] == 0  # FP pixel with c = 0
    assert counts[0] == counts[4] == counts[2] == counts[5] == counts[6] == 0  # outside R
    # FN weight 0.2 + 0.6 = 0.8, FP weight 0 + 0.3 + 0.9 = 1.2
    n_pos = int((out.labels == 1).sum())
    assert chi_square([n_pos, k - n_pos], [0.8, 1.2]) < CHI2_CRIT_0001[1]
    region = [1, 3, 7, 8]  # cells with positive weight: 0.2, 0.6, 0.3, 0.9
    assert chi_square(counts[region], [0.2, 0.6, 0.3, 0.9]) < CHI2_CRIT_0001[3]


def test_error_click_fallback_keeps_label_one_d11():
    target = torch.zeros(3, 3)
    target[0, 0] = 1
    pred = target.clone()  # no error
    out = sample_error_click(pred, target, generator=gen(), backup_point=torch.tensor([2.0, 1.0]))
    assert out.coords.tolist() == [2.0, 1.0] and out.labels.item() == 1 and out.is_fallback.item()
    # errors only where c = 0: weights sum to zero → fallback with label 1 even for an FP error
    pred_fp = target.clone()
    pred_fp[2, 2] = 1
    cert = torch.ones(3, 3)
    cert[2, 2] = 0
    out = sample_error_click(pred_fp, target, cert, generator=gen())
    assert out.coords.tolist() == [0.0, 0.0] and out.labels.item() == 1 and out.is_fallback.item()
    with pytest.raises(ValueError, match="empty"):
        sample_error_click(torch.zeros(3, 3), torch.zeros(3, 3), generator=gen())


def test_error_clicks_append_to_previous_points():
    target = torch.ones(2, 1, 3, 3)
    pred = torch.zeros(2, 1, 3, 3)
    prev = (torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]]), torch.tensor([[1], [0]]))
    out = sample_error_clicks(pred, target, generator=gen(), previous_points=prev)
    assert out.coords.shape == (2, 2, 2) and out.labels.shape == (2, 2)
    assert out.coords[:, 0].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert out.labels.tolist() == [[1, 1], [0, 1]]


def test_error_click_rejects_logits():
    with pytest.raises(ValueError, match="binar"):
        sample_error_click(torch.randn(3, 3), torch.ones(3, 3), generator=gen())


def test_sampling_is_reproducible_with_the_generator():
    m = MASK_33.expand(50, 1, 3, 3)
    c = CERT_33.expand(50, 1, 3, 3)
    a = sample_first_points(m, c, generator=gen(11)).coords
    b = sample_first_points(m, c, generator=gen(11)).coords
    assert torch.equal(a, b)


# ---------- boxes (spec §6.1, D2) ----------


def test_masks_to_boxes():
    m = torch.zeros(2, 1, 5, 6)
    m[0, 0, 1:3, 2:5] = 1
    assert_close(masks_to_boxes(m), torch.tensor([[2.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))


def test_box_jitter_sum_code_is_nonnegative_translation_capped_at_20():
    k = 2000
    boxes = torch.tensor([[10.0, 20.0, 310.0, 70.0]]).expand(k, 1, 4)  # w = 300, h = 50
    out = add_jitter_to_boxes(boxes, (1000, 1000), generator=gen(7))
    assert out.shape == boxes.shape
    d = out - boxes
    assert_close(d[..., 0], d[..., 2], atol=1e-4, rtol=0)  # a translation
    assert_close(d[..., 1], d[..., 3], atol=1e-4, rtol=0)
    dx, dy = d[..., 0], d[..., 1]
    assert (dx >= 0).all() and (dx <= 20).all() and (dy >= 0).all() and (dy <= 20).all()
    assert 0.4 < (dx == 0).float().mean() < 0.6  # clamp at 0 zeroes about half the draws
    # std 30 px: P(N(0, 30²) > 20) = P(Z > 2/3) ≈ 0.2525 of the draws hit the cap
    assert 0.22 < (dx == 20).float().mean() < 0.285
    # std 5 px: P(N(0, 5²) > 20) ≈ 3e-5
    assert dy.max() < 20 and dy[dy > 0].std() == pytest.approx(5 * 0.6028, rel=0.1)


def test_box_jitter_sam_paper_per_coordinate_within_20():
    k = 2000
    boxes = torch.tensor([[100.0, 100.0, 400.0, 150.0]]).expand(k, 4)
    out = add_jitter_to_boxes(boxes, (1000, 1000), generator=gen(8), mode="sam_paper")
    d = out - boxes
    assert (d.abs() <= 20).all()
    assert (d < 0).any(dim=0).all() and (d > 0).any(dim=0).all()  # both signs on every coordinate
    assert not torch.equal(d[:, 0], d[:, 2])  # independent per coordinate
    assert d[:, 1].std() == pytest.approx(5.0, rel=0.1)  # 10% of h = 50
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()


@pytest.mark.parametrize("mode", ["sum_code", "sam_paper"])
def test_box_jitter_stays_in_image(mode):
    boxes = torch.tensor([[0.0, 0.0, 63.0, 47.0], [50.0, 30.0, 64.0, 48.0], [1.0, 2.0, 3.0, 4.0]])
    for seed in range(20):
        out = add_jitter_to_boxes(boxes, (48, 64), generator=gen(seed), mode=mode)
        assert (out >= 0).all()
        assert (out[:, [0, 2]] <= 64).all() and (out[:, [1, 3]] <= 48).all()


def test_box_jitter_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        add_jitter_to_boxes(torch.zeros(1, 4), (8, 8), generator=gen(), mode="other")


# ---------- rounds (spec §7) ----------


def test_round_schedule_default_seven_rounds():
    rounds = round_schedule()
    assert [r.index for r in rounds] == list(range(1, 8))
    expected = [PROMPT_BOX_OR_POINT] + [PROMPT_ERROR_POINT] * 5 + [PROMPT_NONE]
    assert [r.new_prompt for r in rounds] == expected
    assert [r.task_prompt_on for r in rounds] == [True] + [False] * 6
    assert [r.multimask for r in rounds] == [True] + [False] * 6
    assert [r.mask_input for r in rounds] == [False] + [True] * 6
    assert [r.n_prompts for r in rounds] == [1, 2, 3, 4, 5, 6, 6]


def test_round_schedule_ablations_and_checks():
    assert all(r.task_prompt_on for r in round_schedule(continuous_task_prompt=True))
    assert not any(r.task_prompt_on for r in round_schedule(use_task_prompt=False))
    one = round_schedule(1, n_refinement_rounds=0)
    assert len(one) == 1 and one[0].multimask and one[0].task_prompt_on
    with pytest.raises(ValueError):
        round_schedule(1)


def test_first_prompt_type_is_box_half_the_time():
    is_box = sample_first_prompt_is_box(4000, generator=gen(10))
    n_box = int(is_box.sum())
    assert chi_square([n_box, 4000 - n_box], [1, 1]) < CHI2_CRIT_0001[1]


def test_error_clicks_without_host_sync_match_where_there_is_an_error(monkeypatch):
    """The accelerator path of `sample_error_clicks` (forced on the CPU here): no value read on
    the host (a tensor's ``__bool__`` fails), the same clicks where the error region is non-empty
    (the region's draw comes first from the same generator), and the D11 fallback elsewhere: label
    1 inside the target, or the backup point."""
    import sum.train.sampling as sampling

    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((6, 1, 9, 11)) < 0.5)
    pred = torch.from_numpy(rng.random((6, 1, 9, 11)) < 0.5)
    pred[2] = target[2]  # no error: fallback
    want = sampling.sample_error_clicks(pred, target, generator=gen(5))
    monkeypatch.setattr(sampling, "host_syncs_are_free", lambda device: False)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host sync in the sampler"))
    got = sampling.sample_error_clicks(pred, target, generator=gen(5))
    monkeypatch.undo()
    ok = [0, 1, 3, 4, 5]
    assert got.coords[ok].tolist() == want.coords[ok].tolist() and got.labels[ok].tolist() == want.labels[ok].tolist()
    x, y = (int(v) for v in got.coords[2, 0])
    assert target[2, 0, y, x] and got.labels[2, 0].item() == 1 and got.is_fallback.tolist() == [False, False, True] + [False] * 3
    monkeypatch.setattr(sampling, "host_syncs_are_free", lambda device: False)
    backup = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    got = sampling.sample_error_clicks(pred, target, generator=gen(5), backup_points_k2=backup)
    assert got.coords[2, 0].tolist() == [4.0, 5.0] and got.labels[2, 0].item() == 1
