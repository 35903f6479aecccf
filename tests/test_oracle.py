"""The oracle pool (`sum.pseudo.oracle`): hidden GT written as pseudo-label shards that the
training dataset reads back as exactly those masks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sum.data.coco import mask_to_annotation, write_coco
from sum.pseudo.oracle import oracle_records, write_oracle_dataset, write_oracle_pool
from sum.pseudo.store import PseudoLabelDataset, ShardImage, list_shards, read_shard_json, write_shard


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
        uncertainty=SimpleNamespace(hidden_gt="hidden_gt/annotations_*.json"),
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
