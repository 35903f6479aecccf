"""``sumseg recipe`` (issue 19 item 4): lr, steps and the task-prompt lr scale are chosen on the
validation split alone, by the rule of params/recipe/default.yaml; no training and no benchmark
stage reads that split. Tiny model, a tiny procedural project (a labeled, an unlabeled, a
validation and a benchmark set)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import sum.config as sc
from sum.eval import recipe as rc

from conftest import REPO, model_config


# ---- the rule, on hand-written scores --------------------------------------------------------


def cand(lr, iterations, score, scale=1.0):
    return {"lr": lr, "iterations": iterations, "task_prompt_lr_scale": scale, "score": score}


def test_the_best_score_wins():
    cands = [cand(1e-5, 20, 0.60), cand(1e-5, 40, 0.65), cand(5e-5, 20, 0.70), cand(1e-4, 80, 0.66)]
    assert rc.choose_lr_and_steps(cands, 0.002) == cand(5e-5, 20, 0.70)


def test_a_tie_goes_to_the_smaller_lr_then_fewer_steps():
    # 0.7010 and 0.7000 are within 0.002 of the best 0.7020; the smaller lr wins, then fewer steps
    cands = [cand(1e-4, 20, 0.7020), cand(5e-5, 80, 0.7010), cand(5e-5, 40, 0.7000), cand(1e-5, 20, 0.6979)]
    assert rc.choose_lr_and_steps(cands, 0.002) == cand(5e-5, 40, 0.7000)
    # exactly at the tie's edge still ties (0.702 - 0.002 is not quite 0.700 in floats)
    assert rc.choose_lr_and_steps([cand(1e-4, 20, 0.702), cand(1e-5, 80, 0.700)], 0.002) == cand(1e-5, 80, 0.700)
    # no tie: the best stands even at the largest lr and most steps
    assert rc.choose_lr_and_steps([cand(1e-4, 80, 0.75), cand(1e-5, 20, 0.70)], 0.002) == cand(1e-4, 80, 0.75)
    assert rc.choose_lr_and_steps([cand(1e-4, 80, 0.75), cand(1e-5, 20, 0.70)], 0.0) == cand(1e-4, 80, 0.75)


def test_the_task_prompt_scale_stage_uses_the_same_score_and_prefers_the_smaller_scale():
    cands = [cand(5e-5, 40, 0.71, 1.0), cand(5e-5, 40, 0.74, 10.0), cand(5e-5, 40, 0.7415, 100.0)]
    assert rc.choose_task_prompt_scale(cands, 0.002)["task_prompt_lr_scale"] == 10.0
    assert rc.choose_task_prompt_scale(cands, 0.0)["task_prompt_lr_scale"] == 100.0
    assert rc.validation_score({1: 0.6, 3: 0.7, 5: 0.8}, [1, 3, 5]) == pytest.approx(0.7)
    assert rc.recipe_overrides({"lr": 5e-5, "iterations": 40, "task_prompt_lr_scale": 10}) == [
        "train.lr=5e-05", "train.iterations=40", "train.task_prompt_lr_scale=10.0"]


def test_the_rule_is_written_in_the_params_file_and_the_readme():
    text = (REPO / "params" / "recipe" / "default.yaml").read_text()
    for words in ("validation", "vanilla", "1, 3 and 5 clicks", "smaller lr, then to fewer steps", "smaller scale"):
        assert words in text, words
    assert "sumseg recipe" in (REPO / "params" / "train" / "default.yaml").read_text()
    assert "sumseg recipe" in (REPO / "README.md").read_text()
    r = sc.compose([]).recipe
    assert (r.lrs, r.iterations, r.task_prompt_lr_scales) == ([1e-5, 5e-5, 1e-4], [20, 40, 80], [1.0, 10.0, 100.0])
    assert (r.method, r.task_prompt_method, r.clicks, r.tie) == ("vanilla", "sum", [1, 3, 5], 0.002)


def test_the_embedded_default_holds_a_validation_split_that_nothing_else_reads():
    cfg = sc.compose([])
    roles = {n: d.role for n, d in cfg.data.datasets.items()}
    assert roles["hq_val"] == "validation" and list(roles.values()).count("validation") == 1
    hq_val, hq_train = cfg.data.world.sets["hq_val"], cfg.data.world.sets["hq_train"]
    assert (hq_val.task, hq_val.style, hq_val.role) == ("salient", "default", "validation")
    assert hq_val.seed not in {s.seed for n, s in cfg.data.world.sets.items() if n != "hq_val"} and hq_val.n_images == 24
    assert hq_train.task == hq_val.task
    assert cfg.embed.datasets == []  # embed: every dataset, hq_val among them
    assert rc.validation_datasets([], cfg.data.datasets) == ["hq_val"]
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "data/world" in dvc["stages"]["world"]["outs"] and "data/world" in dvc["stages"]["embed"]["deps"]


# ---- a tiny project ---------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def project_config(root: Path, datasets: dict) -> sc.Config:
    """The tiny model on ``datasets``; every output under ``root``; MLflow off."""
    cfg = sc.Config(model=dataclasses.replace(model_config("tiny"), device="cpu", fast_path="off"))
    cfg.tracking = sc.TrackingConfig(enabled=False, system_metrics=False)
    cfg.data.datasets = datasets
    cfg.embed = sc.EmbedConfig(out_dir=str(root / "emb"))
    cfg.pseudo = sc.PseudoConfig(out_dir=str(root / "pseudo"), metrics=str(root / "pseudo.json"), shard_size=1, n_workers=0,
                                 points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    u = cfg.uncertainty
    u.out_dir, u.metrics, u.panel, u.n_panel_images, u.batch_size = str(root / "unc"), str(root / "unc.json"), "", 0, 64
    cfg.refine.out = str(root / "refiner.ckpt")
    cfg.train = dataclasses.replace(
        cfg.train, iterations=2, batch_size=2, max_masks=2, rounds=2, loss_size=64, precision="fp32", pseudo_min_ratio=1.0,
        pseudo_dir=str(root / "pseudo"), uncertainty_dir=u.out_dir,
        run_dir=str(root / "runs"), model_dir=str(root / "models"), metrics_dir=str(root / "metrics" / "finetune"))
    cfg.eval = dataclasses.replace(
        cfg.eval, models={"foundation": ""}, protocols=["point"], rounds=2, max_masks_per_image=2, n_panels=0, bootstrap=0,
        threads=1, metrics=str(root / "metrics" / "eval.json"), plots_dir=str(root / "plots"), out_dir=str(root / "eval"))
    cfg.recipe = dataclasses.replace(
        cfg.recipe, lrs=[1e-3, 1e-2], iterations=[1, 2], task_prompt_lr_scales=[1.0, 100.0], max_masks_per_image=2,
        out_dir=str(root / "recipe"), metrics=str(root / "metrics" / "recipe.json"))
    return cfg


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A labeled, an unlabeled, a validation and a benchmark set of 2-3 images; embeddings, pseudo
    labels and the uncertainty maps of an untrained refinement module."""
    from sum.data.synthetic import generate_set
    from sum.model.build import build_sum_model
    from sum.model.embed import run_embed
    from sum.pseudo.run import pseudolabel
    from sum.uncertainty.refiner import RefinementModule, save_refiner
    from sum.uncertainty.stage import run_uncertainty

    root = tmp_path_factory.mktemp("recipe")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets = {}
    for name, task, role, n, seed in (("train", "salient", "labeled", 3, 2), ("pool", "unspecified", "unlabeled", 2, 3),
                                      ("val", "salient", "validation", 2, 5), ("bench", "salient", "benchmark", 2, 4)):
        folder = generate_set(root / "world", name, sc.WorldSetConfig(task=task, role=role, n_images=n, seed=seed),
                              image_size=64, workers=1)
        datasets[name] = sc.DatasetConfig(format="coco", images=str(folder / "images"),
                                          annotations=str(folder / "annotations.json"), task=task, role=role)
    cfg = project_config(root, datasets)
    run_embed(cfg)
    pseudolabel(cfg)
    torch.manual_seed(0)
    save_refiner(RefinementModule.from_sam(build_sum_model(cfg.model)), cfg.refine.out, cfg.model, cfg.refine, {})
    run_uncertainty(cfg)
    torch.set_num_threads(before)
    return root, cfg


def test_embed_embeds_the_validation_split(project):
    root, cfg = project
    assert sorted(p.name for p in (root / "emb").iterdir() if p.is_dir()) == ["bench", "pool", "train", "val"]


def test_no_training_and_no_benchmark_stage_reads_the_validation_split(project, tmp_path):
    """With the validation set's files gone, finetune (sum: labeled, pseudo labels, u), pseudolabel
    and evaluate run as before, and none names it: they never open it."""
    from sum.eval.evaluate import run_evaluate
    from sum.pseudo.run import pseudolabel
    from sum.train.build import build_pools
    from sum.train.method import resolve_method
    from sum.train.state import input_paths
    from sum.train.trainer import finetune

    _, base = project
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, datasets=dict(base.data.datasets)))
    cfg.data.datasets["val"] = dataclasses.replace(cfg.data.datasets["val"], images=str(tmp_path / "gone" / "images"),
                                                   annotations=str(tmp_path / "gone" / "annotations.json"))
    cfg.train = dataclasses.replace(cfg.train, run_dir=str(tmp_path / "runs"), model_dir=str(tmp_path / "models"),
                                    metrics_dir=str(tmp_path / "ft"))
    cfg.pseudo = dataclasses.replace(cfg.pseudo, out_dir=str(tmp_path / "pseudo"), metrics=str(tmp_path / "pseudo.json"))
    cfg.eval = dataclasses.replace(cfg.eval, models={"foundation": "", "sum": str(tmp_path / "models" / "sum.pt")},
                                   metrics=str(tmp_path / "eval.json"), plots_dir=str(tmp_path / "plots"), out_dir=str(tmp_path / "eval"))
    sum_method = resolve_method(cfg, "sum")
    pools = build_pools(cfg, sum_method)
    assert sorted(n for pool in pools.values() for n, _ in pool.datasets) == ["pool", "train"]
    assert not any("gone" in p for p in input_paths(cfg, sum_method))
    assert finetune(cfg, "sum")["steps"] == cfg.train.iterations
    assert set(pseudolabel(cfg)["datasets"]) == {"pool"}
    metrics = run_evaluate(cfg)
    run = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert set(run["benchmarks"]) == {"bench"} and "val" not in json.dumps(metrics)


# ---- the command ------------------------------------------------------------------------------


def test_recipe_end_to_end_then_a_rerun_recomputes_nothing(project, tmp_path, monkeypatch):
    """2 lrs x 2 step counts on vanilla, then 2 task-prompt lr scales on sum; the rule's choice,
    the step counts as checkpoints of one run per lr, every output under recipe.out_dir and
    recipe.metrics, none over the models or eval metrics; a rerun trains and scores nothing."""
    _, base = project
    cfg = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, out_dir=str(tmp_path / "recipe"),
                                                               metrics=str(tmp_path / "metrics" / "recipe.json")))
    cfg.train = dataclasses.replace(cfg.train, run_dir=str(tmp_path / "runs"), model_dir=str(tmp_path / "models"),
                                    metrics_dir=str(tmp_path / "ft"))
    doc = rc.choose_recipe(cfg)
    assert json.loads((tmp_path / "metrics" / "recipe.json").read_text()) == doc
    assert doc["format"] == "sum-recipe/1" and doc["datasets"] == ["val"] and doc["clicks"] == [1, 3, 5]
    first, second = doc["lr_and_iterations"], doc["task_prompt_lr_scale"]
    assert first["method"] == "vanilla" and second["method"] == "sum"
    assert [(c["lr"], c["iterations"]) for c in first["candidates"]] == [(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    # each lr's 2 steps resume its 1-step run
    assert [c["resumed_from_step"] for c in first["candidates"]] == [0, 1, 0, 1]
    for c in first["candidates"] + second["candidates"] + [doc["foundation"]]:
        assert set(c["miou"]) == {"1", "3", "5"} and c["n_masks"] > 0
        assert c["score"] == pytest.approx(sum(c["miou"].values()) / 3) and set(c["datasets"]) == {"val"}
    a = rc.choose_lr_and_steps(first["candidates"], 0.002)
    assert (first["chosen"]["lr"], first["chosen"]["iterations"]) == (a["lr"], a["iterations"])
    assert [(c["lr"], c["iterations"], c["task_prompt_lr_scale"]) for c in second["candidates"]] == [
        (a["lr"], a["iterations"], 1.0), (a["lr"], a["iterations"], 100.0)]
    b = rc.choose_task_prompt_scale(second["candidates"], 0.002)
    assert doc["chosen"] == {"lr": a["lr"], "iterations": a["iterations"], "task_prompt_lr_scale": b["task_prompt_lr_scale"]}
    assert not (tmp_path / "models").exists() and not (tmp_path / "ft").exists() and not Path(cfg.eval.metrics).exists()
    assert sorted(p.name for p in (tmp_path / "recipe").iterdir()) == ["finetune", "models", "runs", "scores.json"]
    assert all(Path(c["checkpoint"]).is_relative_to(tmp_path / "recipe") for c in first["candidates"])
    # the 2-step checkpoint of the resumed run is the 2-step model of one straight run
    straight = rc.candidate_config(cfg, rc.Candidate("vanilla", 1e-3, 2, 1.0))
    straight.train = dataclasses.replace(straight.train, run_dir=str(tmp_path / "straight"), model_dir=str(tmp_path / "straight"),
                                         metrics_dir=str(tmp_path / "straight"))
    assert rc.finetune(straight, "vanilla")["resumed_from_step"] == 0
    ours = torch.load(first["candidates"][1]["checkpoint"], weights_only=True)["state_dict"]
    theirs = torch.load(tmp_path / "straight" / "vanilla.pt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a stored candidate")

    monkeypatch.setattr(rc, "finetune", refuse)
    monkeypatch.setattr(rc.ValidationScorer, "score", refuse)
    assert rc.choose_recipe(cfg) == doc
    # its score lost, a step count the run is past trains again from step 0, to the same score
    monkeypatch.undo()
    scorer = rc.ValidationScorer(cfg, ["val"])
    again = rc.run_candidate(cfg, rc.Candidate("vanilla", 1e-3, 1, 1.0), scorer, rc.ScoreStore(tmp_path / "lost.json"),
                             scorer.settings())
    assert again["resumed_from_step"] == 0 and again["score"] == first["candidates"][0]["score"]


@pytest.mark.parametrize("key, value", [("lrs", []), ("lrs", [-1e-5]), ("iterations", [0]), ("task_prompt_lr_scales", [])])
def test_a_bad_recipe_key_is_refused_in_one_line(project, tmp_path, monkeypatch, capsys, key, value):
    from sum.cli import main

    _, base = project
    cfg = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, **{key: value}))
    with pytest.raises(ValueError, match=f"recipe.{key}"):
        rc.check_recipe_config(cfg)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(sc.to_yaml(cfg))
    assert main(["recipe"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"recipe.{key}" in lines[0] and "Traceback" not in lines[0], lines
    assert not Path(cfg.recipe.out_dir).exists() and not Path(cfg.recipe.metrics).exists()


def test_the_recipe_is_never_chosen_on_a_benchmark(project):
    _, base = project
    cfg = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, datasets=["val", "bench"]))
    with pytest.raises(ValueError, match=r"recipe.datasets: \{'bench': 'benchmark'\}"):
        rc.check_recipe_config(cfg)
    datasets = {n: d for n, d in base.data.datasets.items() if d.role != "validation"}
    with pytest.raises(ValueError, match="recipe.datasets: empty and no dataset"):
        rc.validation_datasets([], datasets)
