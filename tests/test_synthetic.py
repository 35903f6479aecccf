"""The procedural world (sum.data.synthetic): determinism, exact and consistent ground truth at
every granularity, COCO round trip, roles, style shift."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from sum.config import WorldConfig, WorldSetConfig
from sum.data.synthetic import contact_sheet, generate_set, generate_world
from sum.data.world import categories, render_scene

from conftest import REPO

SIZE = 256  # small images keep the tests fast; the default world uses 512


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(
        out_dir=str(out),
        image_size=SIZE,
        sets={
            "hq": WorldSetConfig(task="salient", role="labeled", n_images=8, seed=1),
            "pool": WorldSetConfig(task="unspecified", role="unlabeled", n_images=4, seed=2),
            "parts": WorldSetConfig(task="part", role="benchmark", n_images=3, seed=3),
        },
    )
    paths = generate_world(cfg, workers=2, sheet_path=out / "sheet.png")
    return out, paths


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(101, i, SIZE, "default") for i in range(12)] + [render_scene(104, i, SIZE, "shift") for i in range(4)]


def test_a_world_elsewhere_keeps_its_sheet_beside_it(tmp_path, monkeypatch):
    from sum.data.synthetic import DEFAULT_SHEET, sheet_path_for

    monkeypatch.chdir(tmp_path)
    assert sheet_path_for("data/world") == DEFAULT_SHEET == sheet_path_for(tmp_path / "data" / "world")
    cfg = WorldConfig(out_dir="exp/world", image_size=SIZE, sets={"pool": WorldSetConfig(task="unspecified", role="unlabeled", n_images=1, seed=2)})
    generate_world(cfg, workers=1)
    assert (tmp_path / "exp" / "world" / "contact_sheet.png").is_file()
    assert not (tmp_path / DEFAULT_SHEET).exists()  # the pipeline's sheet is not touched


def test_workers_after_rendering_in_this_process_do_not_hang(tmp_path):
    """cv2 used here first, then forked workers (it hung: cv2's pool state crossed the fork)."""
    import subprocess
    import sys

    script = (
        "import cv2, sys\n"
        "from sum.config import WorldSetConfig\n"
        "from sum.data.synthetic import generate_set\n"
        "from sum.data.world.scene import render_scene\n"
        "render_scene(2, 0, 96, 'default')\n"
        "n = cv2.getNumThreads()\n"
        "generate_set(sys.argv[1], 'x', WorldSetConfig(task='salient', role='labeled', n_images=8, seed=1), 96, workers=2)\n"
        "assert cv2.getNumThreads() == n\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "x" / "images").glob("*.png"))) == 8


def test_same_seed_same_bytes_whatever_the_workers(world, tmp_path):
    out, paths = world
    again = generate_set(tmp_path, "hq", WorldSetConfig(task="salient", role="labeled", n_images=8, seed=1), SIZE, workers=1)
    assert _files(again) == _files(paths["hq"])


def test_different_seed_differs(world, tmp_path):
    _, paths = world
    other = generate_set(tmp_path, "hq", WorldSetConfig(task="salient", role="labeled", n_images=8, seed=5), SIZE, workers=1)
    a, b = _files(paths["hq"]), _files(other)
    assert a.keys() == b.keys()
    assert a["images/000001.png"] != b["images/000001.png"]
    assert a["annotations.json"] != b["annotations.json"]


def test_set_layout_info_and_no_leftovers(world):
    out, paths = world
    assert sorted(p.name for p in out.iterdir()) == ["hq", "parts", "pool", "sheet.png"]  # no *.tmp-*
    doc = json.loads((paths["hq"] / "annotations.json").read_text())
    assert doc["info"] == {"task": "salient", "role": "labeled", "seed": 1, "style": "default", "generator": "sum.data.synthetic", "licence": "CC0 (generated)", "image_size": SIZE}
    assert len(doc["images"]) == 8
    for img in doc["images"]:
        im = cv2.imread(str(paths["hq"] / "images" / img["file_name"]))
        assert im.shape[:2] == (img["height"], img["width"]) and max(im.shape[:2]) == SIZE
    assert {a["granularity"] for a in doc["annotations"]} == {"salient"}  # salient masks only
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert {names[a["category_id"]] for a in doc["annotations"]} <= {"figure", "insect", "lamp", "chair", "bicycle", "cart", "scissors", "plant", "kite"}
    assert {"sky", "bicycle", "bicycle:wheel", "lamp:cord"} <= set(names.values())


def test_coco_round_trip_is_bit_exact(world):
    _, paths = world
    coco = COCO(str(paths["hq"] / "annotations.json"))
    for img_id in coco.getImgIds():
        sc = render_scene(1, img_id - 1, SIZE, "default")
        want = [m for _, m in sc.salient_masks()]
        got = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))]
        assert len(got) == len(want) >= 1
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.array_equal(g, w)
        png = cv2.imread(str(paths["hq"] / "images" / f"{img_id:06d}.png"))[..., ::-1]
        assert np.array_equal(png, sc.image)


def test_unlabeled_has_no_annotations_but_hidden_gt(world):
    _, paths = world
    root = paths["pool"]
    doc = json.loads((root / "annotations.json").read_text())
    assert doc["annotations"] == [] and len(doc["images"]) == 4 and doc["info"]["role"] == "unlabeled"
    hidden = {g: json.loads((root / "hidden_gt" / f"annotations_{g}.json").read_text()) for g in ("salient", "entity", "part")}
    ent_ids = {a["id"] for a in hidden["entity"]["annotations"]}
    assert all(len(h["annotations"]) > 0 for h in hidden.values())
    assert {a["id"] for a in hidden["salient"]["annotations"]} <= ent_ids  # a salient object keeps its entity id
    assert all(a["parent_id"] in ent_ids for a in hidden["part"]["annotations"])


def test_benchmark_holds_its_task(world):
    _, paths = world
    doc = json.loads((paths["parts"] / "annotations.json").read_text())
    assert {a["granularity"] for a in doc["annotations"]} == {"part"}
    assert not (paths["parts"] / "hidden_gt").exists()


def test_masks_non_empty_and_image_sized(scenes):
    for sc in scenes:
        h, w = sc.image.shape[:2]
        for _, m in sc.entity_masks():
            assert m.shape == (h, w) and m.any()
        for *_, m in sc.part_masks():
            assert m.shape == (h, w) and m.any()
        assert len(sc.salient_masks()) >= 1


def test_entities_partition_the_image(scenes):
    for sc in scenes:
        count = np.sum([m.astype(np.int32) for _, m in sc.entity_masks()], axis=0)
        assert (count == 1).all()
        kinds = {sc.entities[e].isthing for e, _ in sc.entity_masks()}
        assert kinds == {True, False}  # objects and background stuff


def test_parts_partition_their_object(scenes):
    """Rule: a composite object is exactly covered by its parts, which do not overlap; stuff and the
    simple distractors (rock, ball, box, bush) have no parts."""
    for sc in scenes:
        ents = dict(sc.entity_masks())
        by_obj: dict = {}
        for e, _, m in sc.part_masks():
            assert not (m & ~ents[e]).any()  # inside its parent
            by_obj.setdefault(e, []).append(m)
        for e, m in ents.items():
            ent = sc.entities[e]
            if ent.parts:
                count = np.sum([p.astype(np.int32) for p in by_obj[e]], axis=0)
                assert np.array_equal(count, m.astype(np.int32))
            else:
                assert e not in by_obj


def test_thin_structures_exist(scenes):
    """Opening with a 5x5 kernel erases spokes, wires and legs (1-3 px wide): >5% of some salient masks."""
    k = np.ones((5, 5), np.uint8)
    lost = []
    for sc in scenes:
        for _, m in sc.salient_masks():
            opened = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, k) > 0
            lost.append(1 - opened.sum() / m.sum())
    assert max(lost) > 0.2 and np.mean(np.array(lost) > 0.05) > 0.3


def test_style_shift_changes_colour_statistics():
    def stats(style):
        ims = [render_scene(7, i, SIZE, style).image for i in range(8)]
        hsv = np.concatenate([cv2.cvtColor(im, cv2.COLOR_RGB2HSV).reshape(-1, 3) for im in ims]).astype(np.float64)
        return hsv[:, 1].mean(), hsv[:, 2].mean()

    (s0, v0), (s1, v1) = stats("default"), stats("shift")
    assert s1 < 0.8 * s0 and v1 < v0


def test_bad_set_config_names_the_set(tmp_path):
    with pytest.raises(ValueError, match="'oops'.*role"):
        generate_set(tmp_path, "oops", WorldSetConfig(role="training"), SIZE)
    with pytest.raises(ValueError, match="'b'.*style"):
        generate_set(tmp_path, "b", WorldSetConfig(style="noir"), SIZE)
    assert list(tmp_path.iterdir()) == []


def test_categories_have_stable_unique_ids():
    cats = categories()
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    assert len({c["name"] for c in cats}) == len(cats)


def test_contact_sheet(world):
    out, paths = world
    sheet = cv2.imread(str(out / "sheet.png"))
    assert sheet is not None and sheet.shape[1] == 4 * 256
    p = contact_sheet(out, ["parts"], out / "one.png", n_per_set=2)
    assert cv2.imread(str(p)).shape[0] > 2 * 150


def test_default_world_config():
    raw = OmegaConf.load(REPO / "params" / "data" / "world" / "default.yaml")
    cfg: WorldConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WorldConfig), raw))
    assert cfg.image_size == 512
    roles = {n: (s.role, s.task, s.style) for n, s in cfg.sets.items()}
    assert roles["hq_train"] == ("labeled", "salient", "default")
    assert roles["unlabeled"][0] == "unlabeled"
    assert roles["bench_shift"] == ("benchmark", "salient", "shift")
    assert {roles[f"bench_{t}"][1] for t in ("salient", "entity", "part")} == {"salient", "entity", "part"}


def test_generation_with_other_threads_running_does_not_deadlock(tmp_path):
    """A process with live threads (a test harness, a Dask client) must not fork workers: forked
    children can inherit a held lock and hang. Output equals the single-threaded run's."""
    import threading

    from sum.config import WorldSetConfig
    from sum.data.synthetic import generate_set

    cfg = WorldSetConfig(task="part", role="benchmark", n_images=8, seed=7)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        a = generate_set(tmp_path / "a", "s", cfg, image_size=96, workers=2)
    finally:
        stop.set()
        t.join()
    b = generate_set(tmp_path / "b", "s", cfg, image_size=96, workers=1)
    assert (a / "annotations.json").read_bytes() == (b / "annotations.json").read_bytes()
