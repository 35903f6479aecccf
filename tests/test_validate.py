"""Validation: each kind of bad sample fails with one line naming the file (and annotation); skip
mode reports every problem and keeps the good samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sum.config import DataConfig, DatasetConfig, ValidateConfig
from sum.data import formats, sa1b_json
from sum.data.coco import encode_rle, mask_to_annotation, write_coco
from sum.data.dataset import CocoDataset
from sum.data.mask_folder import MaskFolderDataset
from sum.data.sa1b import Sa1bDataset
from sum.data.validate import DataValidationError, validate_config, validate_dataset

H, W = 24, 32


def square(h=H, w=W, y=4, x=6, s=8) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y : y + s, x : x + s] = True
    return m


def coco_set(tmp_path: Path, n=3, task="entity"):
    """n good images with two masks each; returns (images dir, images list, annotations list)."""
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
        anns.append(mask_to_annotation(square(), 10 * i, i))
        anns.append(mask_to_annotation(square(x=18), 10 * i + 1, i))
    return d, images, anns


def write(tmp_path, images, anns, task="entity") -> Path:
    return write_coco(tmp_path / "ann.json", images, anns, info={"task": task})


def fail_message(ds) -> str:
    with pytest.raises(DataValidationError) as e:
        validate_dataset(ds, mode="fail")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_dataset_passes(tmp_path):
    d, images, anns = coco_set(tmp_path)
    report = validate_dataset(CocoDataset(d, write(tmp_path, images, anns)), mode="fail")
    assert report.ok and report.n_images == 3 and report.n_masks == 6 and report.n_masks_kept == 6


def test_corrupt_image(tmp_path):
    d, images, anns = coco_set(tmp_path)
    (d / "2.png").write_bytes(b"\x89PNG garbage bytes" * 20)
    msg = fail_message(CocoDataset(d, write(tmp_path, images, anns)))
    assert msg.startswith(str(d / "2.png")) and "cannot decode image" in msg


def test_missing_image(tmp_path):
    d, images, anns = coco_set(tmp_path)
    (d / "3.png").unlink()
    msg = fail_message(CocoDataset(d, write(tmp_path, images, anns)))
    assert str(d / "3.png") in msg and "not found" in msg


def test_wrong_mask_shape_coco(tmp_path):
    d, images, anns = coco_set(tmp_path)
    anns[3] = mask_to_annotation(square(h=H + 1), 21, 2)
    ann_json = write(tmp_path, images, anns)
    msg = fail_message(CocoDataset(d, ann_json))
    assert msg.startswith(f"{ann_json}: annotation 21: mask is 25x32, image is 24x32")


def test_wrong_image_size_in_json(tmp_path):
    d, images, anns = coco_set(tmp_path)
    images[0]["height"] = 99
    msg = fail_message(CocoDataset(d, write(tmp_path, images, anns)))
    assert msg.startswith(str(d / "1.png")) and "says 99x32" in msg


def test_wrong_mask_shape_mask_folder(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "im" / "a.jpg")
    Image.fromarray(square(h=H, w=W + 2).astype(np.uint8) * 255).save(tmp_path / "gt" / "a.png")
    msg = fail_message(MaskFolderDataset(tmp_path / "im", tmp_path / "gt"))
    assert msg.startswith(f"{tmp_path / 'gt' / 'a.png'}: annotation a: mask is 24x34, image is 24x32")


def test_mask_folder_missing_and_empty_mask(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    for n in ("a", "b"):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "im" / f"{n}.jpg")
    Image.fromarray(np.full((H, W), 128, np.uint8)).save(tmp_path / "gt" / "a.png")  # nothing > 128
    ds = MaskFolderDataset(tmp_path / "im", tmp_path / "gt")
    report = validate_dataset(ds, mode="skip")
    assert [p.reason for p in report.problems] == ["empty_mask", "missing_mask"]
    assert str(report.problems[0]).startswith(str(tmp_path / "gt" / "a.png"))
    assert str(report.problems[1]).startswith(str(tmp_path / "im" / "b.jpg"))


def test_empty_mask(tmp_path):
    d, images, anns = coco_set(tmp_path)
    anns[1] = mask_to_annotation(np.zeros((H, W), bool), 11, 1)
    ann_json = write(tmp_path, images, anns)
    msg = fail_message(CocoDataset(d, ann_json))
    assert msg.startswith(f"{ann_json}: annotation 11: mask is empty")


@pytest.mark.parametrize(
    "segm, fragment",
    [
        ({"size": [H, W], "counts": "garbage~~"}, "do not decode"),
        ({"size": [H, W], "counts": "0"}, "cover 0 pixels"),
        ({"size": [H], "counts": "0"}, "size field"),
        ({"size": [H, W], "counts": 5}, "counts is a int"),
        ([[1, 2, 3, 4]], "polygon 0 has 4 coordinates"),
        ([], "empty polygon list"),
    ],
)
def test_malformed_segmentation(tmp_path, segm, fragment):
    d, images, anns = coco_set(tmp_path)
    anns[4]["segmentation"] = segm
    ann_json = write(tmp_path, images, anns)
    msg = fail_message(CocoDataset(d, ann_json))
    assert msg.startswith(f"{ann_json}: annotation 30: ") and fragment in msg


def test_malformed_rle_is_never_decoded(tmp_path):
    """Loading a sample refuses a bad RLE with one line instead of handing it to pycocotools."""
    d, images, anns = coco_set(tmp_path)
    anns[0]["segmentation"] = {"size": [H, W], "counts": "Z" * 40}
    ann_json = write(tmp_path, images, anns)
    with pytest.raises(ValueError, match="annotation 10: RLE counts"):
        CocoDataset(d, ann_json)[0]


def test_unknown_task(tmp_path):
    d, images, anns = coco_set(tmp_path)
    ann_json = write(tmp_path, images, anns, task="panoptic")
    ds = CocoDataset(d, ann_json)
    msg = fail_message(ds)
    assert msg.startswith(f"{ann_json}: unknown task 'panoptic'")
    with pytest.raises(ValueError, match=str(ann_json)):
        _ = ds.task_id
    assert validate_dataset(ds, mode="skip").n_images_kept == 0


def test_duplicate_ids(tmp_path):
    d, images, anns = coco_set(tmp_path)
    images.append(dict(images[0]))  # duplicate image id 1
    anns[5]["id"] = anns[2]["id"]  # duplicate annotation id 20 (image 3 reuses it)
    ann_json = write(tmp_path, images, anns)
    ds = CocoDataset(d, ann_json)
    msg = fail_message(ds)
    assert msg.startswith(f"{ann_json}: duplicate image id 1 (1.png)") and "(and 1 more problem in" in msg
    report = validate_dataset(ds, mode="skip")
    assert report.counts_by_reason()["duplicate_image_id"] == 1 and report.counts_by_reason()["duplicate_ann_id"] == 1
    assert str(report.problems[1]) == f"{ann_json}: annotation 20: duplicate annotation id 20"
    assert report.dataset.image_ids == ["1", "2", "3"]
    assert report.dataset[2].ann_ids == ["30"]


def test_bbox_outside_image(tmp_path):
    d, images, anns = coco_set(tmp_path)
    anns[2]["bbox"] = [20.0, 4.0, 30.0, 8.0]
    ann_json = write(tmp_path, images, anns)
    msg = fail_message(CocoDataset(d, ann_json))
    assert msg.startswith(f"{ann_json}: annotation 20: bbox") and "outside the 24x32 image" in msg


def test_sa1b_problems_name_the_json(tmp_path):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "sa_1.jpg")
    good = sa1b_json.sa1b_annotation(square(), 0)
    bad = sa1b_json.sa1b_annotation(square(), 1)
    bad["segmentation"] = {"size": [H, W + 1], "counts": encode_rle(square(w=W + 1))["counts"]}
    sa1b_json.write_sa1b_json(tmp_path / "sa_1.json", {"image_id": 1, "height": H, "width": W}, [good, bad])
    ds = Sa1bDataset(tmp_path, tmp_path)
    msg = fail_message(ds)
    assert msg.startswith(f"{tmp_path / 'sa_1.json'}: annotation 1: mask is 24x33, image is 24x32")
    report = validate_dataset(ds, mode="skip")
    assert report.dataset[0].ann_ids == ["0"] and report.n_masks_kept == 1


def test_skip_mode_reports_all_and_keeps_the_good(tmp_path):
    d, images, anns = coco_set(tmp_path, n=6)
    (d / "2.png").write_bytes(b"not an image")  # image 2 dropped
    anns[6] = mask_to_annotation(np.zeros((H, W), bool), 40, 4)  # image 4 keeps one of two masks
    anns[8]["segmentation"] = {"size": [H, W], "counts": "~"}  # image 5: both masks bad -> dropped
    anns[9]["segmentation"] = {"size": [H + 1, W], "counts": encode_rle(square(h=H + 1))["counts"]}
    ann_json = write(tmp_path, images, anns)
    ds = CocoDataset(d, ann_json)
    with pytest.raises(DataValidationError, match=r"\(and 3 more problems in"):
        validate_dataset(ds, mode="fail")
    report = validate_dataset(ds, mode="skip")
    assert len(report.problems) == 4
    assert {p.reason for p in report.problems} == {
        "image_unreadable",
        "empty_mask",
        "malformed_rle",
        "mask_size_mismatch",
    }
    view = report.dataset
    assert view.image_ids == ["1", "3", "4", "6"]
    assert [len(s.ann_ids) for s in view] == [2, 2, 1, 2]
    assert view[2].ann_ids == ["41"] and view[2].masks.shape == (1, H, W)
    assert report.n_images == 6 and report.n_masks == 12 and report.n_images_kept == 4 and report.n_masks_kept == 7
    assert validate_dataset(view, mode="fail").ok  # the view itself is clean
    out = report.to_json(tmp_path / "m" / "validate.json")
    doc = json.loads(out.read_text())
    assert doc["n_images"] == 6 and doc["n_masks"] == 12 and doc["n_problems"] == 4
    assert doc["problems"]["empty_mask"] == 1 and doc["problems"]["duplicate_ann_id"] == 0
    assert all(isinstance(v, int) for v in doc["problems"].values())


def test_validate_config_writes_metrics_then_fails(tmp_path):
    d, images, anns = coco_set(tmp_path)
    anns[0] = mask_to_annotation(np.zeros((H, W), bool), 10, 1)
    ann_json = write(tmp_path, images, anns)
    cfg = DataConfig(
        validate=ValidateConfig(mode="fail"),
        datasets={"toy": DatasetConfig(format="coco", images=str(d), annotations=str(ann_json), task="entity")},
    )
    out = tmp_path / "metrics" / "validate.json"
    with pytest.raises(DataValidationError, match="annotation 10: mask is empty"):
        validate_config(cfg, out=out)
    doc = json.loads(out.read_text())
    assert doc["datasets"]["toy"]["problems"]["empty_mask"] == 1 and doc["n_images"] == 3
    cfg.validate.mode = "skip"
    reports = validate_config(cfg, out=out)
    assert reports["toy"].n_masks_kept == 5
    with pytest.raises(ValueError, match="mode 'lenient'"):
        validate_dataset(CocoDataset(d, ann_json), mode="lenient")
