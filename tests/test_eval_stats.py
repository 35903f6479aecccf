"""Paired differences against the foundation model and their image-bootstrap intervals
(`sum.eval.stats`, the comparison section of table.md): hand-computed estimates, the exact set of
values a cluster bootstrap can take, the interval ends of a two-image benchmark, the verdicts,
and the errors."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from sum.eval.report import compare_to_reference, delta_rows, delta_table
from sum.eval.stats import Delta, image_bootstrap, paired_deltas


def rec(model, dataset, image, ann, iou, protocol="point"):
    iou = list(iou)
    return NS(model=model, protocol=protocol, dataset=dataset, image_id=image, ann_id=ann, iou=iou,
              biou=[v / 2 for v in iou])


def pair(dataset, image, ann, ref, model, name="sum"):
    return [rec("foundation", dataset, image, ann, ref), rec(name, dataset, image, ann, model)]


def test_estimate_is_the_papers_aggregation_of_the_differences():
    # two salient benchmarks (masks 2 + 1) and one part benchmark, two rounds
    records = (
        pair("s1", "a", "1", [0.5, 0.6], [0.7, 0.6])      # +0.2, 0
        + pair("s1", "b", "2", [0.4, 0.4], [0.4, 0.8])    # 0, +0.4
        + pair("s2", "c", "3", [0.9, 0.9], [0.8, 0.9])    # -0.1, 0
        + pair("p", "d", "4", [0.3, 0.5], [0.2, 0.2])     # -0.1, -0.3
    )
    tasks = {"s1": "salient", "s2": "salient", "p": "part"}
    out = paired_deltas(records, tasks, "foundation", "point", samples=0)
    assert list(out) == ["sum"] and list(out["sum"]) == ["salient", "part", "overall"]
    # per benchmark: s1 (0.1, 0.2), s2 (-0.1, 0), p (-0.1, -0.3); salient = mean of s1 and s2
    got = {k: [d.delta for d in v] for k, v in out["sum"].items()}
    assert got["salient"] == pytest.approx([0.0, 0.1])
    assert got["part"] == pytest.approx([-0.1, -0.3])
    assert got["overall"] == pytest.approx([(0.1 - 0.1 - 0.1) / 3, (0.2 + 0 - 0.3) / 3])
    # samples=0: intervals of no width
    assert all(d.lo == d.delta == d.hi for v in out["sum"].values() for d in v)
    assert out["sum"]["salient"][0].n_images == 3 and out["sum"]["salient"][0].n_masks == 3
    # boundary IoU is its own metric
    b = paired_deltas(records, tasks, "foundation", "point", metric="biou", samples=0)
    assert b["sum"]["part"][1].delta == pytest.approx(-0.15)


def test_bootstrap_resamples_whole_images():
    # image 0 holds two masks of difference 1, image 1 one mask of difference 0: drawing images,
    # a replicate's mean is 1 (both draws image 0), 0 (both image 1) or 2/3 (one each); a
    # mask-level bootstrap would also give 1/3
    sums = np.array([[2.0], [0.0]])
    counts = np.array([2.0, 1.0])
    reps = image_bootstrap(sums, counts, 4000, np.random.default_rng(0))
    assert reps.shape == (4000, 1)
    values, n = np.unique(np.round(reps[:, 0], 9), return_counts=True)
    assert list(values) == pytest.approx([0.0, 2 / 3, 1.0])
    assert n / n.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_interval_of_a_two_image_benchmark_spans_the_two_images_widened():
    # differences -0.3 and +0.1, one mask each: replicates -0.3 (1/4), -0.1 (1/2), +0.1 (1/4),
    # widened about the estimate -0.1 by sqrt(2 / 1): so the 95% interval runs from
    # -0.1 - 0.2 sqrt(2) to -0.1 + 0.2 sqrt(2)
    w = np.sqrt(2.0)
    records = pair("p", "a", "1", [0.6], [0.3]) + pair("p", "b", "2", [0.5], [0.6])
    d = paired_deltas(records, {"p": "part"}, "foundation", "point", samples=2000)["sum"]["part"][0]
    assert (d.delta, d.lo, d.hi) == pytest.approx((-0.1, -0.1 - 0.2 * w, -0.1 + 0.2 * w))
    assert d.verdict == "tie"
    # the interval's ends are the (1 - level)/2 and (1 + level)/2 quantiles: at 60% (0.2, 0.8)
    # they are still the two images, at 40% (0.3, 0.7) both are the middle value
    for level, ends in ((0.6, (-0.1 - 0.2 * w, -0.1 + 0.2 * w)), (0.4, (-0.1, -0.1))):
        d = paired_deltas(records, {"p": "part"}, "foundation", "point", samples=4000, level=level)["sum"]["part"][0]
        assert (d.lo, d.hi) == pytest.approx(ends), level


def test_masks_of_one_image_are_drawn_together():
    # image a: two masks of difference +1; image b: one of 0. Drawing images, the replicates are
    # 0 (1/4), 2/3 (1/2), 1 (1/4): the 60% interval is [0, 1] before widening (sqrt 2 about 2/3).
    # Drawing masks instead, 0 has probability 1/27 and the interval would start at 1/3.
    records = pair("p", "a", "1", [0.0], [1.0]) + pair("p", "a", "2", [0.0], [1.0]) + pair("p", "b", "3", [0.5], [0.5])
    d = paired_deltas(records, {"p": "part"}, "foundation", "point", samples=4000, level=0.6)["sum"]["part"][0]
    w = np.sqrt(2.0)
    assert (d.delta, d.lo, d.hi) == pytest.approx((2 / 3, 2 / 3 - w * 2 / 3, 2 / 3 + w / 3))
    assert (d.n_images, d.n_masks) == (2, 3)


def test_a_benchmark_of_one_image_has_no_interval():
    records = pair("p", "a", "1", [0.6], [0.3]) + pair("p", "a", "2", [0.5], [0.4])
    records += pair("q", "b", "3", [0.6], [0.3]) + pair("q", "c", "4", [0.5], [0.4])
    out = paired_deltas(records, {"p": "part", "q": "entity"}, "foundation", "point", samples=100)["sum"]
    assert out["part"][0].delta == pytest.approx(-0.2) and out["part"][0].verdict == "unknown"
    assert np.isnan(out["part"][0].lo) and np.isnan(out["overall"][0].hi)
    assert out["overall"][0].verdict == "unknown" and out["entity"][0].verdict != "unknown"
    text = delta_table({"point": {"sum": out}}, "foundation", 0.95, 100)
    assert "| part | 1 | 2 | −20.0 [n/a] |" in text


def test_same_seed_same_interval_and_a_consistent_loss_is_below():
    rng = np.random.default_rng(1)
    records = []
    for i in range(8):
        for k in range(2):
            ref = float(rng.uniform(0.5, 0.9))
            records += pair("p", f"i{i}", f"{i}-{k}", [ref], [ref - 0.05 - 0.02 * rng.random()])
    a = paired_deltas(records, {"p": "part"}, "foundation", "point", samples=500, seed=3)
    b = paired_deltas(records, {"p": "part"}, "foundation", "point", samples=500, seed=3)
    assert a == b
    # another model, compared too, leaves this one's interval as it was
    extra = [rec("vanilla", r.dataset, r.image_id, r.ann_id, [r.iou[0] + 0.01]) for r in records if r.model == "sum"]
    c = paired_deltas(extra + records, {"p": "part"}, "foundation", "point", samples=500, seed=3)
    assert list(c) == ["vanilla", "sum"] and c["sum"] == a["sum"]
    d = a["sum"]["part"][0]
    assert d.verdict == "below" and d.lo <= d.delta <= d.hi < 0
    assert Delta(0.02, 0.01, 0.03, 1, 1).verdict == "above"


def test_unpaired_masks_and_bad_arguments_are_named():
    records = pair("p", "a", "1", [0.5], [0.6]) + [rec("foundation", "p", "a", "2", [0.4])]
    with pytest.raises(ValueError, match=r"'sum' and reference 'foundation'.*'p'"):
        paired_deltas(records, {"p": "part"}, "foundation", "point")
    ok = pair("p", "a", "1", [0.5], [0.6])
    with pytest.raises(ValueError, match=r"reference model 'base'"):
        paired_deltas(ok, {"p": "part"}, "base", "point")
    with pytest.raises(ValueError, match=r"level=1\.5"):
        paired_deltas(ok, {"p": "part"}, "foundation", "point", level=1.5)
    with pytest.raises(ValueError, match=r"metric='dice'"):
        paired_deltas(ok, {"p": "part"}, "foundation", "point", metric="dice")


def test_table_and_csv_show_every_model_scope_and_round():
    records = []
    for i in range(6):
        records += pair("p", f"i{i}", str(i), [0.8, 0.9, 0.9], [0.6, 0.9, 0.95])
        records += [rec("hq_only", "p", f"i{i}", str(i), [0.8, 0.9, 0.9 + 0.01 * (i - 2.5)])]
    ev = NS(reference="", models={"foundation": "", "sum": "x", "hq_only": "y"}, bootstrap=200, ci_level=0.9)
    deltas = compare_to_reference(records, {"p": "part"}, ev)
    assert set(deltas) == {"iou", "biou"} and list(deltas["iou"]) == ["point"]
    text = delta_table(deltas["iou"], "foundation", 0.9, 200)
    assert "## Against foundation: mIoU difference, 90% interval" in text and "200 bootstrap" in text
    lines = {tuple(c.strip() for c in ln.split("|")[1:4]): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| Task | clicks | masks | sum | hq_only |" in text
    # the reported rounds are 1 and the last; sum: -20 points on every image after 1 click (an
    # interval of no width, below), +5 after 3 (above); hq_only after 1 click: equal
    assert set(lines) == {("Task", "clicks", "masks")} | {
        (s, r, "6") for s in ("part", "**Overall**") for r in ("1", "3")}
    assert "| −20.0 [−20.0, −20.0] ↓ | 0.0 [0.0, 0.0] |" in lines[("part", "1", "6")]
    assert "| +5.0 [+5.0, +5.0] ↑ | " in lines[("**Overall**", "3", "6")]
    header, rows = delta_rows(deltas)
    assert header[:5] == ["metric", "protocol", "model", "scope", "round"]
    assert len(rows) == 2 * 1 * 2 * 2 * 3  # metrics x protocols x models x scopes x rounds
    row = next(r for r in rows if r[:5] == ["iou", "point", "sum", "part", 3])
    assert row[5] == pytest.approx(0.05) and row[8] == "above"
    # nothing to compare: no section
    assert compare_to_reference(records, {"p": "part"}, NS(**{**vars(ev), "bootstrap": 0})) == {}
    only_ref = [r for r in records if r.model == "foundation"]
    assert compare_to_reference(only_ref, {"p": "part"}, ev) == {}
