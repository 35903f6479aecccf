"""Formats and dataset readers: COCO / SA-1B round trips are bit-identical, mask folders threshold at
128, images of every mode come back as (H, W, 3) uint8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sum.config import DatasetConfig
from sum.data import formats, sa1b_json
from sum.data.coco import encode_rle, mask_to_annotation, write_coco
from sum.data.dataset import CocoDataset, build_dataset
from sum.data.mask_folder import MaskFolderDataset
from sum.data.sa1b import Sa1bDataset


def random_masks(rng, k, h, w) -> np.ndarray:
    """K blobby masks: random rectangles and discs with noise."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((k, h, w), bool)
    for i in range(k):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(h, w) // 3))
        out[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) | (rng.random((h, w)) < 0.01)
        out[i, 0, 0] = i % 2 == 0  # touches the corner: first-run edge case of RLE
    return out


def save_rgb(path: Path, rng, h, w) -> np.ndarray:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


# --------------------------------------------------------------------------------------------- images


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = save_rgb(tmp_path / "rgb.png", rng, 20, 30)
    assert np.array_equal(formats.read_image(tmp_path / "rgb.png"), rgb)

    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = formats.read_image(tmp_path / "gray.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))

    rgba = np.dstack([rgb, np.full((20, 30), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(formats.read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, not composited

    g16 = np.linspace(0, 60000, 20 * 30).reshape(20, 30).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = formats.read_image(tmp_path / "g16.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255 and np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)


def test_read_image_tiff_16bit_and_planar(tmp_path):
    import tifffile

    rng = np.random.default_rng(1)
    a = rng.integers(100, 4000, (16, 24), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a)
    out = formats.read_image(tmp_path / "a.tif")
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    assert out[..., 0][a == a.max()].min() == 255 and out[..., 0][a == a.min()].max() == 0
    planar = rng.integers(0, 256, (3, 16, 24), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    assert np.array_equal(formats.read_image(tmp_path / "p.tif"), np.moveaxis(planar, 0, -1))
    assert formats.image_size(tmp_path / "p.tif") == (16, 24)


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(formats.ImageReadError) as e:
        formats.read_image(bad)
    msg = str(e.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    with pytest.raises(formats.ImageReadError, match="not found"):
        formats.read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------- RLE


def test_rle_run_lengths_match_pycocotools():
    rng = np.random.default_rng(2)
    for t in range(60):
        h, w = rng.integers(1, 80, 2)
        m = rng.random((h, w)) < rng.random()
        if t % 5 == 0:
            m[:] = t % 2 == 0
        rle = encode_rle(m)
        runs = formats.rle_run_lengths(rle["counts"])
        flat = m.flatten(order="F")
        assert runs.sum() == h * w and runs[1::2].sum() == flat.sum()
        assert formats.rle_problem(rle) is None
        assert formats.rle_area(rle) == int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
        # uncompressed form describes the same mask
        assert formats.rle_problem({"size": [int(h), int(w)], "counts": runs.tolist()}) is None
        assert np.array_equal(
            formats.segmentation_to_mask({"size": [int(h), int(w)], "counts": runs.tolist()}, h, w), m
        )


@pytest.mark.parametrize(
    "rle, fragment",
    [
        ({"size": [4, 4], "counts": "~~"}, "alphabet"),
        ({"size": [4, 4], "counts": "0a"}, "ends inside"),
        ({"size": [4, 4], "counts": "12"}, "cover"),
        ({"size": [4], "counts": "0"}, "size field"),
        ({"counts": "0"}, "size field"),
        ({"size": [4, 4]}, "no counts"),
        ({"size": [2, 2], "counts": [1, -1, 4]}, "negative"),
    ],
)
def test_rle_problem_detects_malformed(rle, fragment):
    assert fragment in formats.rle_problem(rle)


# --------------------------------------------------------------------------------------------- COCO


def write_coco_set(tmp_path: Path, rng, n_images=3, k=4, h=37, w=53, info=None):
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    images, anns, truth = [], [], {}
    for i in range(1, n_images + 1):
        save_rgb(images_dir / f"im{i}.png", rng, h, w)
        masks = random_masks(rng, k, h, w)
        truth[i] = masks
        images.append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
        anns += [mask_to_annotation(m, 100 * i + j, i) for j, m in enumerate(masks)]
    write_coco(tmp_path / "ann.json", images, anns, info=info or {"task": "entity"})
    return images_dir, tmp_path / "ann.json", truth


def test_coco_rle_round_trip_bit_identical(tmp_path):
    rng = np.random.default_rng(3)
    images_dir, ann_json, truth = write_coco_set(tmp_path, rng)
    coco = formats.load_coco(ann_json)
    ds = CocoDataset(images_dir, ann_json)
    assert len(ds) == 3 and ds.image_ids == ["1", "2", "3"] and ds.task == "entity" and ds.task_id == 2
    for i in range(len(ds)):
        s = ds[i]
        ref = truth[int(s.image_id)]
        assert s.masks.dtype == bool and s.masks.shape == ref.shape
        assert np.array_equal(s.masks, ref)
        assert s.ann_ids == [str(100 * int(s.image_id) + j) for j in range(len(ref))]
        via_pycocotools = np.stack([coco.annToMask(coco.anns[int(a)]) for a in s.ann_ids]).astype(bool)
        assert np.array_equal(via_pycocotools, ref)
        assert s.image.shape == (37, 53, 3) and s.image.dtype == np.uint8 and s.uncertainty is None
        # boxes: inclusive max pixel indices, consistent with the COCO xywh bbox
        for m, b, a in zip(ref, s.boxes, s.ann_ids):
            x, y, bw, bh = coco.anns[int(a)]["bbox"]
            assert b.dtype == np.float32 and tuple(b) == (x, y, x + bw - 1, y + bh - 1)


def test_coco_polygons_match_annToMask_and_crowd_is_skipped(tmp_path):
    rng = np.random.default_rng(4)
    h, w = 60, 80
    (tmp_path / "images").mkdir()
    save_rgb(tmp_path / "images" / "a.jpg", rng, h, w)
    polys = [
        [[10.5, 10.2, 40.7, 12.0, 30.1, 50.9, 5.0, 40.0]],  # nested, one polygon
        [[50, 5, 79.9, 5, 79.9, 30, 50, 30], [60, 40, 70, 40, 65, 55]],  # two parts
        [1.0, 55.0, 20.0, 58.5, 10.0, 59.9],  # flat list (solaris writes these)
    ]
    anns = [
        {"id": j + 1, "image_id": 7, "category_id": 1, "segmentation": p, "iscrowd": 0} for j, p in enumerate(polys)
    ]
    crowd = encode_rle(np.ones((h, w), bool))
    anns.append({"id": 9, "image_id": 7, "category_id": 1, "segmentation": crowd, "iscrowd": 1})
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "height": h, "width": w}], "annotations": anns, "categories": []}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    coco = formats.load_coco(tmp_path / "a.json")
    s = CocoDataset(tmp_path / "images", tmp_path / "a.json", task="entity")[0]
    assert s.ann_ids == ["1", "2", "3"]
    for j, a in enumerate(anns[:2]):
        assert np.array_equal(s.masks[j], coco.annToMask(coco.anns[a["id"]]).astype(bool))
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polys[2]], h, w))).astype(bool)
    assert np.array_equal(s.masks[2], ref)
    assert len(CocoDataset(tmp_path / "images", tmp_path / "a.json", include_crowd=True)[0].ann_ids) == 4


def test_load_coco_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        formats.load_coco(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    p.write_text(json.dumps({"images": [], "annotations": [{"id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'image_id'"):
        formats.load_coco(p)


# --------------------------------------------------------------------------------------------- mask folders


def test_mask_folder_dis5k_layout_threshold_128(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    refs = {}
    for name in ("b", "a"):
        save_rgb(tmp_path / "im" / f"{name}.jpg", rng, 24, 32)
        gt = np.zeros((24, 32), np.uint8)
        gt[5:15, 5:20] = 129  # foreground: > 128
        gt[16:20, 5:20] = 128  # not foreground: == 128
        gt[0, 0] = 255
        Image.fromarray(gt).save(tmp_path / "gt" / f"{name}.png")
        refs[name] = gt > 128
    ds = MaskFolderDataset(tmp_path / "im", tmp_path / "gt")
    assert ds.image_ids == ["a", "b"] and ds.task == "salient" and ds.task_id == 1 and ds.name == tmp_path.name
    for i, name in enumerate(["a", "b"]):
        s = ds[i]
        assert s.masks.shape == (1, 24, 32) and np.array_equal(s.masks[0], refs[name])
        assert s.ann_ids == [name] and s.path.endswith(f"{name}.jpg")
        assert tuple(s.boxes[0]) == (0, 0, 19, 14)


def test_mask_folder_cascade_psp_same_folder(tmp_path):
    rng = np.random.default_rng(6)
    save_rgb(tmp_path / "x.jpg", rng, 10, 12)
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:9] = 255
    Image.fromarray(np.dstack([m, m, m])).save(tmp_path / "x.png")  # RGB mask: first channel
    ds = build_dataset(
        DatasetConfig(format="mask_folder", images=str(tmp_path), annotations=str(tmp_path), task="salient")
    )
    assert len(ds) == 1 and np.array_equal(ds[0].masks[0], m > 128)


# --------------------------------------------------------------------------------------------- SA-1B


def test_sa1b_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    h, w = 40, 50
    for n in (1, 2):
        save_rgb(tmp_path / f"sa_{n}.jpg", rng, h, w)
        masks = random_masks(rng, 3, h, w)
        anns = [
            sa1b_json.sa1b_annotation(m, j, predicted_iou=0.9, stability_score=0.96, point_coords=[[3, 4]])
            for j, m in enumerate(masks)
        ]
        sa1b_json.write_sa1b_json(
            tmp_path / f"sa_{n}.json", {"image_id": n, "file_name": f"sa_{n}.jpg", "height": h, "width": w}, anns
        )
        np.save(tmp_path / f"truth_{n}.npy", masks)
    info, anns = sa1b_json.read_sa1b_json(tmp_path / "sa_1.json")
    assert info["file_name"] == "sa_1.jpg" and anns[0]["predicted_iou"] == 0.9 and anns[0]["crop_box"] == [0, 0, w, h]
    assert set(anns[0]) >= {
        "segmentation",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        "point_coords",
        "crop_box",
        "id",
    }
    ds = build_dataset(DatasetConfig(format="sa1b", images=str(tmp_path), annotations=str(tmp_path)))
    assert isinstance(ds, Sa1bDataset) and ds.image_ids == ["sa_1", "sa_2"] and ds.task_id == 0
    for i, n in enumerate((1, 2)):
        s = ds[i]
        assert np.array_equal(s.masks, np.load(tmp_path / f"truth_{n}.npy")) and s.ann_ids == ["0", "1", "2"]


def test_build_dataset_unknown_format():
    with pytest.raises(ValueError, match="format 'voc'"):
        build_dataset(DatasetConfig(format="voc", annotations="x"))


def test_masks_to_coco_helper():
    m = np.zeros((2, 6, 7), bool)
    m[0, 1:3, 2:5] = True
    m[1, 5, 6] = True
    anns = formats.masks_to_coco(m, image_id=3, first_ann_id=10)
    assert [a["id"] for a in anns] == [10, 11] and anns[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and anns[1]["area"] == 1.0
    assert np.array_equal(formats.masks_to_boxes(m), np.array([[2, 1, 4, 2], [6, 5, 6, 5]], np.float32))
