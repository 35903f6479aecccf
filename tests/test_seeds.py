"""``sumseg seeds`` (`sum.eval.seeds`, `sum.eval.seed_stats`; spec §9-10): the aggregation against
hand-computed values on records written here (mean ± sd over seeds, seed-averaged differences,
the interval around its point, the beyond-noise rule both ways, the part split, examples outside
the rows); then, on a tiny project (the tiny model, 3 images), a whole run of 2 methods x 2 seeds
x 2 iterations, its resume, and a bad method name refused in one line."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sum.config as sc
from sum.cli import main
from sum.eval import seeds as seeds_mod
from sum.eval.report import per_mask_rows
from sum.eval.scoring import MaskRecord
from sum.eval.seed_stats import model_name, seed_summary, seeds_markdown
from sum.eval.seeds import read_per_mask

from test_bad_input import project_config, set_params, write_params


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the aggregation, by hand ---------------------------------------------------------------------

# Targets: (dataset, image, mask, resolvable). s1: salient, two images; p1: part, image j1 holds a
# resolvable and a sub-resolution target, j2 one resolvable; ex: an example (one image).
TARGETS = [("s1", "i1", "0", True), ("s1", "i2", "0", True), ("p1", "j1", "m1", True), ("p1", "j1", "m2", False),
           ("p1", "j2", "m3", True), ("ex", "e1", "0", True)]
DATASET_TASK = {"s1": "salient", "p1": "part", "ex": "salient"}
FOUNDATION_IOU = {"i1": 0.5, "i2": 0.7, "m1": 0.4, "m2": 0.1, "m3": 0.6, "e1": 0.9}  # round 1; round 2 adds 0.05
# method a: +0.1 with seed 0, +0.3 with seed 1, everywhere. Method b: per target (seed 1 adds 0.01):
B_GAIN = {"i1": 0.25, "i2": 0.15, "m1": 0.3, "m2": 0.3, "m3": -0.3, "e1": -0.5}


def hand_records() -> list:
    out = []

    def add(model: str, gain) -> None:
        for d, image, ann, resolvable in TARGETS:
            key = ann if d == "p1" else image
            v = FOUNDATION_IOU[key] + gain(key)
            out.append(MaskRecord(model=model, protocol="point", dataset=d, image_id=image, ann_id=ann, area=10,
                                  task_prompt=0, iou=[v, v + 0.05], biou=[v, v], clicks=[], noc={"noc85": 2},
                                  image_area=100, nof={"nof95": 1}, width_px=3.0, resolvable=resolvable))

    add("foundation", lambda k: 0.0)
    for seed, gain in ((0, 0.1), (1, 0.3)):
        add(model_name("a", seed), lambda k, g=gain: g)
    for seed, extra in ((0, 0.0), (1, 0.01)):
        add(model_name("b", seed), lambda k, e=extra: B_GAIN[k] + e)
    return out


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    """The records written to a per-mask CSV as the evaluation writes it, read back, summarised."""
    path = tmp_path_factory.mktemp("hand") / "per_mask.csv"
    header, rows = per_mask_rows(hand_records())
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    records = read_per_mask(path)
    comparisons = [("a", "foundation"), ("b", "foundation"), ("b", "a")]
    return seed_summary(records, DATASET_TASK, ["a", "b"], [0, 1], comparisons,
                        rounds=[1, 2, 5], examples=["ex"], samples=2000, level=0.95)


def test_read_per_mask_inverts_the_evaluations_csv(tmp_path):
    path = tmp_path / "per_mask.csv"
    written = hand_records()
    header, rows = per_mask_rows(written)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    back = read_per_mask(path)
    assert [(r.model, r.dataset, r.image_id, r.ann_id, r.resolvable, r.noc, r.nof) for r in back] == \
        [(r.model, r.dataset, r.image_id, r.ann_id, r.resolvable, r.noc, r.nof) for r in written]
    assert np.allclose([r.iou for r in back], [r.iou for r in written], atol=1e-6)


def test_rows_and_rounds(hand):
    point = hand["protocols"]["point"]
    assert list(hand["protocols"]) == ["point"] and point["rounds"] == [1, 2]  # round 5 does not exist
    assert point["rows"] == ["salient", "part", "part (resolvable)", "part (sub-resolution)", "overall"]
    assert point["n_masks"] == {"salient": 2, "part": 3, "part (resolvable)": 2, "part (sub-resolution)": 1,
                                "overall": 5}
    assert hand["examples"] == ["ex"] and list(point["scores"]) == ["foundation", "a", "b"]


def test_mean_and_sd_over_seeds(hand):
    s = hand["protocols"]["point"]["scores"]
    # foundation: salient (0.5 + 0.7) / 2 (the example's 0.9 is in no row), part (0.4 + 0.1 + 0.6) / 3,
    # resolvable (0.4 + 0.6) / 2, sub-resolution 0.1, overall the mean of the two benchmark means
    f = {"salient": 0.6, "part": 1.1 / 3, "part (resolvable)": 0.5, "part (sub-resolution)": 0.1,
         "overall": (0.6 + 1.1 / 3) / 2}
    for row, v in f.items():
        assert s["foundation"][row]["miou_1"] == {"mean": pytest.approx(v, abs=1e-4), "sd": None}
        assert s["foundation"][row]["miou_2"]["mean"] == pytest.approx(v + 0.05, abs=1e-4)
        # a: seeds at +0.1 and +0.3: mean +0.2, sd |0.3 - 0.1| / sqrt(2)
        assert s["a"][row]["miou_1"]["mean"] == pytest.approx(v + 0.2, abs=1e-4)
        assert s["a"][row]["miou_1"]["sd"] == pytest.approx(0.2 / np.sqrt(2), abs=1e-4)
    # b, seed 0: salient (0.75 + 0.85) / 2 = 0.8, seed 1: 0.81; part (0.7 + 0.4 + 0.3) / 3, then + 0.01
    assert s["b"]["salient"]["miou_1"]["mean"] == pytest.approx(0.805, abs=1e-4)
    assert s["b"]["salient"]["miou_1"]["sd"] == pytest.approx(0.01 / np.sqrt(2), abs=1e-4)
    assert s["b"]["part"]["miou_1"]["mean"] == pytest.approx(1.4 / 3 + 0.005, abs=1e-4)
    assert s["b"]["part (sub-resolution)"]["miou_1"]["mean"] == pytest.approx(0.405, abs=1e-4)


def test_seed_averaged_differences_and_their_intervals(hand):
    c = hand["protocols"]["point"]["comparisons"]
    assert list(c) == ["a vs foundation", "b vs foundation", "b vs a"]
    # a: +0.2 on every target (seed-averaged), so every redraw gives +0.2; the seed sd is 0.1414
    a = c["a vs foundation"]["salient"]["miou_1"]
    assert a["delta"] == pytest.approx(0.2, abs=1e-6) and a["lo"] == pytest.approx(0.2, abs=1e-6)
    assert a["hi"] == pytest.approx(0.2, abs=1e-6) and a["seed_sd"] == pytest.approx(0.2 / np.sqrt(2), abs=1e-6)
    # b vs a on salient: per image (0.755 - 0.7) and (0.855 - 0.9); per seed 0.8 - 0.7 and 0.81 - 0.9
    ba = c["b vs a"]["salient"]["miou_1"]
    assert ba["delta"] == pytest.approx(0.005, abs=1e-6)
    assert ba["seed_sd"] == pytest.approx(np.std([0.1, -0.09], ddof=1), abs=1e-6)
    # b on part: per image +0.6 over 2 masks and -0.3 over 1; a redraw of 2 images gives 0.3, 0.1 or
    # -0.3, widened about the point 0.1 by sqrt(2); seed 1 adds 0.01 to every target (0.005 averaged)
    bp = c["b vs foundation"]["part"]["miou_1"]
    assert bp["delta"] == pytest.approx(0.105, abs=1e-6)
    assert bp["lo"] == pytest.approx(0.105 - np.sqrt(2) * 0.4, abs=1e-6)
    assert bp["hi"] == pytest.approx(0.105 + np.sqrt(2) * 0.2, abs=1e-6)
    for comp in c.values():
        for row in comp.values():
            for cell in row.values():
                if cell["lo"] is not None:
                    assert cell["lo"] - 1e-9 <= cell["delta"] <= cell["hi"] + 1e-9
    # the sub-resolution row holds one image: no interval
    assert c["b vs foundation"]["part (sub-resolution)"]["miou_1"]["lo"] is None


def test_beyond_noise_both_ways(hand):
    c = hand["protocols"]["point"]["comparisons"]
    # interval excludes 0 and the difference is over 2 seed sd: beyond noise
    b = c["b vs foundation"]["salient"]["miou_1"]
    assert b["lo"] > 0 and abs(b["delta"]) > 2 * b["seed_sd"] and b["beyond_noise"] is True
    # interval excludes 0 but 0.2 < 2 x 0.1414: not beyond noise
    a = c["a vs foundation"]["salient"]["miou_1"]
    assert a["lo"] > 0 and abs(a["delta"]) < 2 * a["seed_sd"] and a["beyond_noise"] is False
    # over 2 seed sd but the interval holds 0: not beyond noise
    bp = c["b vs foundation"]["part"]["miou_1"]
    assert bp["lo"] < 0 < bp["hi"] and abs(bp["delta"]) > 2 * bp["seed_sd"] and bp["beyond_noise"] is False
    # no interval: not beyond noise
    assert c["b vs foundation"]["part (sub-resolution)"]["miou_1"]["beyond_noise"] is False


def test_markdown(hand):
    text = seeds_markdown(hand)
    assert "| salient | 1 | 2 | 60.0 | 80.0 \u00b1 14.1 | 80.5 \u00b1 0.7 |" in text
    assert "| Task | clicks | a \u2212 foundation | b \u2212 foundation | b \u2212 a |" in text
    assert "**+20.5 [+13.4, +27.6] \u2191, sd 0.7**" in text  # b on salient: beyond noise
    assert "+20.0 [+20.0, +20.0] \u2191, sd 14.1 |" in text  # a on salient: interval only
    assert "[n/a]" in text and "Examples outside every row: ex." in text


# ---- the command on a tiny project -------------------------------------------------------------


def tiny_seeds_config() -> sc.Config:
    """The tiny project (`test_bad_input.project_config`) with ``seeds``: hq_only and vanilla, 2
    seeds, 2 iterations of 2 images each, the point protocol after 1 and 2 clicks on 3 images."""
    cfg = project_config()
    cfg.train.iterations = 2
    cfg.train.batch_size = 2  # one labeled and one pseudo-labeled image a step (vanilla)
    cfg.eval.rounds = 2
    cfg.eval.max_images = 0
    cfg.eval.max_masks_per_image = 2
    cfg.seeds = sc.SeedsConfig(methods=["hq_only", "vanilla"], seeds=[0, 1], comparisons=["vanilla vs hq_only"],
                               protocols=["point"], rounds=[1, 2], bootstrap=200)
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny project: its world set, foundation checkpoint (every seed starts from the same
    weights, as from a real checkpoint), ``params.yaml``, embeddings and pseudo labels."""
    from sum.data.synthetic import generate_set
    from sum.model.build import build_sum_model
    from sum.model.embed import run_embed
    from sum.pseudo.run import pseudolabel

    root = tmp_path_factory.mktemp("seeds")
    generate_set(root / "data", "world", sc.WorldSetConfig(task="salient", role="labeled", n_images=3, seed=2),
                 image_size=64, workers=1)
    cfg = tiny_seeds_config()
    torch.manual_seed(0)
    torch.save(build_sum_model(cfg.model).state_dict(), root / "data" / "tiny.pt")
    cfg.model.checkpoint = "data/tiny.pt"
    write_params(root, cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        torch.set_num_threads(1)
        run_embed(cfg)
        pseudolabel(cfg)
    return root


@pytest.fixture(scope="module")
def ran(base, tmp_path_factory):
    """A copy of the project after ``sumseg seeds``: (folder, seconds, metrics)."""
    root = tmp_path_factory.mktemp("seeds_run") / "project"
    shutil.copytree(base, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        t0 = time.perf_counter()
        assert main(["seeds"]) == 0
        seconds = time.perf_counter() - t0
    return root, seconds, json.loads((root / "metrics/seeds.json").read_text())


def test_a_whole_run(ran):
    root, seconds, metrics = ran
    assert seconds < 45, f"2 methods x 2 seeds x 2 iterations took {seconds:.0f} s"
    assert metrics["format"] == "sum-seeds/1" and metrics["seeds"] == [0, 1]
    assert sorted(metrics["models"]) == ["foundation", "hq_only_s0", "hq_only_s1", "vanilla_s0", "vanilla_s1"]
    for name in ("hq_only_s0", "hq_only_s1", "vanilla_s0", "vanilla_s1"):
        assert (root / f"outputs/seeds/models/{name}.pt").is_file()
        assert metrics["timings_s"][name] > 0
        record = json.loads((root / f"outputs/seeds/models/{name}.json").read_text())
        assert record["finetune"]["steps"] == 2
        assert record["finetune"]["unlabeled_per_step"] == (1 if name.startswith("vanilla") else 0)
    assert not (root / "outputs/seeds/runs").exists() or not any((root / "outputs/seeds/runs").iterdir())
    assert not (root / "metrics/eval.json").exists()  # the evaluation wrote under outputs/seeds/eval
    assert (root / "outputs/seeds/eval/per_mask.csv").is_file()
    point = metrics["protocols"]["point"]
    assert point["rows"] == ["salient", "overall"] and point["rounds"] == [1, 2]
    assert list(point["comparisons"]) == ["hq_only vs foundation", "vanilla vs foundation", "vanilla vs hq_only"]
    for col in ("hq_only", "vanilla"):
        cell = point["scores"][col]["salient"]["miou_1"]
        assert 0.0 <= cell["mean"] <= 1.0 and cell["sd"] is not None
    table = (root / "outputs/seeds/table.md").read_text()
    assert "| Task | clicks | masks | foundation | hq_only | vanilla |" in table
    # the seeds' checkpoints are different runs: seed 0 and seed 1 of a method differ
    from sum.model.checkpoint import read_checkpoint

    s0 = read_checkpoint(root / "outputs/seeds/models/vanilla_s0.pt").state_dict
    s1 = read_checkpoint(root / "outputs/seeds/models/vanilla_s1.pt").state_dict
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert read_checkpoint(root / "outputs/seeds/models/vanilla_s1.pt").meta["method"] == "vanilla"


def test_resume_skips_finished_runs(ran, monkeypatch, tmp_path):
    root, _, metrics = ran
    monkeypatch.chdir(root)
    calls = []
    real, real_evaluate = seeds_mod.finetune, seeds_mod.run_evaluate

    def counted(cfg, method_name):
        calls.append((method_name, cfg.train.seed))
        return real(cfg, method_name)

    def no_evaluation(cfg):
        raise AssertionError("the evaluation of the same checkpoints ran again")

    monkeypatch.setattr(seeds_mod, "finetune", counted)
    monkeypatch.setattr(seeds_mod, "run_evaluate", no_evaluation)
    assert main(["seeds"]) == 0
    assert calls == []
    again = json.loads((root / "metrics/seeds.json").read_text())
    assert again["protocols"] == metrics["protocols"]
    # a run without its record (killed before it was written) is trained again, alone; training
    # is deterministic, so its checkpoint has the same bytes and the evaluation still holds
    ckpt = root / "outputs/seeds/models/hq_only_s1.pt"
    before = ckpt.read_bytes()
    (root / "outputs/seeds/models/hq_only_s1.json").unlink()
    assert main(["seeds"]) == 0
    assert calls == [("hq_only", 1)] and ckpt.read_bytes() == before
    assert json.loads((root / "metrics/seeds.json").read_text())["protocols"] == metrics["protocols"]
    # in a copy (the module's run stays as it was): a checkpoint whose bytes changed, its record
    # intact, is not trained again but evaluated again
    copy = tmp_path / "project"
    shutil.copytree(root, copy)
    monkeypatch.chdir(copy)
    evaluations = []
    monkeypatch.setattr(seeds_mod, "run_evaluate", lambda cfg: evaluations.append(cfg) or real_evaluate(cfg))
    ckpt = copy / "outputs/seeds/models/hq_only_s1.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    name = next(k for k, v in state["state_dict"].items() if torch.is_floating_point(v))
    state["state_dict"][name] = state["state_dict"][name] + 1e-3
    torch.save(state, ckpt)
    assert main(["seeds"]) == 0
    assert calls == [("hq_only", 1)] and len(evaluations) == 1


def test_an_unknown_method_is_one_line_naming_seeds_methods(base, tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    set_params(**{"seeds.methods": ["hq_only", "hq_onyl"]})(root)
    assert main(["seeds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seeds.methods" in err[0] and "hq_onyl" in err[0], err
    assert not (root / "outputs/seeds").exists() and not (root / "metrics/seeds.json").exists()


# ---- variants: a method on other uncertainty maps (the dose-response, params/seeds/dose.yaml) ---


def test_a_variant_is_its_method_on_its_own_uncertainty_maps(tmp_path, monkeypatch):
    from sum.train.method import resolve_method

    cfg = tiny_seeds_config()
    maps = tmp_path / "u_oracle"
    maps.mkdir()
    cfg.seeds = sc.SeedsConfig(methods=["sum", "sum@oracle"], seeds=[0], comparisons=["sum@oracle vs sum"],
                               protocols=["point"], rounds=[1], uncertainty_variants={"oracle": str(maps)})
    methods, pairs = seeds_mod.check_seeds_config(cfg)
    assert [m.name for m in methods] == ["sum", "sum@oracle"]
    assert dataclasses.replace(methods[1], name="sum") == methods[0] and methods[0].uses_uncertainty
    assert ("sum@oracle", "sum") in pairs
    seen = []

    class Stop(Exception):
        pass

    def record(run_cfg, name):
        assert resolve_method(run_cfg, name) is run_cfg.method  # what finetune trains
        seen.append((name, run_cfg.train.uncertainty_dir, seeds_mod.run_key(run_cfg, run_cfg.method)))
        raise Stop

    monkeypatch.setattr(seeds_mod, "finetune", record)
    for method in methods:
        with pytest.raises(Stop):
            seeds_mod.train_seed(cfg, method, 0, tmp_path / "out")
    (plain, plain_dir, plain_key), (variant, variant_dir, variant_key) = seen
    assert (plain, plain_dir) == ("sum", cfg.train.uncertainty_dir)
    assert (variant, variant_dir) == ("sum@oracle", str(maps)) and variant_key != plain_key
    from sum.eval.protocol import MODEL_NAME

    assert model_name("sum@oracle", 2) == "sum-oracle_s2" and MODEL_NAME.match(model_name("sum@oracle", 2))


@pytest.mark.parametrize("methods, variants, message", [
    (["sum@nope"], {}, r"seeds.methods: 'sum@nope': no seeds.uncertainty_variants.nope \(known: \[\]\)"),
    (["hq_only@oracle"], {"oracle": "."}, "seeds.methods: 'hq_only@oracle': method 'hq_only' reads no uncertainty maps"),
    (["sum@oracle"], {"oracle": "no/such/folder"}, "seeds.uncertainty_variants.oracle=no/such/folder: not a folder"),
])
def test_bad_variants_are_named(methods, variants, message):
    cfg = tiny_seeds_config()
    cfg.seeds = sc.SeedsConfig(methods=methods, seeds=[0], comparisons=[], protocols=["point"], rounds=[1],
                               uncertainty_variants=variants)
    with pytest.raises(ValueError, match=message):
        seeds_mod.check_seeds_config(cfg)
