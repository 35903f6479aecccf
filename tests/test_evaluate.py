"""The ``evaluate`` stage (spec §10, §13 A3/A8/A11): the whole run on a tiny model and two tiny
benchmarks, the protocols against a hand-written per-mask loop over `SumPredictor.predict`, the
oracle selection, the task-prompt rule, config errors, and the scores against pycocotools and the
boundary-iou-api definition."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import sum.config as sc
from sum.data.dataset import CocoDataset
from sum.data.formats import masks_to_boxes
from sum.eval import scoring as ev_mod
from sum.eval.clicker import first_click, next_click
from sum.eval.metrics import noc
from sum.data.masks import area_band
from sum.eval.evaluate import run_evaluate
from sum.eval.protocol import select_targets, task_prompts
from sum.eval.scoring import run_protocol
from sum.model.predictor import SumPredictor
from conftest import api_boundary_iou, torch_threads

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is much faster than two (module
    scope, so that the module-scoped run below has it too)."""
    with torch_threads(1):
        yield


# ---- independent references ------------------------------------------------------------------


def coco_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    def rle(m):
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    return float(mask_utils.iou([rle(pred)], [rle(gt)], [0])[0, 0])


# ---- world: two tiny benchmarks, a tiny model, its embeddings, fine-tuned checkpoints -----------


def tiny_model_cfg() -> sc.ModelConfig:
    from omegaconf import OmegaConf

    raw = OmegaConf.load(REPO / "params" / "model" / "tiny.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(sc.ModelConfig), raw))
    cfg.device, cfg.fast_path = "cpu", "off"
    return cfg


def make_cfg(root: Path, data: dict, **eval_fields) -> sc.Config:
    """A config of the tiny model over ``data``; embeddings under ``<data's world>/embeddings``,
    outputs under ``root``."""
    cfg = sc.Config(model=tiny_model_cfg())
    cfg.data.datasets = data
    world_root = Path(data["hq"].images).parent.parent.parent
    cfg.embed = sc.EmbedConfig(out_dir=str(world_root / "embeddings"), datasets=["b_salient", "b_part"])
    cfg.tracking = sc.TrackingConfig(enabled=False, system_metrics=False)
    fields = dict(
        models={"foundation": ""},
        rounds=3,
        box_rounds=2,
        max_images=0,
        max_masks_per_image=3,
        precision="fp32",
        n_panels=1,
        metrics=str(root / "metrics" / "eval.json"),
        plots_dir=str(root / "plots"),
        out_dir=str(root / "out"),
    )
    fields.update(eval_fields)
    cfg.eval = dataclasses.replace(cfg.eval, **fields)
    return cfg


def perturbed_checkpoint(path: Path, method: str, part: str, seed: int, method_config: dict | None = None) -> Path:
    """The tiny foundation model (seed 0) with ``part`` (decoder or encoder) and the task prompts
    nudged, saved as a SUM checkpoint whose meta names ``method`` (and stores ``method_config``,
    as `finetune` does, when given)."""
    from sum.model.checkpoint import load_model, save_sum_checkpoint

    torch.manual_seed(0)
    model = load_model(tiny_model_cfg())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module = model.mask_decoder if part == "decoder" else model.image_encoder
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean().clamp(min=1e-3))
        for i, emb in enumerate(model.prompt_encoder.task_prompt_embedding):
            if i:
                emb.weight.copy_(0.5 * torch.randn(emb.weight.shape, generator=g))
    meta = {"method": method} if method_config is None else {"method": method, "method_config": method_config}
    return save_sum_checkpoint(model, tiny_model_cfg(), path, meta=meta)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sum.data.synthetic import generate_set
    from sum.model.embed import run_embed

    root = tmp_path_factory.mktemp("evaluate")
    data = {}
    for name, task, role, n in (("hq", "salient", "labeled", 1), ("b_salient", "salient", "benchmark", 3),
                                ("b_part", "part", "benchmark", 2)):
        folder = generate_set(root / "world", name, sc.WorldSetConfig(task=task, role=role, n_images=n, seed=len(data) + 4),
                              image_size=128, workers=1)
        data[name] = sc.DatasetConfig(format="coco", images=str(folder / "images"),
                                      annotations=str(folder / "annotations.json"), task=task, role=role)
    cfg = make_cfg(root, data)
    run_embed(cfg)
    ckpts = {
        "sum": perturbed_checkpoint(root / "models" / "sum.pt", "sum", "decoder", 1),
        "vanilla": perturbed_checkpoint(root / "models" / "vanilla.pt", "vanilla", "decoder", 2),
        "full_ft": perturbed_checkpoint(root / "models" / "full.pt", "sum", "encoder", 3),
    }
    return root, data, ckpts


@pytest.fixture(scope="module")
def run(world):
    root, data, ckpts = world
    models = {"foundation": "", "vanilla": str(ckpts["vanilla"]), "sum": str(ckpts["sum"]), "full_ft": str(ckpts["full_ft"])}
    cfg = make_cfg(root / "run", data, models=models)
    metrics = run_evaluate(cfg)
    return cfg, metrics


@pytest.fixture(scope="module")
def predictor_and_sample(world):
    """The tiny foundation model on the part benchmark's first image (several masks)."""
    root, data, _ = world
    from sum.model.checkpoint import load_model

    torch.manual_seed(0)
    predictor = SumPredictor(load_model(tiny_model_cfg()).eval())
    ds = CocoDataset(data["b_part"].images, data["b_part"].annotations, task="part")
    sample = ds[0]
    predictor.set_image(sample.image)
    gt = sample.masks[select_targets(sample.masks, 4)]
    assert len(gt) >= 3
    return predictor, gt


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the whole stage ---------------------------------------------------------------------------


def test_run_writes_all_outputs_and_they_agree(run):
    cfg, metrics = run
    ev = cfg.eval
    on_disk = json.loads(Path(ev.metrics).read_text())
    assert on_disk == metrics
    assert list(metrics) == ["foundation", "vanilla", "sum", "sum@tp0", "full_ft", "full_ft@tp0"]
    assert set(metrics["sum"]) == {"point", "box", "boundary"} and set(metrics["sum@tp0"]) == {"point"}
    point = metrics["sum"]["point"]
    # NoC@95 joined NoC@85 / 90 (issue 19): the reported metric set grew deliberately
    assert set(point["overall"]) == {"miou_1", "miou_3", "mbiou_1", "mbiou_3", "noc85", "noc90", "noc95"}
    assert set(metrics["sum"]["box"]["overall"]) == {"miou_1", "miou_2", "mbiou_1", "mbiou_2"}
    assert set(point["tasks"]) == {"salient", "part"} and set(point["datasets"]) == {"b_salient", "b_part"}

    # per-mask CSV -> dataset means -> task means and overall (spec §10.2) == the metrics JSON
    rows = read_csv(Path(ev.out_dir) / "per_mask.csv")
    for model, protocols in metrics.items():
        for protocol, m in protocols.items():
            for key, values in m["overall"].items():
                metric, _, r = key.partition("_")
                column = {"miou": f"iou_{r}", "mbiou": f"biou_{r}"}.get(metric, key)
                means = {}
                for d in ("b_salient", "b_part"):
                    sel = [float(x[column]) for x in rows if (x["model"], x["protocol"], x["dataset"]) == (model, protocol, d)]
                    assert sel, (model, protocol, d)
                    means[d] = float(np.mean(sel))
                    assert m["datasets"][d][key] == pytest.approx(means[d], abs=1e-4)
                    assert m["tasks"][{"b_salient": "salient", "b_part": "part"}[d]][key] == pytest.approx(means[d], abs=1e-4)
                assert values == pytest.approx(np.mean(list(means.values())), abs=1e-4)

    # curves: one column per model, the row of a round == the JSON's overall
    curve = read_csv(Path(ev.plots_dir) / "point_miou.csv")
    assert list(curve[0]) == ["clicks", *metrics]
    assert [int(r["clicks"]) for r in curve] == [1, 2, 3]
    for model in metrics:
        assert float(curve[0][model]) == pytest.approx(metrics[model]["point"]["overall"]["miou_1"], abs=1e-4)
        assert float(curve[2][model]) == pytest.approx(metrics[model]["point"]["overall"]["miou_3"], abs=1e-4)
    # the size table of table.md: its part row of the foundation == the per-mask CSV's mean
    table = (Path(ev.out_dir) / "table.md").read_text()
    assert "### point, mIoU by target size" in table
    bands = {}
    for x in rows:
        if (x["model"], x["protocol"], x["dataset"]) == ("foundation", "point", "b_part"):
            bands.setdefault(area_band(int(x["area"]) / int(x["image_area"])), []).append(float(x["iou_1"]))
    for band, ious in bands.items():
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| part | {band} | {len(ious)} |"))
        assert line.split(" | ")[3].split(" / ")[0] == f"{100 * np.mean(ious):.1f}"
    box = read_csv(Path(ev.plots_dir) / "box_mbiou.csv")
    assert list(box[0]) == ["round", "foundation", "vanilla", "sum", "full_ft"] and len(box) == 2
    assert (Path(ev.plots_dir) / "point_mbiou.csv").is_file() and (Path(ev.plots_dir) / "box_miou.csv").is_file()

    table = (Path(ev.out_dir) / "table.md").read_text()
    overall = f"{100 * metrics['sum']['point']['overall']['miou_3']:.1f}"
    assert "### point, 3 clicks" in table and "NoC@90" in table and overall in table
    for name in ("b_salient", "b_part"):
        png = Path(ev.out_dir) / "panels" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the comparison with the foundation model: each difference == the difference of the JSON's
    # aggregated means, inside its interval; the table shows the mIoU rows
    deltas = read_csv(Path(ev.out_dir) / "deltas.csv")
    assert {(d["metric"], d["protocol"]) for d in deltas} == {(m, p) for m in ("iou", "biou") for p in ("point", "box", "boundary")}
    assert {d["model"] for d in deltas} == set(metrics) - {"foundation"}
    for d in deltas:
        key = {"iou": "miou", "biou": "mbiou"}[d["metric"]] + "_" + d["round"]
        if key not in metrics["foundation"][d["protocol"]]["overall"]:
            continue
        pick = (lambda e: e["overall"]) if d["scope"] == "overall" else (lambda e: e["tasks"][d["scope"]])
        want = pick(metrics[d["model"]][d["protocol"]])[key] - pick(metrics["foundation"][d["protocol"]])[key]
        assert float(d["delta"]) == pytest.approx(want, abs=2e-4)
        assert float(d["lo"]) <= float(d["delta"]) + 1e-9 <= float(d["hi"]) + 2e-9
    assert "## Against foundation: mIoU difference, 95% interval" in table

    info = json.loads((Path(ev.out_dir) / "run.json").read_text())
    # decoder-mode checkpoints reuse the cached embeddings; the one with another encoder encodes
    n_images = 3 + 2
    assert info["embeddings"] == {"from_cache": n_images, "encoded": n_images}
    assert info["benchmarks"]["b_part"]["masks_evaluated"] <= 2 * 3
    assert set(info["timings_s"]) >= {"decoder", "metrics", "embeddings", "total"}


def test_task_prompt_at_test_time_follows_a3(run):
    cfg, metrics = run
    info = json.loads((Path(cfg.eval.out_dir) / "run.json").read_text())
    tp = {m: v["task_prompt_round1"] for m, v in info["models"].items()}
    # salient is trained (labeled set "hq"), part is not; vanilla and the foundation use no task prompt
    assert tp["sum"] == {"b_salient": 1, "b_part": 0} and tp["full_ft"] == {"b_salient": 1, "b_part": 0}
    assert tp["sum@tp0"] == tp["vanilla"] == tp["foundation"] == {"b_salient": 0, "b_part": 0}
    rows = read_csv(Path(cfg.eval.out_dir) / "per_mask.csv")
    assert {r["task_prompt"] for r in rows if (r["model"], r["dataset"]) == ("sum", "b_salient")} == {"1"}
    assert {r["task_prompt"] for r in rows if r["model"] != "sum" and r["model"] != "full_ft"} == {"0"}
    # on the untrained task the @tp0 variant is the same prompting, hence the same numbers
    assert metrics["sum@tp0"]["point"]["datasets"]["b_part"] == metrics["sum"]["point"]["datasets"]["b_part"]
    assert metrics["sum@tp0"]["point"]["datasets"]["b_salient"] != metrics["sum"]["point"]["datasets"]["b_salient"]


def test_evaluation_prompts_a_model_as_it_was_trained(world, tmp_path):
    """The method flags stored in a checkpoint win over the evaluating config's method of the same
    name: a `sum` trained with ``method.continuous_task_prompt=true`` keeps its task prompt in
    every round, one trained without task prompts gets none; a checkpoint without the stored
    flags (older ones) falls back to the method its meta names."""
    root, data, _ = world
    flags = dataclasses.asdict(sc.MethodConfig(name="sum"))
    ckpts = {
        "ctp": perturbed_checkpoint(tmp_path / "ctp.pt", "sum", "decoder", 1, {**flags, "continuous_task_prompt": True}),
        "no_tp": perturbed_checkpoint(tmp_path / "no_tp.pt", "sum", "decoder", 1, {**flags, "use_task_prompt": False}),
        "old": perturbed_checkpoint(tmp_path / "old.pt", "sum", "decoder", 1),
    }
    cfg = make_cfg(tmp_path, data, models={k: str(v) for k, v in ckpts.items()})
    assert cfg.method.name == "sum" and not cfg.method.continuous_task_prompt and cfg.method.use_task_prompt
    models = {m.name: m for m in ev_mod.load_eval_models(cfg)}
    assert models["ctp"].task_prompts("salient", ["salient"], 3) == [1, 1, 1]
    assert models["no_tp"].task_prompts("salient", ["salient"], 3) == [0, 0, 0] and "no_tp@tp0" not in models
    assert models["old"].task_prompts("salient", ["salient"], 3) == [1, 0, 0]
    bad = perturbed_checkpoint(tmp_path / "bad.pt", "sum", "decoder", 1, {**flags, "nope": 1})
    cfg = make_cfg(tmp_path, data, models={"bad": str(bad)})
    with pytest.raises(ValueError, match=r"eval\.models\.bad: .*bad\.pt: meta\.method_config .*nope"):
        ev_mod.load_eval_models(cfg)


def test_task_prompts_rule():
    trained = ["salient", "unspecified"]
    assert task_prompts("salient", trained, 3, use_task_prompt=True) == [1, 0, 0]
    assert task_prompts("entity", trained, 3, use_task_prompt=True) == [0, 0, 0]  # not trained
    assert task_prompts("part", ["part"], 2, use_task_prompt=True) == [3, 0]
    assert task_prompts("entity", ["entity"], 2, use_task_prompt=True) == [2, 0]
    assert task_prompts("salient", trained, 3, use_task_prompt=False) == [0, 0, 0]
    assert task_prompts("salient", trained, 3, use_task_prompt=True, continuous=True) == [1, 1, 1]


def test_decoder_receives_the_round_task_prompt(predictor_and_sample, monkeypatch):
    predictor, gt = predictor_and_sample
    seen = []
    real = ev_mod.predict_round

    def spy(*args, **kwargs):
        seen.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(ev_mod, "predict_round", spy)
    run_protocol(predictor, gt, "point", 3, "oracle", task_prompts("part", ["part"], 3, True))
    assert seen == [3, 0, 0]


# ---- protocols against a per-mask loop over SumPredictor.predict --------------------------------


@pytest.fixture()
def exact_distances(monkeypatch):
    """cv2's DIST_MASK_PRECISE transform rounds differently with the buffer's alignment (1e-6),
    which flips argmax ties between two otherwise identical calls; these tests compare two click
    sequences, so they use scipy's exact transform (float64 sqrt of integer squares) instead."""
    from scipy import ndimage

    import sum.eval.clicker as clicker

    def interior_distance(mask):
        padded = np.pad(np.asarray(mask).astype(bool), 1, constant_values=False)
        return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]

    monkeypatch.setattr(clicker, "interior_distance", interior_distance)


def reference_rounds(predictor, gt, protocol, rounds, selection="oracle"):
    """One mask at a time through `SumPredictor.predict`: accumulated prompts, the previous
    round's low-res logits of the selected output as mask input, pycocotools IoU for the oracle."""
    box = masks_to_boxes(gt[None])[0] if protocol == "box" else None
    clicks = [first_click(gt)] if protocol == "point" else []
    ious, pred, mask_input = [], None, None
    for r in range(rounds):
        if r > 0:
            clicks.append(next_click(gt, pred, clicks))
        kw = {"boxes": box, "mask_input": mask_input}
        if clicks:
            kw["point_coords"] = np.array([[c.x, c.y] for c in clicks], np.float32)
            kw["point_labels"] = np.array([c.label for c in clicks])
        single = len(clicks) + (box is not None) == 1
        masks, _, low = predictor.predict(**kw, multimask_output=single and selection == "oracle")
        cand = [coco_iou(masks[0, j], gt) for j in range(masks.shape[1])]
        j = int(np.argmax(cand))
        pred, mask_input = masks[0, j], low[0, j][None]
        ious.append(cand[j])
    return ious, clicks


@pytest.mark.parametrize("protocol, selection", [("point", "oracle"), ("box", "oracle"), ("point", "token0")])
def test_batched_rounds_equal_a_per_mask_loop(predictor_and_sample, exact_distances, protocol, selection):
    predictor, gt = predictor_and_sample
    res = run_protocol(predictor, gt, protocol, 4, selection, decoder="exact")
    assert res.iou.shape == (len(gt), 4)
    for k in range(len(gt)):
        ious, clicks = reference_rounds(predictor, gt[k], protocol, 4, selection)
        assert res.clicks[k] == clicks  # prompts accumulate, one click a round
        np.testing.assert_allclose(res.iou[k], ious, atol=1e-6, err_msg=f"{protocol} mask {k}")


@pytest.mark.parametrize("protocol", ["point", "box"])
def test_fast_decoder_scores_like_sams_decoder(predictor_and_sample, exact_distances, protocol):
    predictor, gt = predictor_and_sample
    exact = run_protocol(predictor, gt, protocol, 4, "oracle", decoder="exact")
    fast = run_protocol(predictor, gt, protocol, 4, "oracle", decoder="fast")
    # the same function up to float rounding: the same clicks and scores (a pixel may flip)
    assert fast.clicks == exact.clicks
    np.testing.assert_allclose(fast.iou, exact.iou, atol=2e-3)
    np.testing.assert_allclose(fast.biou, exact.biou, atol=5e-3)


def test_mask_input_is_fed_between_rounds(predictor_and_sample, monkeypatch):
    predictor, gt = predictor_and_sample
    inputs = []
    real = ev_mod.predict_round

    def spy(*args, **kwargs):
        inputs.append(None if args[4] is None else args[4].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(ev_mod, "predict_round", spy)
    run_protocol(predictor, gt, "point", 3, "oracle")
    assert inputs[0] is None and all(x is not None and x.shape == (len(gt), 1, 32, 32) for x in inputs[1:])
    assert not torch.equal(inputs[1], inputs[2])


def test_oracle_picks_the_output_closest_to_ground_truth(predictor_and_sample):
    predictor, gt = predictor_and_sample
    res = run_protocol(predictor, gt, "point", 1, "oracle", keep_rounds=[1])
    token0 = run_protocol(predictor, gt, "point", 1, "token0")
    for k in range(len(gt)):
        c = first_click(gt[k])
        masks, _, _ = predictor.predict(np.array([[c.x, c.y]], np.float32), np.array([1]), multimask_output=True)
        ious = [coco_iou(masks[0, j], gt[k]) for j in range(3)]
        assert res.iou[k, 0] == pytest.approx(max(ious), abs=1e-9)
        np.testing.assert_array_equal(res.kept[1][k], masks[0, int(np.argmax(ious))])
        single, _, _ = predictor.predict(np.array([[c.x, c.y]], np.float32), np.array([1]), multimask_output=False)
        assert token0.iou[k, 0] == pytest.approx(coco_iou(single[0, 0], gt[k]), abs=1e-9)


def test_scores_equal_pycocotools_and_boundary_iou_api(predictor_and_sample):
    predictor, gt = predictor_and_sample
    res = run_protocol(predictor, gt, "box", 2, "oracle", keep_rounds=[1, 2])
    for r in (1, 2):
        for k in range(len(gt)):
            pred = res.kept[r][k]
            assert res.iou[k, r - 1] == pytest.approx(coco_iou(pred, gt[k]), abs=1e-12)
            assert res.biou[k, r - 1] == pytest.approx(api_boundary_iou(gt[k], pred), abs=1e-12)


def test_boundary_protocol_is_one_round(predictor_and_sample):
    predictor, gt = predictor_and_sample
    res = run_protocol(predictor, gt, "boundary", 6)
    assert res.iou.shape == (len(gt), 1) and all(len(c) == 1 for c in res.clicks)


def test_select_targets_skips_empty_and_draws_by_image():
    masks = np.zeros((7, 10, 10), bool)
    for i, area in enumerate([5, 0, 30, 12, 1, 0, 20]):
        masks[i].flat[:area] = True
    np.testing.assert_array_equal(select_targets(masks, 0), [2, 6, 3, 0, 4])
    np.testing.assert_array_equal(select_targets(masks, 9), [2, 6, 3, 0, 4])
    assert select_targets(np.zeros((2, 4, 4), bool), 3).size == 0
    # the rule changed (issue 19): n of the non-empty masks drawn uniformly, keyed by the image id
    # and the seed, by decreasing area; no longer always the largest and the smallest
    draws = {key: tuple(select_targets(masks, 3, key)) for key in map(str, range(40))}
    assert all(len(d) == 3 and set(d) <= {2, 6, 3, 0, 4} and list(d) == sorted(d, key=lambda i: -masks[i].sum())
               for d in draws.values())
    assert select_targets(masks, 3, "7").tolist() == list(draws["7"])  # the same image, the same draw
    assert len(set(draws.values())) > 3 and any(4 not in d for d in draws.values()) and any(2 not in d for d in draws.values())
    assert tuple(select_targets(masks, 3, "7", seed=1)) != draws["7"] or tuple(select_targets(masks, 3, "8", seed=1)) != draws["8"]
    # uniform: each of the 5 masks is drawn with probability 3/5
    counts = np.bincount(np.concatenate([select_targets(masks, 3, f"img{i}") for i in range(2000)]), minlength=7)
    np.testing.assert_allclose(counts[[2, 6, 3, 0, 4]] / 2000, 0.6, atol=0.04)


def test_predicted_iou_selection_is_sampredictors_highest_scoring_output(world, tmp_path, exact_distances):
    """``predicted_iou``: for a single prompt, the output ``SamPredictor`` scores highest (what an
    interactive tool shows); for multi-prompt rounds the one output, fed the chosen output's
    low-res logits. Checked against segment_anything's own ``SamPredictor`` on the same weights."""
    from conftest import stock_sam
    from segment_anything import SamPredictor

    from sum.model.checkpoint import load_model

    _, data, _ = world
    torch.manual_seed(3)
    stock = stock_sam(tiny_model_cfg()).eval()
    path = tmp_path / "sam_tiny.pth"
    torch.save(stock.state_dict(), path)
    ours = SumPredictor(load_model(tiny_model_cfg(), path))
    sample = CocoDataset(data["b_part"].images, data["b_part"].annotations, task="part")[0]
    gt = sample.masks[select_targets(sample.masks, 4, sample.image_id)]
    ours.set_image(sample.image)
    ref = SamPredictor(stock)
    ref.set_image(sample.image)
    res = run_protocol(ours, gt, "point", 2, "predicted_iou", keep_rounds=[1, 2], decoder="exact")
    oracle = run_protocol(ours, gt, "point", 1, "oracle")
    for k in range(len(gt)):
        c = first_click(gt[k])
        masks, scores, low = ref.predict(np.array([[c.x, c.y]], np.float32), np.array([1]), multimask_output=True)
        j = int(np.argmax(scores))
        assert (res.kept[1][k] != masks[j]).mean() < 1e-3
        assert res.iou[k, 0] == pytest.approx(coco_iou(masks[j], gt[k]), abs=2e-3)
        assert res.iou[k, 0] <= oracle.iou[k, 0] + 1e-9  # the oracle is the best of the three
        clicks = res.clicks[k]
        assert clicks[1] == next_click(gt[k], masks[j], clicks[:1])
        two, _, _ = ref.predict(np.array([[p.x, p.y] for p in clicks], np.float32), np.array([p.label for p in clicks]),
                                mask_input=low[j][None], multimask_output=False)
        assert (res.kept[2][k] != two[0]).mean() < 1e-3


def test_noc_clicks_past_the_reported_rounds_stop_once_the_iou_is_reached(predictor_and_sample):
    """``stop_iou`` / ``stop_after`` (the NoC clicks beyond ``eval.rounds``) change neither the
    reported rounds nor any NoC at or below the stopping IoU."""
    predictor, gt = predictor_and_sample
    full = run_protocol(predictor, gt, "point", 8, "oracle")
    stop = float(np.median(full.iou[:, 2:]))  # an IoU that some targets reach after round 2
    cut = run_protocol(predictor, gt, "point", 8, "oracle", stop_iou=stop, stop_after=2)
    np.testing.assert_array_equal(cut.iou[:, :2], full.iou[:, :2])
    for k in range(len(gt)):
        for thr in {stop, 0.5 * stop, *[float(v) for v in full.iou[k] if 0 < v <= stop]}:
            assert noc(cut.iou[k], thr, 8) == noc(full.iou[k], thr, 8)
    assert sum(len(c) for c in cut.clicks) < sum(len(c) for c in full.clicks)


def test_examples_piou_columns_noc_budget_and_part_split_in_a_run(world, tmp_path):
    """A run with ``eval.min_images=3`` (the 2-image part benchmark becomes an example), the @piou
    variants and a NoC budget past the reported rounds."""
    root, data, ckpts = world
    cfg = make_cfg(tmp_path, data, models={"foundation": "", "sum": str(ckpts["sum"])}, protocols=["point", "box"],
                   rounds=2, box_rounds=1, noc_max_clicks=4, predicted_iou=["point"], min_images=3, task_prompt_zero=[])
    metrics = run_evaluate(cfg)
    assert list(metrics) == ["foundation", "foundation@piou", "sum", "sum@piou"]
    assert set(metrics["sum@piou"]) == {"point"}
    point = metrics["sum"]["point"]
    assert set(point["overall"]) == {"miou_1", "miou_2", "mbiou_1", "mbiou_2", "noc85", "noc90", "noc95"}
    # b_part (2 images) is an example: in no task, no overall, no comparison, no part split
    assert set(point["datasets"]) == {"b_salient"} and set(point["examples"]) == {"b_part"}
    assert set(point["tasks"]) == {"salient"} and "part_resolution" not in point
    assert point["overall"] == {k: v for k, v in point["datasets"]["b_salient"].items() if k in point["overall"]}
    rows = read_csv(Path(cfg.eval.out_dir) / "per_mask.csv")
    mine = [r for r in rows if (r["model"], r["protocol"], r["dataset"]) == ("sum", "point", "b_salient")]
    assert all(1 <= int(r["noc95"]) <= 4 and r["nof95"] in ("0", "1") for r in mine)
    assert all((r["nof95"] == "1") <= (r["noc95"] == "4") for r in mine)  # a failure spent the budget
    assert point["nof95"]["overall"] == sum(int(r["nof95"]) for r in mine)
    assert point["overall"]["noc85"] == pytest.approx(np.mean([int(r["noc85"]) for r in mine]), abs=1e-4)
    # the piou column differs from the oracle only by its pick: never above it after one click
    assert metrics["sum@piou"]["point"]["overall"]["miou_1"] <= point["overall"]["miou_1"] + 1e-9
    deltas = read_csv(Path(cfg.eval.out_dir) / "deltas.csv")
    assert {d["model"] for d in deltas} == {"sum", "sum@piou"} and {d["scope"] for d in deltas} == {"salient", "overall"}
    for d in (d for d in deltas if d["metric"] == "iou" and d["round"] == "1" and d["protocol"] == "point"):
        ref = "foundation@piou" if d["model"].endswith("@piou") else "foundation"
        want = metrics[d["model"]]["point"]["overall"]["miou_1"] - metrics[ref]["point"]["overall"]["miou_1"]
        assert float(d["delta"]) == pytest.approx(want, abs=2e-4)
    table = (Path(cfg.eval.out_dir) / "table.md").read_text()
    assert "### point, examples (outside the means)" in table and "| b_part | part | " in table
    assert "### point, NoC and NoF (4-click budget)" in table and "| NoF@95 | **Overall**" in table
    info = json.loads((Path(cfg.eval.out_dir) / "run.json").read_text())
    assert info["benchmarks"]["b_part"]["example"] and not info["benchmarks"]["b_salient"]["example"]
    assert info["models"]["sum@piou"]["selection"] == "predicted_iou"
    # with the part benchmark in the means, the part split is there, both rows, with every part target
    cfg = make_cfg(tmp_path / "all", data, models={"foundation": ""}, protocols=["boundary"])
    metrics = run_evaluate(cfg)
    split = metrics["foundation"]["boundary"]["part_resolution"]
    assert set(split) == {"resolvable", "sub_resolution"}
    assert split["resolvable"]["n_masks"] + split["sub_resolution"]["n_masks"] == metrics["foundation"]["boundary"]["n_masks"]["tasks"]["part"]


# ---- errors -------------------------------------------------------------------------------------


def test_missing_checkpoint_names_the_key(world, tmp_path):
    root, data, _ = world
    cfg = make_cfg(tmp_path, data, models={"foundation": "", "sum": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match=r"eval\.models\.sum: checkpoint .*nope\.pt not found"):
        run_evaluate(cfg)
    assert not Path(cfg.eval.metrics).exists()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("selection", "best", r"eval\.selection='best'"),
        ("protocols", ["points"], r"eval\.protocols"),
        ("rounds", 0, r"eval\.rounds=0"),
        ("max_masks_per_image", -1, r"eval\.max_masks_per_image=-1"),
        ("precision", "fp16", r"eval\.precision='fp16'"),
        ("decoder", "slow", r"eval\.decoder='slow'"),
        ("threads", -1, r"eval\.threads=-1"),
        ("task_prompt_zero", ["all"], r"eval\.task_prompt_zero"),
        ("datasets", ["nope"], r"eval\.datasets: unknown dataset\(s\) \['nope'\]"),
        ("models", {"a.b": ""}, r"eval\.models\.a\.b"),
        ("reference", "nope", r"eval\.reference='nope'"),
        ("bootstrap", -1, r"eval\.bootstrap=-1"),
        ("ci_level", 1.0, r"eval\.ci_level=1\.0"),
        ("predicted_iou", ["all"], r"eval\.predicted_iou"),
        ("noc_max_clicks", -1, r"eval\.noc_max_clicks=-1"),
        ("min_images", 0, r"eval\.min_images=0"),
        ("min_images", 9, r"eval\.min_images=9: every benchmark"),
        ("target_seed", -1, r"eval\.target_seed=-1"),
    ],
)
def test_bad_eval_config_names_the_key(world, tmp_path, field, value, match):
    _, data, _ = world
    cfg = make_cfg(tmp_path, data, **{field: value})
    with pytest.raises(ValueError, match=match):
        run_evaluate(cfg)


def test_unknown_eval_key_is_a_config_error():
    with pytest.raises(sc.ConfigError, match="eval.nope"):
        sc.compose(["+eval.nope=1"])


def test_logs_params_metrics_curves_and_artifacts_to_mlflow(world, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    root, data, ckpts = world
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(tmp_path, data, models={"foundation": "", "sum": str(ckpts["sum"])}, protocols=["point"],
                   rounds=2, max_images=1, max_masks_per_image=1)
    cfg.tracking = dataclasses.replace(cfg.tracking, enabled=True, uri=uri, experiment="sum-eval-test")
    metrics = run_evaluate(cfg)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sum-eval-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "evaluate"
    assert run.data.params["eval.models.sum"] == str(ckpts["sum"]) and run.data.params["eval.method.sum"] == "sum"
    got = run.data.metrics
    assert got["sum_tp0/point/overall/miou_2"] == pytest.approx(metrics["sum@tp0"]["point"]["overall"]["miou_2"])
    curve = client.get_metric_history(run.info.run_id, "curve/foundation/point/miou")
    assert [m.step for m in curve] == [1, 2]
    assert curve[1].value == pytest.approx(metrics["foundation"]["point"]["overall"]["miou_2"], abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/table.md", "eval/per_mask.csv", "eval/deltas.csv", "eval/point_miou.csv",
            "eval/panels"} <= artifacts


def test_user_sam_checkpoint_on_a_mask_folder_benchmark_by_overrides_only(world, tmp_path):
    """The README's command: an official-format SAM state dict (segment_anything's own ``Sam``)
    and a SUM checkpoint, on a DIS5K-style mask folder, chosen by Hydra overrides alone."""
    import cv2
    from conftest import stock_sam

    from sum.config import compose

    root, data, ckpts = world
    torch.manual_seed(7)
    sam_path = tmp_path / "sam_tiny.pth"
    torch.save(stock_sam(tiny_model_cfg()).state_dict(), sam_path)
    # a DIS5K layout: im/<stem>.jpg + gt/<stem>.png, one mask per image, foreground > 128
    ds = CocoDataset(data["b_salient"].images, data["b_salient"].annotations, task="salient")
    (tmp_path / "dis" / "im").mkdir(parents=True)
    (tmp_path / "dis" / "gt").mkdir()
    for i in range(2):
        s = ds[i]
        cv2.imwrite(str(tmp_path / "dis" / "im" / f"{s.image_id}.jpg"), s.image[..., ::-1])
        cv2.imwrite(str(tmp_path / "dis" / "gt" / f"{s.image_id}.png"), s.masks[0].astype(np.uint8) * 255)
    out = tmp_path / "out"
    cfg = compose([
        "model=tiny", f"model.checkpoint={sam_path}", "model.device=cpu", "model.fast_path=off",
        "~eval.models.hq_only", "~eval.models.vanilla", f"eval.models.sum={ckpts['sum']}",
        f"+data.datasets.dis_vd={{format: mask_folder, images: {tmp_path}/dis/im, annotations: {tmp_path}/dis/gt, "
        "task: salient, role: benchmark}",
        "eval.datasets=[dis_vd]", "eval.protocols=[box]", "eval.box_rounds=2", "eval.max_images=0",
        "eval.max_masks_per_image=0", f"embed.out_dir={tmp_path}/emb", "tracking.enabled=false",
        f"eval.metrics={out}/eval.json", f"eval.plots_dir={out}/plots", f"eval.out_dir={out}/eval",
    ])
    metrics = run_evaluate(cfg)
    assert list(metrics) == ["foundation", "sum"]
    assert set(metrics["foundation"]["box"]["datasets"]) == {"dis_vd"}
    info = json.loads((out / "eval" / "run.json").read_text())
    assert info["benchmarks"]["dis_vd"]["masks_evaluated"] == 2
    assert info["models"]["foundation"]["checkpoint"] == str(sam_path)
    # the foundation column is the user's state dict: its box IoU equals SamPredictor on that model
    from segment_anything import SamPredictor

    ref = stock_sam(tiny_model_cfg())
    ref.load_state_dict(torch.load(sam_path, weights_only=True))
    predictor = SamPredictor(ref.eval())
    ious = []
    for stem in sorted(p.stem for p in (tmp_path / "dis" / "im").iterdir()):
        image = cv2.imread(str(tmp_path / "dis" / "im" / f"{stem}.jpg"))[..., ::-1].copy()
        gt = cv2.imread(str(tmp_path / "dis" / "gt" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 128
        predictor.set_image(image)
        masks, _, _ = predictor.predict(box=masks_to_boxes(gt[None])[0], multimask_output=True)
        ious.append(max(coco_iou(m, gt) for m in masks))
    assert metrics["foundation"]["box"]["overall"]["miou_1"] == pytest.approx(np.mean(ious), abs=2e-3)


def test_size_table_means_by_task_and_band():
    """Hand-made records of 4 rounds: two part targets in the 3e-4..1e-3 band (IoU 0.2 and 0.4
    after click 1, 0.3 and 0.5 after click 3, 0.6 and 0.8 after the last) and one whole object in
    the top band, which the second model did not see."""
    from sum.eval.report import size_table

    def rec(model, area, ious, dataset="b_part"):
        return ev_mod.MaskRecord(model, "point", dataset, "1", "1", area, 0, ious, ious, [], image_area=100_000)

    records = [rec("f", 50, [0.2, 0.0, 0.3, 0.6]), rec("f", 60, [0.4, 0.0, 0.5, 0.8]), rec("f", 5_000, [0.9] * 4, "b_sal"),
               rec("s", 50, [0.1] * 4), rec("s", 60, [0.3] * 4)]
    lines = size_table(records, {"b_sal": "salient", "b_part": "part"}).splitlines()
    assert "after 1 / 3 / 4 clicks" in lines[2]
    assert lines[4] == "| Task | area / image | masks | f | s |"
    assert lines[6:] == [
        "| salient | 0.01-1 | 1 | 90.0 / 90.0 / 90.0 |  |",
        "| part | 0.0003-0.001 | 2 | 30.0 / 40.0 / 70.0 | 20.0 / 20.0 / 20.0 |",
    ]
    assert area_band(0.0) == "0-0.0003" and area_band(1e-3) == "0.001-0.003" and area_band(1.0) == "0.01-1"
    assert size_table([dataclasses.replace(records[0], image_area=0)], {"b_part": "part"}) == ""


@pytest.mark.parametrize("protocol, selection", [("point", "oracle"), ("box", "predicted_iou"), ("point", "token0")])
def test_device_path_scores_and_clicks_like_the_host_path(predictor_and_sample, exact_distances, protocol, selection):
    """``on_device``: masks, scores and clicks kept on the model's device (here the CPU) give the
    host path's clicks, IoUs, boundary IoUs and kept masks, with the NoC stop past the reported
    rounds."""
    predictor, gt = predictor_and_sample
    kw = dict(keep_rounds=[1, 3], decoder="exact", stop_iou=0.6, stop_after=3)
    host = run_protocol(predictor, gt, protocol, 5, selection, on_device=False, **kw)
    dev = run_protocol(predictor, gt, protocol, 5, selection, on_device=True, **kw)
    assert dev.clicks == host.clicks
    np.testing.assert_array_equal(dev.iou, host.iou)
    np.testing.assert_array_equal(dev.biou, host.biou)
    np.testing.assert_array_equal(dev.clicks_at, host.clicks_at)
    for r in (1, 3):
        np.testing.assert_array_equal(dev.kept[r], host.kept[r])
