"""The oracle pool (`sum.pseudo.oracle`): hidden GT written as pseudo-label shards that the
training dataset reads back as exactly those masks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sum.data.coco import mask_to_annotation, write_coco
from sum.data.hidden_gt import load_hidden_gt
from sum.pseudo.oracle import oracle_records, write_oracle_dataset, write_oracle_pool
from sum.pseudo.dataset import PseudoLabelDataset
from sum.pseudo.store import ShardImage, list_shards, read_shard_json, write_shard


def _world(root, n_images=3):
    """A pool of n 40x60 images, ids 11.., with a part (a thin 1-px line) and an entity per image
    in two hidden-GT files."""
    images = root / "pool" / "images"
    images.mkdir(parents=True)
    (root / "pool" / "hidden_gt").mkdir()
    recs, parts, entities = [], [], []
    for k in range(n_images):
        name = f"{k:06d}.png"
        Image.fromarray(np.full((40, 60, 3), 40 * k, np.uint8)).save(images / name)
        recs.append({"id": 11 + k, "file_name": name, "height": 40, "width": 60})
        part = np.zeros((40, 60), bool)
        part[5:30, 10 + k] = True  # 25 px, one pixel wide
        entity = np.zeros((40, 60), bool)
        entity[20:40, 30:60] = True
        parts.append(mask_to_annotation(part, 100 + k, 11 + k))
        entities.append(mask_to_annotation(entity, 200 + k, 11 + k))
    write_coco(root / "pool" / "hidden_gt" / "annotations_part.json", recs, parts)
    write_coco(root / "pool" / "hidden_gt" / "annotations_entity.json", recs, entities)
    return images


def test_oracle_records_are_the_masks_with_their_boxes():
    m = np.zeros((1, 10, 12), bool)
    m[0, 2:5, 3:9] = True
    (rec,) = oracle_records(m)
    assert rec["area"] == 18 and rec["bbox"] == [3.0, 2.0, 6.0, 3.0] and rec["crop_box"] == [0, 0, 12, 10]
    assert rec["low_res_logits"].shape == (256, 256) and not rec["low_res_logits"].any()


def test_oracle_shards_read_back_as_the_hidden_gt(tmp_path):
    images = _world(tmp_path)
    gt = sorted((tmp_path / "pool" / "hidden_gt").glob("annotations_*.json"))
    n = write_oracle_dataset(gt, tmp_path / "oracle", "pool", shard_size=2)
    assert n == 6 and list_shards(tmp_path / "oracle", "pool") == [0, 1]
    doc = read_shard_json(tmp_path / "oracle", "pool", 0)
    assert doc["config_hash"].startswith("oracle:") and [i["image_id"] for i in doc["images"]] == ["11", "12"]

    ds = PseudoLabelDataset(images, tmp_path / "oracle", "pool", min_ratio=0.0, max_masks=None)
    assert ds.image_ids == ["11", "12", "13"]
    sample = ds[1]
    want = {}
    for path in gt:
        for a in json.loads(path.read_text())["annotations"]:
            if a["image_id"] == 12:
                from sum.data.formats import segmentation_to_mask

                want[a["id"]] = segmentation_to_mask(a["segmentation"], 40, 60)
    got = sorted(sample.masks, key=lambda m: int(m.sum()))
    assert [int(m.sum()) for m in got] == [25, 600]
    assert any(np.array_equal(got[0], m) for m in want.values())  # the 1-px part, exact
    assert any(np.array_equal(got[1], m) for m in want.values())


def test_oracle_pool_copies_pools_without_gt_and_never_overwrites_the_real_labels(tmp_path):
    images = _world(tmp_path)
    photos = tmp_path / "photos" / "images"
    photos.mkdir(parents=True)
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    rec = {**oracle_records(m[None])[0], "predicted_iou": 0.9}
    write_shard(tmp_path / "pseudo", "photos", 0, "real", [ShardImage("1", "a.png", 8, 8, 0, [rec])])
    cfg = SimpleNamespace(
        data=SimpleNamespace(datasets={
            "pool": SimpleNamespace(role="unlabeled", images=str(images)),
            "photos": SimpleNamespace(role="unlabeled", images=str(photos)),
            "hq": SimpleNamespace(role="labeled", images=str(tmp_path / "hq")),
        }),
        pseudo=SimpleNamespace(out_dir=str(tmp_path / "pseudo"), shard_size=8),
        uncertainty=SimpleNamespace(hidden_gt="hidden_gt/annotations_*.json", min_match_iou=0.5),
    )
    assert write_oracle_pool(cfg, tmp_path / "oracle") == {"pool": 6}
    assert read_shard_json(tmp_path / "oracle", "photos", 0)["config_hash"] == "real"
    with pytest.raises(ValueError, match="would overwrite the real pseudo labels"):
        write_oracle_pool(cfg, tmp_path / "pseudo")
    cfg.data.datasets["pool"].images = str(tmp_path / "nowhere" / "images")
    with pytest.raises(FileNotFoundError, match="pool has no hidden GT and no pseudo labels to copy"):
        write_oracle_pool(cfg, tmp_path / "oracle2")
    write_shard(tmp_path / "pseudo", "pool", 0, "real", [ShardImage("1", "a.png", 8, 8, 0, [rec])])
    with pytest.raises(ValueError, match="no unlabeled dataset has hidden GT"):
        write_oracle_pool(cfg, tmp_path / "oracle2")


def _real_pool(root):
    """Real-looking shards for `_world`'s pool: per image the entity (exact), a junk block that
    matches no GT mask and, on the first image only, its part; logits say which record is which."""
    from sum.data.formats import segmentation_to_mask

    part_of = {}
    for a in json.loads((root / "pool" / "hidden_gt" / "annotations_part.json").read_text())["annotations"]:
        part_of[a["image_id"]] = segmentation_to_mask(a["segmentation"], 40, 60)
    entity = np.zeros((40, 60), bool)
    entity[20:40, 30:60] = True
    junk = np.zeros((40, 60), bool)
    junk[0:10, 40:60] = True
    shard_images = []
    for k in range(3):
        masks = [entity, junk] + ([part_of[11]] if k == 0 else [])
        recs = []
        for j, m in enumerate(masks):
            rec = oracle_records(m[None])[0]
            rec["predicted_iou"] = 0.9
            rec["low_res_logits"] = np.full((256, 256), 10 * k + j + 1, np.float16)
            recs.append(rec)
        shard_images.append(ShardImage(str(11 + k), f"{k:06d}.png", 40, 60, k, recs))
    write_shard(root / "pseudo", "pool", 0, "real", shard_images[:2])
    write_shard(root / "pseudo", "pool", 1, "real", shard_images[2:])
    return part_of


def _shard_masks(root, k):
    from sum.pseudo.store import iter_pseudo_labels
    from sum.data.coco import decode_rle

    rec, anns, logits = list(iter_pseudo_labels(root, "pool"))[k]
    return [decode_rle(a["segmentation"]) for a in anns], [float(l.max()) for l in logits]


def test_matched_pool_keeps_the_real_labels_that_match_a_gt_mask(tmp_path):
    _world(tmp_path)
    part_of = _real_pool(tmp_path)
    gt = sorted((tmp_path / "pool" / "hidden_gt").glob("annotations_*.json"))
    n = write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "matched", tmp_path / "pseudo", 0.5)
    assert n == 4  # image 11: entity + part; 12, 13: entity; the junk blocks are dropped
    doc = read_shard_json(tmp_path / "oracle", "pool", 0)
    assert doc["config_hash"].startswith("oracle-matched:") and [i["image_id"] for i in doc["images"]] == ["11", "12"]
    masks, logits = _shard_masks(tmp_path / "oracle", 0)
    assert logits == [1.0, 3.0]  # SAM's own logits travel with the labels kept
    assert np.array_equal(masks[1], part_of[11])
    assert _shard_masks(tmp_path / "oracle", 2)[1] == [21.0]


def test_add_parts_pool_adds_only_the_missing_parts_above_min_area(tmp_path):
    images = _world(tmp_path)
    part_of = _real_pool(tmp_path)
    gt = sorted((tmp_path / "pool" / "hidden_gt").glob("annotations_*.json"))
    n = write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "add-parts", tmp_path / "pseudo", 0.5)
    assert n == 9  # image 11's part is already there; 12 and 13 each gain theirs
    masks, logits = _shard_masks(tmp_path / "oracle", 1)
    assert logits == [11.0, 12.0, 0.0] and np.array_equal(masks[2], part_of[12])  # the 1-px part, exact
    assert len(_shard_masks(tmp_path / "oracle", 0)[0]) == 3
    ds = PseudoLabelDataset(images, tmp_path / "oracle", "pool", min_ratio=0.0, max_masks=None)
    assert sorted(int(m.sum()) for m in ds[2].masks) == [25, 200, 600]
    # the parts are 25 px of 2,400: above 1% of the image they are not added
    assert write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "add-parts", tmp_path / "pseudo", 0.5, min_area=0.011) == 7
    assert write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "add-parts", tmp_path / "pseudo", 0.5, min_area=0.010) == 9


def test_mixed_modes_refuse_bad_modes_and_images_without_gt_before_writing(tmp_path):
    _world(tmp_path)
    _real_pool(tmp_path)
    gt = sorted((tmp_path / "pool" / "hidden_gt").glob("annotations_*.json"))
    with pytest.raises(ValueError, match="oracle mode 'noisy'"):
        write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "noisy", tmp_path / "pseudo")
    with pytest.raises(FileNotFoundError, match="no pseudo-label shards"):
        write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "matched", tmp_path / "nowhere")
    m = np.zeros((40, 60), bool)
    m[1:3, 1:3] = True
    write_shard(tmp_path / "pseudo", "pool", 2, "real", [ShardImage("99", "stray.png", 40, 60, 3, oracle_records(m[None]))])
    with pytest.raises(ValueError, match="1 images have pseudo labels but no hidden GT, e.g. stray.png"):
        write_oracle_dataset(gt, tmp_path / "oracle", "pool", 2, "add-parts", tmp_path / "pseudo")
    assert not (tmp_path / "oracle").exists()
    cfg = SimpleNamespace(pseudo=SimpleNamespace(out_dir=str(tmp_path / "pseudo")))
    with pytest.raises(ValueError, match="--oracle noisy: expected one of gt, matched, add-parts"):
        write_oracle_pool(cfg, tmp_path / "oracle", "noisy")
    with pytest.raises(ValueError, match=r"--min-area 1.5: expected a fraction of the image in \[0, 1\)"):
        write_oracle_pool(cfg, tmp_path / "oracle", "add-parts", 1.5)


# ---- oracle uncertainty (sum.uncertainty.oracle) -----------------------------------------------


def test_gt_lowres_is_the_covered_fraction_of_each_low_res_cell():
    from sum.uncertainty.oracle import gt_lowres

    # a 16x8 image at img_size 32: resized to 32x16, low-res 8x8 of which 8x4 hold the image;
    # each low-res cell is then a 2x2 block of original pixels
    m = np.zeros((16, 8), bool)
    m[0, 0:3] = True
    m[4:8, 4:8] = True
    want = np.zeros((8, 8), np.float32)
    want[0, 0], want[0, 1] = 0.5, 0.25
    want[2:4, 2:4] = 1.0
    assert np.array_equal(gt_lowres(m, 32, 8), want)


def test_oracle_u_is_sam_against_its_best_gt_mask(tmp_path):
    from sum.pseudo.store import read_shard
    from sum.uncertainty.oracle import PROB_CLIP, gt_lowres, oracle_refined

    _world(tmp_path)
    part_of = _real_pool(tmp_path)
    hidden = load_hidden_gt(sorted((tmp_path / "pool" / "hidden_gt").glob("annotations_*.json")))
    doc, logits = read_shard(tmp_path / "pseudo", "pool", 0)
    r, iou = oracle_refined(doc, logits, hidden, "pool")
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
    entity = np.zeros((40, 60), bool)
    entity[20:40, 30:60] = True
    p_entity = np.clip(gt_lowres(entity, 1024, 256), PROB_CLIP, 1 - PROB_CLIP)
    p_part = np.clip(gt_lowres(part_of[11], 1024, 256), PROB_CLIP, 1 - PROB_CLIP)
    # image 11: rows 0 (entity, exact), 1 (junk: overlaps no GT mask), 2 (its part, exact)
    assert np.allclose(sigmoid(r[0]), p_entity, atol=1e-6) and iou[0] == 1.0
    assert np.allclose(sigmoid(r[1]), PROB_CLIP, atol=1e-6) and iou[1] == 0.0
    assert np.allclose(sigmoid(r[2]), p_part, atol=1e-6) and iou[2] == 1.0
    # image 12 (rows 3, 4): the entity again, and the junk
    assert np.allclose(sigmoid(r[3]), p_entity, atol=1e-6) and np.allclose(sigmoid(r[4]), PROB_CLIP, atol=1e-6)
    assert p_entity[100, 200] == 1.0 - PROB_CLIP and p_entity[10, 10] == PROB_CLIP  # inside / outside


def test_write_oracle_uncertainty(tmp_path):
    from sum.uncertainty.maps import read_uncertainty_shard, write_uncertainty_shard
    from sum.uncertainty.oracle import PROB_CLIP, gt_lowres, write_oracle_uncertainty

    images = _world(tmp_path)
    _real_pool(tmp_path)
    photos = tmp_path / "photos" / "images"
    photos.mkdir(parents=True)
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    write_shard(tmp_path / "pseudo", "photos", 0, "real", [ShardImage("1", "a.png", 8, 8, 0, [oracle_records(m[None])[0]])])
    cfg = SimpleNamespace(
        data=SimpleNamespace(datasets={
            "pool": SimpleNamespace(role="unlabeled", images=str(images)),
            "photos": SimpleNamespace(role="unlabeled", images=str(photos)),
        }),
        pseudo=SimpleNamespace(out_dir=str(tmp_path / "pseudo")),
        uncertainty=SimpleNamespace(out_dir=str(tmp_path / "unc"), datasets=[], hidden_gt="hidden_gt/annotations_*.json",
                                    certainty_threshold=0.6, store_refined=True),
    )
    with pytest.raises(ValueError, match="would overwrite the stage's uncertainty maps"):
        write_oracle_uncertainty(cfg, tmp_path / "unc")
    with pytest.raises(FileNotFoundError, match="photos has no hidden GT and no uncertainty map to copy"):
        write_oracle_uncertainty(cfg, tmp_path / "oracle")
    assert not (tmp_path / "oracle" / "photos").exists() and not (tmp_path / "oracle" / "photos.partial").exists()
    stage_u = np.full((1, 256, 256), 7, np.uint8)
    write_uncertainty_shard(tmp_path / "unc", "photos", 0, stage_u, {"format": "sum-uncertainty-shard/1", "n_masks": 1})

    assert write_oracle_uncertainty(cfg, tmp_path / "oracle") == {"pool": 7}
    assert sorted(p.name for p in (tmp_path / "oracle").iterdir()) == ["photos", "pool"]
    _, u_photos, _ = read_uncertainty_shard(tmp_path / "oracle", "photos", 0)
    assert np.array_equal(u_photos, stage_u.astype(np.float32) / 255.0)  # copied
    udoc, u, r = read_uncertainty_shard(tmp_path / "oracle", "pool", 1)  # image 13: entity (s = 21), junk (22)
    entity = np.zeros((40, 60), bool)
    entity[20:40, 30:60] = True
    p = np.clip(gt_lowres(entity, 1024, 256), PROB_CLIP, 1 - PROB_CLIP)
    s = 1.0 / (1.0 + np.exp(-21.0))
    assert np.abs(u[0] - np.abs(s - p)).max() <= 1 / 510 + 1e-6  # spec Eq. 3, 8-bit
    assert np.abs(u[1] - np.abs(1.0 - PROB_CLIP)).max() <= 1 / 510 + 1e-6  # nothing is there: all uncertain
    assert udoc["oracle"] == "hidden_gt" and udoc["pseudo_config_hash"] == "real" and udoc["n_masks"] == 2
    from sum.uncertainty.report import maps_source  # the report then copies no refiner's metrics

    assert maps_source(tmp_path / "oracle", ["photos", "pool"]) == "oracle"
    assert maps_source(tmp_path / "unc", ["photos", "pool"]) == "refiner"
    cfg.data.datasets["pool"].images = str(tmp_path / "nowhere" / "images")
    with pytest.raises(ValueError, match="no dataset with pseudo labels has hidden GT"):
        write_oracle_uncertainty(cfg, tmp_path / "oracle")
