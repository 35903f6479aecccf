"""Pseudo-label stage (sum.pseudo.run) and store (sum.pseudo.store): shards on Dask equal one
process, a killed run resumes to the same bytes, a changed generator setting invalidates shards,
and the dataset that reads them applies spec §3.5."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, model_config

from sum.config import Config, DatasetConfig, EmbedConfig, PseudoConfig, WorldSetConfig
from sum.data.coco import decode_rle
from sum.data.image_files import write_image
from sum.data.synthetic import generate_set
from sum.model.checkpoint import load_model
from sum.model.lowres import upsample_low_res
from sum.model.embeddings import run_embed
from sum.pseudo.run import pseudolabel
from sum.pseudo.dataset import PseudoLabelDataset, _input_size
from sum.pseudo.store import (
    MASK_ID_STRIDE,
    iter_pseudo_labels,
    keep_by_ratio,
    list_shards,
    read_shard,
    select_masks,
    write_npz,
)

N_IMAGES, SHARD_SIZE = 6, 2
# random weights: no IoU or stability filter and no NMS, so that every image gets 48 masks
TEST_AMG = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)

KILL_SCRIPT = """
import os, pickle, signal, sys, tempfile
import torch
torch.set_num_threads(1)
import sum.pseudo.store as store
from sum.pseudo.run import pseudolabel

cfg = pickle.loads(open(sys.argv[1], "rb").read())
real, calls = store.atomic_write_text, []

def write_then_die(path, text):
    calls.append(path)
    if len(calls) == 2:  # shard 1: its npz is in place, its json not yet; leave a temporary behind
        tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, text)

store.atomic_write_text = write_then_die
pseudolabel(cfg)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six 128-px procedural images and their embeddings by the tiny model (seed 0)."""
    root = tmp_path_factory.mktemp("pseudo")
    folder = generate_set(root, "pool", WorldSetConfig(task="unspecified", role="unlabeled", n_images=N_IMAGES, seed=3), image_size=128, workers=1)
    cfg = _cfg(root, folder, root / "unused")
    run_embed(cfg)
    return root, folder


def _cfg(root: Path, folder: Path, out: Path, **pseudo) -> Config:
    cfg = Config()
    cfg.model = model_config("tiny")
    cfg.data.datasets = {
        "pool": DatasetConfig(format="coco", images=str(folder / "images"), annotations=str(folder / "annotations.json"), role="unlabeled"),
        "bench": DatasetConfig(format="coco", images=str(folder / "images"), annotations=str(folder / "annotations.json"), role="benchmark"),
    }
    cfg.embed = EmbedConfig(out_dir=str(root / "emb"), datasets=["pool"])
    settings = dict(TEST_AMG, shard_size=SHARD_SIZE, n_workers=0, threads_per_worker=1)
    settings.update(pseudo)
    cfg.pseudo = PseudoConfig(out_dir=str(out), metrics=str(out.parent / f"{out.name}-metrics.json"), **settings)
    return cfg


def _files(out: Path) -> dict:
    """name -> bytes of every file of the dataset folder."""
    return {p.name: p.read_bytes() for p in sorted((out / "pool").iterdir())}


@pytest.fixture(scope="module")
def clean(world):
    """One clean in-process run: (output folder, metrics)."""
    root, folder = world
    out = root / "clean"
    metrics = pseudolabel(_cfg(root, folder, out))
    return out, metrics


def test_clean_run_writes_complete_shards(world, clean):
    out, metrics = clean
    assert list_shards(out, "pool") == [0, 1, 2]
    assert sorted(_files(out)) == [f"shard-0000{i}.{ext}" for i in range(3) for ext in ("json", "npz")]
    assert metrics["datasets"].keys() == {"pool"}  # only the role-unlabeled dataset
    m = metrics["datasets"]["pool"]
    assert (m["images"], m["shards_computed"], m["shards_reused"]) == (N_IMAGES, 3, 0)
    assert metrics["masks"] == N_IMAGES * 48 and metrics["masks_per_image"] == 48
    assert metrics["model_loads"] == 0  # in-process: the driver's model
    assert json.loads(Path(_cfg(*world, out).pseudo.metrics).read_text())["masks"] == metrics["masks"]

    doc, logits = read_shard(out, "pool", 1)
    assert doc["config_hash"] == m["config_hash"] and doc["img_size"] == 128
    assert logits.dtype == np.float16 and logits.shape == (2 * 48, 32, 32)
    ann = doc["images"][0]["annotations"][5]
    assert set(ann) == {"id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box", "logit_index"}
    assert ann["logit_index"] == 5 and doc["images"][1]["annotations"][0]["logit_index"] == 48
    assert ann["id"] == 2 * MASK_ID_STRIDE + 6  # image position 2, mask 5
    ids = [a["id"] for _, anns, _ in iter_pseudo_labels(out, "pool") for a in anns]
    assert len(set(ids)) == len(ids) == N_IMAGES * 48

    # the stored mask is SAM's postprocessed logit > 0 (spec §3.3); fp16 storage may flip a pixel at 0
    torch.manual_seed(0)
    model = load_model(model_config("tiny"))
    record, anns, logits_m = next(iter_pseudo_labels(out, "pool"))
    h, w = record["height"], record["width"]
    up = model.postprocess_masks(torch.as_tensor(logits_m[:, None].astype(np.float32)), _input_size(h, w, 128), (h, w))[:, 0]
    masks = np.stack([decode_rle(a["segmentation"]) for a in anns])
    assert (masks == (up > 0).numpy()).mean() > 0.999
    assert [a["area"] for a in anns] == masks.sum(axis=(1, 2)).tolist()


def test_dask_cluster_of_two_workers_equals_one_process(world, clean):
    root, folder = world
    out = root / "dask"
    metrics = pseudolabel(_cfg(root, folder, out, n_workers=2))
    assert metrics["workers"] == "local:2x1" and metrics["datasets"]["pool"]["shards_computed"] == 3
    assert 1 <= metrics["model_loads"] <= 2  # once per worker process, not per shard
    assert _files(out) == _files(clean[0])


def test_killed_run_resumes_to_the_clean_result(world, clean, tmp_path):
    root, folder = world
    out = root / "killed"
    cfg = _cfg(root, folder, out)
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    (tmp_path / "run.py").write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.pkl")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = {p.name for p in (out / "pool").iterdir()}
    assert {"shard-00000.json", "shard-00000.npz", "shard-00001.npz"} <= left and "shard-00001.json" not in left
    assert any(n.endswith(".tmp") for n in left)
    first = (out / "pool" / "shard-00000.json").stat()

    metrics = pseudolabel(cfg)
    m = metrics["datasets"]["pool"]
    assert (m["shards_reused"], m["shards_computed"]) == (1, 2)
    assert metrics["images_computed"] == N_IMAGES - SHARD_SIZE
    after = (out / "pool" / "shard-00000.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not recomputed
    assert _files(out) == _files(clean[0])


def test_changed_generator_setting_invalidates_shards(world, clean):
    root, folder = world
    out = root / "changed"
    (out / "pool").mkdir(parents=True)
    for name, data in _files(clean[0]).items():
        (out / "pool" / name).write_bytes(data)
    (out / "pool" / "shard-00007.json").write_text("{}")  # past the last shard: removed

    same = pseudolabel(_cfg(root, folder, out))["datasets"]["pool"]
    assert (same["shards_computed"], same["shards_reused"]) == (0, 3)
    assert not (out / "pool" / "shard-00007.json").exists()

    changed = pseudolabel(_cfg(root, folder, out, box_nms_thresh=0.7))["datasets"]["pool"]
    assert changed["shards_computed"] == 3 and changed["config_hash"] != same["config_hash"]
    assert changed["masks_per_image"] < same["masks_per_image"]
    assert {read_shard(out, "pool", s)[0]["config_hash"] for s in range(3)} == {changed["config_hash"]}
    # the read-time selection (spec §3.5) is not a generator setting
    again = pseudolabel(_cfg(root, folder, out, box_nms_thresh=0.7, min_ratio=5, max_masks_per_image=3))["datasets"]["pool"]
    assert again["shards_computed"] == 0


def test_changed_image_or_generator_code_recomputes_its_shards(world, tmp_path, monkeypatch):
    """Shards are reused only for the same image content and the same generator source: an image
    replaced under its id (and re-embedded by ``embed``) recomputes its own shard only, a changed
    `sum.pseudo.amg` every shard (DVC re-runs the stage on either; the persisted shards must not
    hand back the old masks)."""
    import shutil

    from PIL import Image, ImageOps

    import sum.pseudo.run as run

    _, folder = world
    pool = tmp_path / "pool"
    shutil.copytree(folder, pool)
    cfg = _cfg(tmp_path, pool, tmp_path / "out")
    run_embed(cfg)
    first = pseudolabel(cfg)["datasets"]["pool"]
    assert (first["shards_computed"], first["shards_reused"]) == (3, 0)

    name = json.loads((pool / "annotations.json").read_text())["images"][0]["file_name"]
    path = pool / "images" / name
    with Image.open(path) as im:
        inverted = ImageOps.invert(im.convert("RGB"))
    inverted.save(path, format=Image.registered_extensions()[path.suffix.lower()])
    run_embed(cfg)
    second = pseudolabel(cfg)["datasets"]["pool"]
    assert (second["shards_computed"], second["shards_reused"]) == (1, 2)
    assert read_shard(tmp_path / "out", "pool", 0)[0]["inputs_hash"] != read_shard(tmp_path / "out", "pool", 1)[0]["inputs_hash"]

    monkeypatch.setattr(run, "code_hash", lambda: "another generator")
    third = pseudolabel(cfg)["datasets"]["pool"]
    assert third["shards_computed"] == 3 and third["config_hash"] != second["config_hash"]


def test_unreachable_scheduler_is_one_line_naming_it(world, tmp_path):
    root, folder = world
    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = _cfg(root, folder, tmp_path / "out", scheduler_address=address, connect_timeout_s=1.0)
    with pytest.raises(RuntimeError, match=f"pseudo.scheduler_address='{address}': Dask scheduler unreachable") as e:
        pseudolabel(cfg)
    assert "\n" not in str(e.value)


def test_missing_embeddings_name_the_index(world, tmp_path):
    root, folder = world
    cfg = _cfg(root, folder, tmp_path / "out")
    cfg.embed.out_dir = str(tmp_path / "no-emb")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no-emb" / "pool" / "index.json")):
        pseudolabel(cfg)


# ---- reading: spec §3.5 ------------------------------------------------------------------------


def test_keep_by_ratio_hand_values():
    # README values: min_ratio 100 -> at least 10,000 px at the 1024 scale; max_ratio 0.95
    assert keep_by_ratio(10_000, 1024, 1024, 100, 0.95)
    assert not keep_by_ratio(9_999, 1024, 1024, 100, 0.95)
    assert keep_by_ratio(2_500, 512, 384, 100, 0.95)  # 2,500 * (1024 / 512)^2 = 10,000
    assert not keep_by_ratio(2_499, 512, 384, 100, 0.95)
    assert keep_by_ratio(0.95 * 512 * 384, 512, 384, 100, 0.95)
    assert not keep_by_ratio(0.951 * 512 * 384, 512, 384, 100, 0.95)


def test_select_masks_uniform_without_replacement_sorted_by_id():
    anns = [{"id": i} for i in range(100, 0, -1)]
    picked = select_masks(anns, 40, np.random.default_rng(0))
    ids = [a["id"] for a in picked]
    assert len(ids) == len(set(ids)) == 40 and ids == sorted(ids)
    assert ids == [a["id"] for a in select_masks(anns, 40, np.random.default_rng(0))]
    assert ids != [a["id"] for a in select_masks(anns, 40, np.random.default_rng(1))]
    assert [a["id"] for a in select_masks(anns[:5], 40, np.random.default_rng(0))] == [96, 97, 98, 99, 100]


def test_upsample_low_res_is_sams_postprocessing():
    torch.manual_seed(0)
    model = load_model(model_config("tiny"))
    maps = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    expected = model.postprocess_masks(torch.as_tensor(maps[:, None]), (96, 128), (300, 400))[:, 0].numpy()
    np.testing.assert_allclose(upsample_low_res(maps, 128, (96, 128), (300, 400)), expected, rtol=0, atol=1e-6)


def test_npz_bytes_depend_only_on_the_arrays(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 2, 2)
    write_npz(tmp_path / "a.npz", logits=a)
    write_npz(tmp_path / "b.npz", logits=a.copy())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["logits"], a)


def test_pseudo_label_dataset(world, clean, tmp_path):
    root, folder = world
    out = clean[0]
    every = PseudoLabelDataset(folder / "images", out, "pool", min_ratio=0, max_ratio=1.0, max_masks=None)
    assert len(every) == N_IMAGES and every.task_id == 0
    assert every.n_masks == every.n_kept == N_IMAGES * 48
    sample = every[2]
    assert sample.masks.shape == (48, *sample.image.shape[:2]) and sample.masks.dtype == bool
    assert sample.uncertainty is None and sample.boxes.shape == (48, 4)
    rec, anns, _ = list(iter_pseudo_labels(out, "pool"))[2]
    assert sample.image_id == rec["image_id"] and sample.ann_ids == [str(a["id"]) for a in anns]
    np.testing.assert_array_equal(sample.masks, np.stack([decode_rle(a["segmentation"]) for a in anns]))
    assert every.problems(2) == [] and every.dataset_problems() == []

    # spec §3.5 at read time: ratio filters at construction, max_masks per load, re-drawn per epoch
    areas = np.array([a["area"] for _, anns, _ in iter_pseudo_labels(out, "pool") for a in anns])
    min_ratio = float(np.round(np.median(areas) / 100))  # 100 * min_ratio px at the 128 px input
    threshold = 100 * min_ratio
    ds = PseudoLabelDataset(folder / "images", out, "pool", min_ratio=min_ratio, max_ratio=0.95, max_masks=5)
    assert 0 < ds.n_kept == int(((areas >= threshold) & (areas <= 0.95 * 128 * 96)).sum()) < len(areas)
    s0 = ds[0]
    assert len(s0.ann_ids) == min(5, len(ds.annotation_ids(0))) and s0.ann_ids == sorted(s0.ann_ids, key=int)
    assert ds[0].ann_ids == s0.ann_ids
    ds.set_epoch(1)
    assert any(ds[i].ann_ids != PseudoLabelDataset(folder / "images", out, "pool", min_ratio=min_ratio, max_masks=5)[i].ann_ids for i in range(len(ds)))

    # uncertainty maps beside the shards: u uint8 in logit_index order, upsampled like the logits
    udir = tmp_path / "u"
    (udir / "pool").mkdir(parents=True)
    for shard in list_shards(out, "pool"):
        doc, logits = read_shard(out, "pool", shard)
        u = (np.arange(len(logits))[:, None, None] + np.zeros((1, 32, 32))).astype(np.uint8)
        write_npz(udir / "pool" / f"shard-{shard:05d}.npz", u=u)
    withu = PseudoLabelDataset(folder / "images", out, "pool", uncertainty_dir=udir, min_ratio=0, max_ratio=1.0, max_masks=None, min_refine_ratio=min_ratio)
    s = withu[3]  # shard 1, second image: logit rows 48..95
    assert s.uncertainty.shape == s.masks.shape and s.uncertainty.dtype == np.float32
    rows = [a["logit_index"] for a in list(iter_pseudo_labels(out, "pool"))[3][1]]
    big = np.array([a["area"] >= threshold for a in list(iter_pseudo_labels(out, "pool"))[3][1]])
    np.testing.assert_allclose(s.uncertainty[big][:, 10, 10], np.array(rows)[big] / 255.0, atol=1e-6)
    assert np.all(s.uncertainty[~big] == 0)  # below min_refine_ratio: certain

    missing = PseudoLabelDataset(folder / "images", out, "pool", uncertainty_dir=tmp_path / "none", min_ratio=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "pool" / "shard-00000.npz")):
        missing[0]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / "pool")):
        PseudoLabelDataset(folder / "images", tmp_path / "nothing", "pool")


def test_pseudo_label_dataset_problems_name_the_image_and_the_shard(world, clean, tmp_path):
    root, folder = world
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    ds = PseudoLabelDataset(images, clean[0], "pool", min_ratio=0, max_ratio=1.0, max_masks=None)
    h, w = ds.images[0]["height"], ds.images[0]["width"]
    write_image(ds.image_path(0), np.zeros((h + 1, w, 3), np.uint8))
    ds.image_path(1).unlink()
    (wrong,) = ds.problems(0)
    assert (wrong.file, wrong.reason, wrong.index) == (str(ds.image_path(0)), "image_size_mismatch", 0)
    assert wrong.detail == f"image is {h + 1}x{w}, shard-00000.json says {h}x{w}"
    (missing,) = ds.problems(1)
    assert (missing.file, missing.reason) == (str(ds.image_path(1)), "missing_image")
    assert ds.problems(2) == []


def test_torch_threads_per_task_is_separate_from_dask_task_slots():
    from sum.config import PseudoConfig
    from sum.pseudo.cluster import task_threads

    assert task_threads(PseudoConfig(threads_per_worker=3, torch_threads=0)) == 3
    assert task_threads(PseudoConfig(threads_per_worker=1, torch_threads=2)) == 2
    assert task_threads(PseudoConfig(threads_per_worker=0, torch_threads=0)) == 1
