"""Config composition: params/ is the source, params.yaml its committed composition."""

import subprocess
import sys

import pytest
import yaml

from sum.config import Config, ConfigError, compose, load_params, params_yaml_text, to_yaml

from conftest import REPO


def test_params_yaml_in_sync_with_params_dir():
    """`dvc repro` reads params.yaml; it must equal the composition of params/ (run `sumseg params`)."""
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    composed = yaml.safe_load(to_yaml(compose([])))
    loaded = yaml.safe_load(to_yaml(load_params(REPO / "params.yaml")))
    assert loaded == composed, "params.yaml is stale: run `sumseg params` and commit it"
    assert committed == yaml.safe_load(params_yaml_text())


def test_params_yaml_is_what_dvc_exp_run_composes(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml with DVC's own Hydra composition: with the
    same text for the same params, one changed eval key changes the params of `evaluate` only."""
    from dvc.utils.hydra import compose_and_dump

    from sum.config import PARAMS_DIR

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(PARAMS_DIR), None, "config", str(tmp_path), [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())
    compose_and_dump(out, str(PARAMS_DIR), None, "config", str(tmp_path), ["eval.n_panels=1"])
    theirs, ours = yaml.safe_load(out.read_text()), yaml.safe_load((REPO / "params.yaml").read_text())
    assert theirs["eval"]["n_panels"] == 1 and {k for k in ours if ours[k] != theirs[k]} == {"eval"}


def test_every_model_config_composes():
    for name in ["tiny", "vit_b", "vit_l", "vit_h", "mobile_sam"]:
        cfg = compose([f"model={name}"])
        assert cfg.model.name == name


def test_every_method_config_composes():
    names = [p.stem for p in (REPO / "params" / "method").glob("*.yaml")]
    assert {"sum", "vanilla", "hq_only", "sum_no_task_prompt", "sum_no_uncertainty_sampling"} <= set(names)
    for name in names:
        assert compose([f"method={name}"]).method.name == name


def test_override_types_are_checked():
    assert compose(["train.lr=0.001"]).train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.lr"):
        compose(["train.lr=fast"])


def test_unknown_key_in_params_file_names_file_and_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(to_yaml(Config()).replace("  lr:", "  learning_rate:"))
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and "learning_rate" in msg and "\n" not in msg


def test_unknown_override_key_is_one_line():
    with pytest.raises(ConfigError) as e:
        compose(["+train.no_such_key=1"])
    assert "no_such_key" in str(e.value) and "\n" not in str(e.value)


def test_own_datasets_replace_the_default_ones(tmp_path, monkeypatch):
    """Your own data without the embedded datasets (README): ``'~data/datasets'`` drops the
    ``data/datasets`` group's choice, ``+data.datasets.<name>=...`` adds yours; or a file of yours
    in ``params/data/datasets/`` chosen with ``data/datasets=<name>``; DVC's composition agrees, and
    ``sumseg validate`` then validates yours alone."""
    import json
    import shutil

    from dvc.utils.hydra import compose_and_dump

    from sum.cli import main
    from sum.config import PARAMS_DIR, WorldSetConfig
    from sum.data.synthetic import generate_set

    assert len(compose([]).data.datasets) > 2
    folder = generate_set(tmp_path, "mine", WorldSetConfig(task="salient", role="benchmark", n_images=1), 32, workers=1)
    mine = f"{{format: coco, images: {folder}/images, annotations: {folder}/annotations.json, task: salient, role: benchmark}}"
    overrides = ["~data/datasets", f"+data.datasets.mine={mine}"]
    assert list(compose(overrides).data.datasets) == ["mine"]
    out = tmp_path / "dvc_params.yaml"
    compose_and_dump(out, str(PARAMS_DIR), None, "config", str(tmp_path), overrides)
    assert list(yaml.safe_load(out.read_text())["data"]["datasets"]) == ["mine"]

    config_dir = tmp_path / "params"
    shutil.copytree(PARAMS_DIR, config_dir)
    (config_dir / "data" / "datasets" / "mine.yaml").write_text(f"mine: {mine}\n")
    assert list(compose(["data/datasets=mine"], config_dir=config_dir).data.datasets) == ["mine"]

    monkeypatch.chdir(tmp_path)
    assert main(["validate", *overrides, "--out", "validate.json"]) == 0
    assert list(json.loads((tmp_path / "validate.json").read_text())["datasets"]) == ["mine"]


def test_missing_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_cli_bad_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bogus: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "sum", "demo", "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "bogus" in err[0] and "bad.yaml" in err[0]


def test_cli_params_writes_the_composition(tmp_path):
    out = tmp_path / "params.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "sum", "params", "--params", str(out), "train.iterations=7"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert load_params(out).train.iterations == 7


def test_every_setting_can_be_overridden_without_plus():
    """``sum <stage> group.key=value`` works for every schema field: the params/ groups list all
    of them (a key absent from the YAML would need Hydra's ``+key=``). Architecture fields of
    the other encoder family are the exception (MobileSAM has no ViT depth)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sum.config import PARAMS_DIR, Config

    with initialize_config_dir(config_dir=str(PARAMS_DIR), version_base="1.3"):
        raw = OmegaConf.to_container(hydra_compose(config_name="config"))
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    vit_only = {"encoder_embed_dim", "encoder_depth", "encoder_num_heads", "encoder_global_attn_indexes",
                "window_size", "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_mlp_dim",
                "decoder_num_heads", "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim"}
    missing = []

    def walk(s, r, path):
        for k, v in s.items():
            if k not in r:
                if not (path == "model." and k in vit_only):
                    missing.append(path + k)
            elif isinstance(v, dict) and v and isinstance(r[k], dict):
                walk(v, r[k], f"{path}{k}.")

    walk(schema, raw, "")
    assert not missing, f"params/ lacks {missing}"
