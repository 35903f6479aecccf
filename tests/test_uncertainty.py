"""Uncertainty maps (spec §4.2): Eq. 3, storage, alignment with pseudo-label records, AUROC."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from sum.model.build import build_sum_model
from sum.model.lowres import upsample_low_res as uncertainty_at
from sum.uncertainty.maps import (
    dequantize_u,
    mask_summary,
    quantize_u,
    read_uncertainty_shard,
    refine_image,
    refine_pseudo_labels,
    uncertainty_map,
    uncertainty_shard,
    write_uncertainty_shard,
)
from sum.uncertainty.refiner import RefinementModule
from sum.data.hidden_gt import granularity_of, load_hidden_gt
from sum.pseudo.coverage import coverage_metrics, coverage_records
from sum.uncertainty.scoring import (
    auroc,
    auroc_by_match_iou,
    average_ranks,
    report_metrics,
    score_image,
    scoring_region,
    summarize,
)


# ---- development pseudo labels (until the pseudolabel stage has run) ---------------------------


def make_dev_pseudo_labels(model, embedding_of, dataset, dataset_name, pseudo_dir, n_images, points_per_side=8):
    """Pseudo labels of the first ``n_images`` of ``dataset`` in the pseudo-label shard format,
    made by SAM's automatic mask generator (`sum.pseudo.amg.MaskGenerator`, which keeps SAM's
    low-res logits) from cached embeddings; one shard. Returns the shard json path."""
    from sum.pseudo.amg import MaskGenerator
    from sum.pseudo.store import ShardImage, write_shard

    gen = MaskGenerator(model, points_per_side=points_per_side)
    images = []
    for i in range(n_images):
        image_id = dataset.image_ids[i]
        emb = embedding_of(image_id)
        records = gen.generate_from_embedding(emb.features, emb.original_size, emb.input_size)
        h, w = emb.original_size
        images.append(ShardImage(image_id, dataset.image_path(i).name, h, w, i, records))
    low = 4 * model.prompt_encoder.image_embedding_size[0]
    return write_shard(pseudo_dir, dataset_name, 0, "dev", images, logits_hw=(low, low), img_size=model.image_encoder.img_size)


# ---- Eq. 3 -------------------------------------------------------------------------------------


def test_uncertainty_map_hand_computed():
    ln3 = math.log(3.0)
    s = [0.0, ln3, -ln3, 20.0]  # σ: 1/2, 3/4, 1/4, ~1
    r = [0.0, 0.0, ln3, -20.0]  # σ: 1/2, 1/2, 3/4, ~0
    expected = [0.0, 0.25, 0.5, 1.0]
    u_np = uncertainty_map(np.array(s), np.array(r))
    assert u_np.dtype == np.float32
    np.testing.assert_allclose(u_np, expected, atol=1e-6)
    u_t = uncertainty_map(torch.tensor(s), torch.tensor(r))
    assert isinstance(u_t, torch.Tensor)
    np.testing.assert_allclose(u_t.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(1 - u_np, [1.0, 0.75, 0.5, 0.0], atol=1e-6)  # c = 1 - u
    with pytest.raises(ValueError, match="s is"):
        uncertainty_map(np.zeros(3), np.zeros(4))


def test_quantisation_error_is_at_most_half_a_step():
    u = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    u[0, 0, :4] = [0.0, 1.0, 0.5 / 255, 254.5 / 255]
    back = dequantize_u(quantize_u(u))
    assert quantize_u(u).dtype == np.uint8
    assert np.abs(back - u).max() <= 1 / 510 + 1e-7


# ---- AUROC ---------------------------------------------------------------------------------------


def test_auroc_hand_computed():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 1 (0.35>0.1) + 2 (0.8 beats both) of 4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # a tie counts one half: pos 1 vs neg 1 -> 0.5, pos 2 vs neg 1 -> 1
    assert auroc([1, 1, 2], [0, 1, 1]) == 0.75
    assert auroc([0, 1], [0, 1]) == 1.0 and auroc([1, 0], [0, 1]) == 0.0
    assert math.isnan(auroc([0.3, 0.5], [1, 1]))
    np.testing.assert_allclose(average_ranks(np.array([3, 1, 3, 2])), [3.5, 1, 3.5, 2])


def test_auroc_equals_the_pairwise_count():
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.integers(0, 6, 60) / 5.0  # many ties
        labels = rng.random(60) < 0.3
        pos, neg = scores[labels], scores[~labels]
        brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
        assert auroc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_scoring_region_grows_the_box_and_clips():
    rows, cols = scoring_region([10, 20, 100, 50], (100, 200), margin=0.1, min_px=8)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (12, 79, 0, 121)  # dy=8, dx=10
    rows, cols = scoring_region([0, 0, 199, 99], (100, 200), margin=0.1, min_px=8)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 100, 0, 200)


def test_scoring_region_joins_the_matched_gt_box():
    gt = np.zeros((100, 200), bool)
    gt[30:40, 150:170] = True  # right of the pseudo label's box [10, 20, 100, 50]
    rows, cols = scoring_region([10, 20, 100, 50], (100, 200), margin=0.1, min_px=8, gt_hw=gt)
    # union box x 10..169, y 20..70: dx = 0.1 * 159, dy = max(8, 0.1 * 50)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (12, 79, 0, 186)
    same = scoring_region([10, 20, 100, 50], (100, 200), 0.1, 8, gt_hw=np.zeros((100, 200), bool))
    assert same == scoring_region([10, 20, 100, 50], (100, 200), 0.1, 8)


# ---- resolution ----------------------------------------------------------------------------------


def test_uncertainty_at_follows_sam_postprocessing(tiny_cfg):
    sam = build_sum_model(tiny_cfg)  # img_size 128, low-res 32
    maps = torch.rand(2, 32, 32)
    ours = uncertainty_at(maps.numpy(), 128, (96, 128), (48, 64))
    theirs = sam.postprocess_masks(maps[:, None], (96, 128), (48, 64))[:, 0].numpy()
    assert ours.shape == (2, 48, 64)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert 0.0 <= ours.min() and ours.max() <= 1.0


# ---- refinement of pseudo labels and storage -------------------------------------------------


def _fake_shard(rng, low=32):
    """Two images (48x64 and 64x64) with 2 and 3 pseudo labels; logit rows deliberately not in
    annotation order."""
    images, rows = [], iter([3, 0, 4, 1, 2])
    for image_id, (h, w), n in (("7", (48, 64), 2), ("9", (64, 64), 3)):
        anns = []
        for k in range(n):
            x, y = 5 + 6 * k, 4 + 5 * k
            anns.append(
                {
                    "id": int(image_id) * 100 + k + 1,
                    "bbox": [x, y, 20, 16],
                    "point_coords": [[x + 10, y + 8]],
                    "logit_index": next(rows),
                    "area": 320,
                }
            )
        images.append({"image_id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w, "annotations": anns})
    logits = rng.normal(0, 3, (5, low, low)).astype(np.float16)
    return {"shard": 0, "config_hash": "abc", "dataset": "unl", "img_size": 128, "images": images}, logits


class _Emb:
    def __init__(self, features, original_size):
        self.features, self.original_size = features, original_size


def _embeddings(rng, doc):
    feats = {img["image_id"]: _Emb(torch.as_tensor(rng.normal(0, 1, (1, 32, 8, 8)), dtype=torch.float32), (img["height"], img["width"])) for img in doc["images"]}
    return feats.__getitem__


def test_refine_pseudo_labels_is_aligned_with_the_records(tiny_cfg):
    torch.manual_seed(0)
    refiner = RefinementModule.from_sam(build_sum_model(tiny_cfg))
    rng = np.random.default_rng(0)
    doc, logits = _fake_shard(rng)
    embedding_of = _embeddings(rng, doc)
    r, iou = refine_pseudo_labels(refiner, embedding_of, doc["images"], logits, batch_size=2)
    assert r.shape == (5, 32, 32) and r.dtype == np.float32 and iou.shape == (5,)
    for img in doc["images"]:  # each row is its own annotation's refinement, alone
        for a in img["annotations"]:
            j = a["logit_index"]
            r1, _ = refine_image(refiner, embedding_of(img["image_id"]).features, (img["height"], img["width"]), [a], logits[[j]])
            np.testing.assert_allclose(r[j], r1[0], atol=1e-4)
    u_q, r16, summary = uncertainty_shard(refiner, embedding_of, doc, logits, batch_size=4)
    assert u_q.dtype == np.uint8 and u_q.shape == (5, 32, 32) and r16.dtype == np.float16
    np.testing.assert_allclose(dequantize_u(u_q), uncertainty_map(logits.astype(np.float32), r), atol=1 / 510 + 1e-6)
    assert [m["id"] for m in summary["images"][1]["masks"]] == [901, 902, 903]
    assert [m["logit_index"] for m in summary["images"][1]["masks"]] == [4, 1, 2]
    assert summary["n_masks"] == 5 and summary["pseudo_config_hash"] == "abc"


def test_uncertainty_shard_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    u = rng.random((4, 32, 32)).astype(np.float32)
    r = rng.normal(0, 4, (4, 32, 32)).astype(np.float32)
    summary = {"format": "sum-uncertainty-shard/1", "shard": 3, "n_masks": 4, "images": []}
    path = write_uncertainty_shard(tmp_path, "unl", 3, quantize_u(u), summary, r)
    assert path.name == "shard-00003.json" and (tmp_path / "unl" / "shard-00003.npz").is_file()
    assert not list((tmp_path / "unl").glob("*.tmp"))
    doc, u_back, r_back = read_uncertainty_shard(tmp_path, "unl", 3)
    assert doc == summary
    assert np.abs(u_back - u).max() <= 1 / 510 + 1e-7
    np.testing.assert_allclose(r_back, r.astype(np.float16).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="shard-00004.json"):
        read_uncertainty_shard(tmp_path, "unl", 4)
    with pytest.raises(ValueError, match="must be uint8"):
        write_uncertainty_shard(tmp_path, "unl", 5, u, summary)


def test_mask_summary_counts_uncertain_pixels_in_the_box():
    u = np.zeros((32, 32), np.float32)
    u[0:4, 0:8] = 0.5  # c = 0.5 <= 0.6: uncertain
    s = np.full((32, 32), -5.0, np.float32)
    s[0:8, 0:8] = 5.0
    # a 64x64 image in a 128 frame: 1 low-res pixel = 2 image pixels; box = the 16x16 image corner
    stats = mask_summary(u, s, s, [0, 0, 15, 15], (64, 64), 128)
    assert stats["uncertain_fraction_box"] == pytest.approx(0.5)
    assert stats["mean_u_box"] == pytest.approx(0.25)
    assert stats["iou_s_r"] == 1.0 and stats["mean_u"] == pytest.approx(0.5 * 32 / 1024)


def test_score_image_matches_the_best_gt_and_scores_errors():
    from sum.data.coco import encode_rle

    size = (32, 32)
    pseudo = np.zeros(size, bool)
    pseudo[8:24, 8:20] = True  # misses columns 20..23 of the GT square
    gt_square = np.zeros(size, bool)
    gt_square[8:24, 8:24] = True
    gt_other = np.zeros(size, bool)
    gt_other[0:4, 0:4] = True
    img = {"image_id": "1", "height": 32, "width": 32, "annotations": [{"id": 5, "bbox": [8, 8, 11, 15], "segmentation": encode_rle(pseudo)}]}
    # low-res maps in a 32 frame with img_size 32: identity resolution
    u = np.zeros((1, 32, 32), np.float32)
    u[0, 8:24, 20:24] = 0.9  # exactly the error pixels are uncertain
    s = np.where(pseudo, 5.0, -5.0)[None].astype(np.float32)
    r = np.where(gt_square, 5.0, -5.0)[None].astype(np.float32)
    (rec,) = score_image(img, s, u, r, np.stack([gt_other, gt_square]), 32, 0.6, 0.1, 8)
    assert rec["gt_iou_pseudo"] == pytest.approx(192 / 256)
    assert rec["gt_iou_refined"] == pytest.approx(1.0, abs=1e-6)
    assert rec["n_error"] == 64 and rec["auroc"] == 1.0
    m = summarize([rec])
    assert m["auroc_mean"] == 1.0 and m["n_masks"] == 1 and m["acc_certain"] == 1.0 and m["acc_uncertain"] == 0.0
    assert m["miou_refined"] > m["miou_pseudo"]


def test_report_says_how_much_loss_weight_certainty_removes_from_error_pixels():
    """Issue 19: c on error vs correct pixels and the share of the UA focal weight (spec §5.3) and
    of the UA Dice mask (§5.4, theta 0.6) taken off each, hand-computed."""
    from sum.data.coco import encode_rle

    size = (32, 32)
    pseudo = np.zeros(size, bool)
    pseudo[8:24, 8:20] = True
    gt = np.zeros(size, bool)
    gt[8:24, 8:24] = True  # error: rows 8..23 x columns 20..23, 64 pixels
    img = {"image_id": "1", "height": 32, "width": 32, "annotations": [{"id": 5, "bbox": [8, 8, 11, 15], "segmentation": encode_rle(pseudo)}]}
    u = np.zeros((1, 32, 32), np.float32)
    u[0, 8:16, 20:24] = 0.9  # half the error pixels: c = 0.1
    u[0, 8:24, 8:12] = 0.5  # 64 correct pixels: c = 0.5, below theta too
    s = np.where(pseudo, 5.0, -5.0)[None].astype(np.float32)
    (rec,) = score_image(img, s, u, None, gt[None], 32, 0.6, 0.1, 8)
    n_correct = rec["n_region"] - 64
    assert rec["n_error"] == 64 and n_correct > 64
    assert rec["c_mean_error"] == pytest.approx(1 - 0.9 * 32 / 64)
    assert rec["c_mean_correct"] == pytest.approx(1 - 0.5 * 64 / n_correct)
    m = summarize([rec])
    assert m["c_mean_error_per_mask"] == pytest.approx(0.55) and m["focal_weight_removed_error"] == pytest.approx(0.45)
    assert m["focal_weight_removed_correct"] == pytest.approx(0.5 * 64 / n_correct)
    assert m["dice_removed_error"] == pytest.approx(0.5) and m["dice_removed_correct"] == pytest.approx(64 / n_correct)


def _records_for(pseudo, gts, u_hw, size=(64, 64)):
    from sum.data.coco import encode_rle

    ys, xs = np.nonzero(pseudo)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
    img = {"image_id": "1", "height": size[0], "width": size[1], "annotations": [{"id": 1, "bbox": bbox, "segmentation": encode_rle(pseudo)}]}
    s = np.where(pseudo, 5.0, -5.0)[None].astype(np.float32)
    return score_image(img, s, u_hw[None].astype(np.float32), None, np.stack(gts), size[0], 0.6, 0.1, 2)


def test_score_image_counts_errors_beyond_the_pseudo_label_box():
    size = (64, 64)
    gt = np.zeros(size, bool)
    gt[10:30, 4:60] = True  # a long object
    pseudo = np.zeros(size, bool)
    pseudo[10:30, 4:34] = True  # covers its left 30 of 56 columns: IoU 30/56 > 0.5
    u = np.zeros(size, np.float32)
    u[10:30, 34:60] = 0.8  # exactly the missed part is uncertain
    (rec,) = _records_for(pseudo, [gt], u)
    assert rec["gt_iou_pseudo"] == pytest.approx(30 / 56)
    assert rec["n_error"] == 20 * 26  # every missed pixel, far outside the pseudo label's box
    assert rec["auroc"] == 1.0


def test_report_metrics_match_rule_and_bands():
    size = (64, 64)
    gt = np.zeros(size, bool)
    gt[8:40, 8:40] = True
    good = np.zeros(size, bool)
    good[8:40, 8:36] = True  # IoU 28/32: matched, its error (4 columns) flagged by u
    u_good = np.zeros(size, np.float32)
    u_good[8:40, 36:40] = 0.9
    fragment = np.zeros(size, bool)
    fragment[20:24, 20:24] = True  # a blob inside the GT: IoU 16/1024, no counterpart
    exact = gt.copy()  # IoU 1: no error pixel, nothing to separate
    records = []
    for k, (m, u) in enumerate(((good, u_good), (fragment, np.zeros(size, np.float32)), (exact, np.zeros(size, np.float32)))):
        (rec,) = _records_for(m, [gt], u)
        rec["id"] = k
        records.append(rec)
    out = report_metrics(records, 0.5)
    assert out["n_masks_total"] == 3 and out["n_masks_matched"] == 2 and out["n_masks_unmatched"] == 1
    assert out["n_masks"] == 1 and out["n_masks_no_error"] == 1 and out["auroc_mean"] == 1.0
    assert out["auroc_p50"] == 1.0 and out["n_masks_all"] == 2  # the fragment is scored only in _all
    assert out["miou_pseudo"] == pytest.approx((28 / 32 + 1.0) / 2)
    assert out["min_match_iou"] == 0.5 and "IoU >= min_match_iou" in out["scoring_rule"]
    bands = auroc_by_match_iou(records)
    assert bands["0.00-0.25"]["n"] == 1 and bands["0.85-0.95"] == {"n": 1, "auroc_mean": 1.0}
    assert bands["0.95-1.00"] == {"n": 0, "auroc_mean": None}  # the exact mask has no AUROC
    json.dumps(out, allow_nan=False)  # plain JSON for DVC


def test_coverage_counts_which_gt_masks_the_pseudo_labels_describe(tmp_path):
    """Hand-made 100x100 image: a small part (4 px = 4e-4 of the image) that no pseudo label
    matches, a larger part (100 px = 0.01) matched exactly, an entity matched at IoU 0.9, and a
    fragment that matches nothing."""
    size = (100, 100)
    small, large, entity = (np.zeros(size, bool) for _ in range(3))
    small[0:2, 0:2] = True
    large[50:60, 50:60] = True
    entity[20:40, 20:70] = True  # 1000 px
    near_entity = entity.copy()
    near_entity[20:40, 65:70] = False  # 900 px inside it: IoU 0.9
    fragment = np.zeros(size, bool)
    fragment[80:82, 80:82] = True
    gts, labels = coverage_records(np.stack([large, near_entity, fragment]), np.stack([small, large, entity]), ["part", "part", "entity"])
    assert [g["best_iou"] for g in gts] == [0.0, 1.0, pytest.approx(0.9)]
    assert [g["area_fraction"] for g in gts] == [4e-4, 0.01, 0.1]
    assert [lb["granularity"] for lb in labels[:2]] == ["part", "entity"] and labels[2]["iou"] == 0.0
    out = coverage_metrics(gts, labels, 0.5)
    part = out["by_granularity"]["part"]
    assert part["n"] == 2 and part["recall"] == 0.5
    assert part["by_area"]["0.0003-0.001"] == {"n": 1, "recall": 0.0}
    assert part["by_area"]["0.01-1"] == {"n": 1, "recall": 1.0}  # the last band includes its ends
    assert part["by_area"]["0-0.0003"] == {"n": 0, "recall": None}
    assert out["by_granularity"]["entity"]["recall"] == 1.0
    assert out["pseudo_labels"] == {"entity": 1, "part": 1, "unmatched": 1}
    json.dumps(out, allow_nan=False)


def test_hidden_gt_annotations_carry_their_files_granularity(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
           "annotations": [{"id": 7, "image_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]], "area": 4, "bbox": [0, 0, 2, 2]}]}
    for g in ("part", "entity"):
        (tmp_path / f"annotations_{g}.json").write_text(json.dumps(doc))
    hidden = load_hidden_gt(sorted(tmp_path.glob("annotations_*.json")))
    assert [a["_granularity"] for a in hidden["a.png"][1]] == ["entity", "part"]
    assert granularity_of("x/annotations_salient.json") == "salient" and granularity_of("gt.json") == "gt"


def test_uncertainty_report_scores_a_dataset_end_to_end(tmp_path):
    """The report stage on hand-made shards: one 64x64 image whose pseudo labels are a 16x16 block
    (exactly a part of the hidden GT) and a 32x32 block (exactly an entity), with u flagging
    nothing. Both are matched, their IoU is 1, and coverage finds 1 of 2 parts."""
    from sum.config import UncertaintyConfig
    from sum.data.coco import encode_rle, mask_to_annotation, write_coco
    from sum.pseudo.store import ShardImage, write_shard
    from sum.uncertainty.maps import UNCERTAINTY_FORMAT
    from sum.uncertainty.report import uncertainty_report

    size, img_size, low = (64, 64), 64, 16  # logits 16x16 in a 64x64 frame: 4 px per cell
    blocks = {"part": (16, 16, 16), "entity": (8, 24, 32)}  # y0, x0, side (multiples of 4)
    logits, records = [], []
    for y0, x0, side in blocks.values():
        s = np.full((low, low), -20.0, np.float16)
        s[y0 // 4 : (y0 + side) // 4, x0 // 4 : (x0 + side) // 4] = 20.0
        m = np.zeros(size, bool)
        m[y0 : y0 + side, x0 : x0 + side] = True
        records.append({"segmentation": encode_rle(m), "area": int(m.sum()), "bbox": [x0, y0, side, side],
                        "predicted_iou": 0.95, "point_coords": [[x0 + 1, y0 + 1]], "stability_score": 0.99,
                        "crop_box": [0, 0, 64, 64], "low_res_logits": s})
    images = tmp_path / "pool" / "images"
    images.mkdir(parents=True)
    write_shard(tmp_path / "pseudo", "pool", 0, "h", [ShardImage("1", "a.png", 64, 64, 0, records)], logits_hw=(low, low), img_size=img_size)
    summary = {"format": UNCERTAINTY_FORMAT, "shard": 0, "n_masks": 2, "pseudo_config_hash": "h", "images": []}
    write_uncertainty_shard(tmp_path / "unc", "pool", 0, quantize_u(np.zeros((2, low, low), np.float32)), summary, np.stack([r["low_res_logits"] for r in records]).astype(np.float32))
    gt = {g: [] for g in ("part", "entity")}
    y0, x0, side = blocks["part"]
    found = np.zeros(size, bool)
    found[y0 : y0 + side, x0 : x0 + side] = True
    missed = np.zeros(size, bool)
    missed[56:60, 56:60] = True
    entity = np.zeros(size, bool)
    entity[8:40, 24:56] = True
    gt["part"], gt["entity"] = [found, missed], [entity]
    (tmp_path / "pool" / "hidden_gt").mkdir()
    for g, masks in gt.items():
        write_coco(tmp_path / "pool" / "hidden_gt" / f"annotations_{g}.json", [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
                   [mask_to_annotation(m, k + 1, 1) for k, m in enumerate(masks)])
    cfg = UncertaintyConfig(metrics=str(tmp_path / "metrics.json"), panel="", n_panel_images=0)
    out = uncertainty_report(tmp_path / "pseudo", tmp_path / "unc", {"pool": str(images)}, cfg)
    assert out["n_masks_total"] == 2 and out["n_masks_matched"] == 2 and out["miou_pseudo"] == 1.0
    cov = out["gt_coverage"]
    assert cov["by_granularity"]["part"]["n"] == 2 and cov["by_granularity"]["part"]["recall"] == 0.5
    assert cov["by_granularity"]["entity"]["recall"] == 1.0
    assert cov["pseudo_labels"] == {"entity": 1, "part": 1}
    assert json.loads((tmp_path / "metrics.json").read_text())["datasets"]["pool"]["gt_coverage"] == cov
