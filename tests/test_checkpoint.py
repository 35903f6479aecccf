"""Checkpoint loading, SUM checkpoints and SAM export (spec §2), against real files, a real HTTP
server, the moto S3 server, the stock segment_anything builders and the real MobileSAM weights."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest
import torch
from conftest import stock_sam, free_port, model_config
from segment_anything import sam_model_registry

from sum.io import FetchError, S3Options
from sum.model.build import build_sum_model, task_prompt_keys
from sum.model.checkpoint import CheckpointError, config_from_dict, load_model, read_checkpoint, save_sum_checkpoint
from sum.model.export import export_sam

CPU = {"device": "cpu", "fast_path": "off"}  # the loaded weights compared with tensors on the CPU
ACCESS_KEY = "AKIASUMTESTKEY7Q3Z"
SECRET_KEY = "sum-test-secret-Xk29fQ"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line(err: Exception, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert ACCESS_KEY not in msg and SECRET_KEY not in msg


def assert_same_weights(model: torch.nn.Module, sd: dict) -> None:
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def assert_task_prompts_zero(model: torch.nn.Module) -> None:
    own = model.state_dict()
    keys = task_prompt_keys(model)
    assert len(keys) == 4
    assert all(not own[k].any() for k in keys)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b_sam(tmp_path_factory):
    """A randomly initialised stock SAM ViT-B saved as the official checkpoints are (a plain state
    dict); yields (path, state dict). Built once per module: vit_b is 94M parameters."""
    torch.manual_seed(0)
    sd = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture()
def tiny_sam(tmp_path, tiny_cfg):
    """A stock tiny SAM state dict on disk; yields (path, state dict)."""
    torch.manual_seed(1)
    sd = stock_sam(tiny_cfg).state_dict()
    path = tmp_path / "sam_tiny.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture()
def tiny_sum(tmp_path, tiny_cfg):
    """A tiny SUM checkpoint whose task prompt 2 is non-zero; yields (path, model)."""
    torch.manual_seed(2)
    model = build_sum_model(tiny_cfg)
    with torch.no_grad():
        model.prompt_encoder.task_prompt_embedding[2].weight.normal_()
    path = save_sum_checkpoint(model, tiny_cfg, tmp_path / "sum_tiny.pt", meta={"step": 7, "note": "test"})
    return path, model


@pytest.fixture()
def only_explicit_s3(monkeypatch, tmp_path):
    """No AWS environment: S3 works only through S3Options."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


# ---- official formats -------------------------------------------------------------------------


def test_official_vit_b_loads_strictly(vit_b_sam):
    path, sd = vit_b_sam
    model = load_model(model_config("vit_b"), path, sha256=sha256(path), **CPU)
    assert not model.training
    assert_same_weights(model, sd)
    assert set(model.state_dict()) - set(sd) == set(task_prompt_keys(model))
    assert_task_prompts_zero(model)


def test_export_vit_b_loads_in_stock_builder(vit_b_sam, tmp_path, caplog):
    """Acceptance: SAM -> SUM (task prompt trained) -> SUM checkpoint -> export -> stock builder."""
    path, sd = vit_b_sam
    cfg = dataclasses.replace(model_config("vit_b"), checkpoint=str(path))
    model = load_model(cfg, **CPU)
    with torch.no_grad():
        model.prompt_encoder.task_prompt_embedding[1].weight.fill_(0.5)
        model.mask_decoder.iou_token.weight.add_(1.0)  # a "fine-tuned" SAM weight
    ckpt = save_sum_checkpoint(model, cfg, tmp_path / "sum_vit_b.pt")
    caplog.set_level(logging.INFO)
    out = export_sam(ckpt, tmp_path / "export" / "sam_vit_b.pth")
    assert "task prompt ids [1]" in caplog.text and "task prompt 0" in caplog.text
    stock = sam_model_registry["vit_b"](checkpoint=str(out))  # strict load_state_dict
    expected = {k: v for k, v in model.state_dict().items() if k not in task_prompt_keys(model)}
    assert set(stock.state_dict()) == set(expected)
    assert_same_weights(stock, expected)
    assert not torch.equal(stock.mask_decoder.iou_token.weight, sd["mask_decoder.iou_token.weight"])


def test_real_mobile_sam_loads(mobile_sam_checkpoint):
    cfg = dataclasses.replace(model_config("mobile_sam"), checkpoint=str(mobile_sam_checkpoint))
    model = load_model(cfg, **CPU)  # checks cfg.checkpoint_sha256 too
    sd = torch.load(mobile_sam_checkpoint, map_location="cpu", weights_only=True)
    assert_same_weights(model, sd)
    assert_task_prompts_zero(model)
    # TinyViT caches its attention biases on eval(): the cache must hold the loaded values.
    attns = [m for m in model.image_encoder.modules() if hasattr(m, "attention_bias_idxs")]
    assert attns
    for m in attns:
        assert torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs])


# ---- one-line failures ------------------------------------------------------------------------


def _renamed(sd):
    k = "mask_decoder.iou_token.weight"
    sd["mask_decoder.iou_tokn.weight"] = sd.pop(k)
    return "mask_decoder.iou_tokn.weight", "1 unexpected key"


def _missing(sd):
    del sd["image_encoder.neck.0.weight"]
    return "image_encoder.neck.0.weight", "1 missing key"


def _wrong_shape(sd):
    sd["image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 16)
    return "image_encoder.pos_embed", "1 shape mismatch"


def _extra_task_prompt(sd):
    sd["prompt_encoder.task_prompt_embedding.4.weight"] = torch.zeros(1, 32)
    return "prompt_encoder.task_prompt_embedding.4.weight", "1 unexpected key"


@pytest.mark.parametrize("mutate", [_renamed, _missing, _wrong_shape, _extra_task_prompt])
def test_mismatched_state_dict_fails_naming_key(tiny_sam, tiny_cfg, tmp_path, mutate):
    _, sd = tiny_sam
    sd = dict(sd)
    key, what = mutate(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_cfg, path)
    assert_one_line(e.value, str(path), key, what)


def test_many_bad_keys_are_counted(tiny_sam, tiny_cfg, tmp_path):
    _, sd = tiny_sam
    sd = {("x." + k if k.startswith("mask_decoder.") else k): v for k, v in sd.items()}
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_cfg, path)
    n = sum(k.startswith("x.") for k in sd)
    assert_one_line(e.value, f"{n} unexpected keys", f"{n} missing keys", ", ...")


def test_wrong_sha256_fails_naming_file(tiny_sam, tiny_cfg):
    path, _ = tiny_sam
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, path, sha256="ab" * 32)
    assert_one_line(e.value, str(path), "sha256 mismatch", "ab" * 32)


def test_missing_file_fails_naming_file(tiny_cfg, tmp_path):
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, tmp_path / "nope.pth")
    assert_one_line(e.value, str(tmp_path / "nope.pth"), "not found")


@pytest.mark.parametrize(
    "content, what",
    [
        (b"this is not a checkpoint at all" * 10, "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a readable PyTorch checkpoint"),
        (b"", "not a readable PyTorch checkpoint"),
    ],
)
def test_corrupt_file_fails_naming_file(tiny_cfg, tmp_path, content, what):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_cfg, path)
    assert_one_line(e.value, str(path), what)


def test_truncated_checkpoint_fails(tiny_sam, tiny_cfg, tmp_path):
    src, _ = tiny_sam
    path = tmp_path / "truncated.pth"
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_cfg, path)
    assert_one_line(e.value, str(path), "not a readable PyTorch checkpoint")


@pytest.mark.parametrize(
    "obj, what",
    [
        ([1, 2, 3], "holds a list"),
        ({"model": {"a": 1}}, "not tensors (model)"),
        ({"format": "other", "state_dict": {}}, "format 'other'"),
        ({"format": "sum-checkpoint", "version": 99, "model_config": {}, "state_dict": {}}, "version 99"),
        ({"path": Path("x")}, f"holds a pathlib.{type(Path('x')).__name__} object"),
    ],
)
def test_unsupported_content_fails(tiny_cfg, tmp_path, obj, what):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_cfg, path)
    assert_one_line(e.value, str(path), what)


# ---- S3 and HTTP ------------------------------------------------------------------------------


def test_s3_with_explicit_options(s3_bucket, s3_server, only_explicit_s3, tiny_sam, tiny_cfg, tmp_path, caplog):
    client, bucket = s3_bucket
    path, sd = tiny_sam
    client.upload_file(str(path), bucket, "models/sam_tiny.pth")
    uri = f"s3://{bucket}/models/sam_tiny.pth"
    opts = S3Options(endpoint_url=s3_server, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="sum")
    for sha in (None, sha256(path)):
        model = load_model(tiny_cfg, uri, sha256=sha, s3=opts, cache_dir=tmp_path / "c", **CPU)
        assert_same_weights(model, sd)
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, uri, sha256="0" * 64, s3=opts, cache_dir=tmp_path / "c")
    assert_one_line(e.value, uri, "sha256 mismatch")
    with pytest.raises(FetchError) as e:  # no keys anywhere: the environment was cleared
        load_model(tiny_cfg, uri, s3=S3Options(endpoint_url=s3_server), cache_dir=tmp_path / "c")
    assert_one_line(e.value, uri, "no S3 credentials")
    assert uri in caplog.text
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text


def test_s3_with_environment(s3_bucket, monkeypatch, tiny_sam, tiny_cfg, tmp_path, caplog):
    client, bucket = s3_bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("SUM_CACHE_DIR", str(tmp_path / "cache"))
    path, sd = tiny_sam
    client.upload_file(str(path), bucket, "sam_tiny.pth")
    uri = f"s3://{bucket}/sam_tiny.pth"
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="sum")
    for sha in (None, sha256(path)):
        assert_same_weights(load_model(tiny_cfg, uri, sha256=sha, **CPU), sd)
    assert list((tmp_path / "cache" / "remote").iterdir())
    cfg = dataclasses.replace(tiny_cfg, checkpoint=uri, checkpoint_sha256=sha256(path))
    assert_same_weights(load_model(cfg, **CPU), sd)
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, f"s3://{bucket}/missing.pth")
    assert_one_line(e.value, f"s3://{bucket}/missing.pth", "no such key")
    assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text


def test_s3_nonexistent_bucket(s3_env, tiny_cfg, tmp_path):
    uri = "s3://sum-no-such-bucket/sam.pth"
    opts = S3Options(endpoint_url=s3_env, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, uri, s3=opts, cache_dir=tmp_path)
    assert_one_line(e.value, uri, "bucket does not exist")


def test_s3_endpoint_not_listening(only_explicit_s3, tiny_cfg, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    uri = "s3://bucket/sam.pth"
    opts = S3Options(endpoint_url=endpoint, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, uri, s3=opts, cache_dir=tmp_path)
    assert_one_line(e.value, uri, "unreachable", endpoint)


def test_http(http_root, tiny_sam, tiny_cfg, tmp_path):
    root, base = http_root
    path, sd = tiny_sam
    (root / "sam_tiny.pth").write_bytes(path.read_bytes())
    for sha in (None, sha256(path)):
        model = load_model(tiny_cfg, f"{base}/sam_tiny.pth", sha256=sha, cache_dir=tmp_path, **CPU)
        assert_same_weights(model, sd)
    with pytest.raises(FetchError) as e:
        load_model(tiny_cfg, f"{base}/missing.pth", cache_dir=tmp_path)
    assert_one_line(e.value, f"{base}/missing.pth", "404")


# ---- SUM checkpoints and export ---------------------------------------------------------------


def test_sum_round_trip(tiny_sum, tiny_cfg):
    path, model = tiny_sum
    loaded = load_model(checkpoint=path, sha256=sha256(path))  # the architecture the checkpoint stores
    ckpt = read_checkpoint(path)
    cfg = dataclasses.replace(config_from_dict(ckpt.model_config, ckpt.source), checkpoint=str(path))
    assert cfg == dataclasses.replace(tiny_cfg, checkpoint=str(path), checkpoint_sha256=None)
    assert_same_weights(loaded, model.state_dict())
    assert loaded.prompt_encoder.task_prompt_embedding[2].weight.abs().sum() > 0
    assert read_checkpoint(path).meta == {"step": 7, "note": "test"}
    assert_same_weights(load_model(cfg, **CPU), model.state_dict())  # the stored config rebuilds it
    # the stored task prompt acts: task 2 differs from task 0 on the same prompt
    pe = loaded.prompt_encoder
    _, dense0 = pe(None, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, task_prompt=0)
    _, dense2 = pe(None, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), None, task_prompt=2)
    assert not torch.equal(dense0, dense2)


def test_load_model_refuses_other_architecture(tiny_sum, tiny_cfg):
    path, _ = tiny_sum
    cfg = dataclasses.replace(tiny_cfg, checkpoint=str(path), encoder_depth=3, encoder_global_attn_indexes=[2])
    with pytest.raises(CheckpointError) as e:
        load_model(cfg)
    assert_one_line(e.value, str(path), "encoder_depth (checkpoint 2, config 3)", "encoder_global_attn_indexes")


def test_load_model_without_task_prompt_zeroes_it(tiny_sum, tiny_cfg, caplog):
    path, _ = tiny_sum
    caplog.set_level(logging.WARNING)
    model = load_model(dataclasses.replace(tiny_cfg, checkpoint=str(path), use_task_prompt=False), **CPU)
    assert_task_prompts_zero(model)
    assert "use_task_prompt is off" in caplog.text


def test_load_model_without_config_refuses_plain_sam(tiny_sam):
    path, _ = tiny_sam
    with pytest.raises(CheckpointError) as e:
        load_model(checkpoint=path)
    assert_one_line(e.value, str(path), "plain SAM state dict")


def test_load_model_of_a_read_checkpoint(tiny_sam, tiny_sum, tiny_cfg):
    """A `Checkpoint` already read (for its meta) loads as its file does: a plain SAM state dict into
    the config's architecture, a SUM checkpoint into the one it stores, on the config's device."""
    path, sd = tiny_sam
    model = load_model(tiny_cfg, read_checkpoint(path), **CPU)
    assert_same_weights(model, sd)
    assert_task_prompts_zero(model)
    sum_path, sum_model = tiny_sum
    bigger = dataclasses.replace(tiny_cfg, encoder_depth=3, encoder_global_attn_indexes=[2], device="cpu")
    loaded = load_model(bigger, read_checkpoint(sum_path), fast_path="off")
    assert_same_weights(loaded, sum_model.state_dict())
    assert len(loaded.image_encoder.blocks) == 2


def test_load_model_defaults_and_argument_errors(tiny_sum, tiny_cfg):
    path, _ = tiny_sum
    model = load_model(checkpoint=path)  # no config: cpu, fast path off
    assert next(model.parameters()).device.type == "cpu" and not model.training
    with pytest.raises(ValueError, match="model.fast_path='fast': expected auto, on or off"):
        load_model(dataclasses.replace(tiny_cfg, fast_path="fast"))
    with pytest.raises(ValueError, match="^fast_path='fast'"):
        load_model(checkpoint=path, fast_path="fast")
    with pytest.raises(ValueError, match="model.device='gpu'"):
        load_model(checkpoint=path, device="gpu")
    with pytest.raises(ValueError, match="give a model config, a checkpoint or both"):
        load_model()
    with pytest.raises(ValueError, match="sha256 checks a checkpoint file"):
        load_model(tiny_cfg, sha256="0" * 64)


def test_load_model_stored_config_that_does_not_build(tiny_sam, tiny_cfg, tmp_path):
    _, sd = tiny_sam
    stored = {**dataclasses.asdict(tiny_cfg), "encoder": "tiny_vit"}  # TinyViT needs prompt_embed_dim 256
    path = tmp_path / "odd_sum.pt"
    torch.save({"format": "sum-checkpoint", "version": 1, "model_config": stored, "state_dict": sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(checkpoint=path)
    assert_one_line(e.value, str(path), "stored model config does not build", "prompt_embed_dim=32")


def test_save_refuses_non_plain_meta(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=rf"meta\['out'\] is a {type(Path('x')).__name__}"):
        save_sum_checkpoint(build_sum_model(tiny_cfg), tiny_cfg, tmp_path / "x.pt", meta={"out": Path("x")})
    assert list(tmp_path.iterdir()) == []


def test_export_tiny_loads_in_stock_sam(tiny_sum, tiny_cfg, tmp_path, caplog):
    path, model = tiny_sum
    caplog.set_level(logging.WARNING)
    out = export_sam(path, tmp_path / "sam_tiny_export.pth", sha256=sha256(path))
    assert "task prompt ids [2]" in caplog.text
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert not [k for k in sd if "task_prompt" in k]
    stock = stock_sam(tiny_cfg)
    stock.load_state_dict(sd)  # strict
    assert_same_weights(stock, {k: v for k, v in model.state_dict().items() if "task_prompt" not in k})
    # and back: the export loads into a SUM model, whose task prompts are then zero
    assert_task_prompts_zero(load_model(tiny_cfg, out, **CPU))


def test_export_without_task_prompt_is_silent(tiny_sam, tiny_cfg, tmp_path, caplog):
    src, sd = tiny_sam
    model = load_model(tiny_cfg, src, **CPU)
    ckpt = save_sum_checkpoint(model, tiny_cfg, tmp_path / "sum.pt")
    caplog.set_level(logging.WARNING)
    out = export_sam(ckpt, tmp_path / "sam.pth")
    assert caplog.text == ""
    assert torch.load(out, weights_only=True).keys() == sd.keys()
