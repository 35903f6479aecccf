"""The MLflow model registry against real local stores: the ``register`` stage and its
no-forgetting gate, the pyfunc contract (predictions equal `SumPredictor`'s, one encoder run per
image, every bad input named), pulls by alias, and ``mlflow models serve``.

The models are tiny randomly initialised SUM models (``params/model/tiny.yaml``) with non-zero
task vectors, so the task prompt changes the masks; the evaluation files the gate reads are
written here by hand, so each gate case is known."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, free_port, model_config, stock_sam
from sum.registry import gate

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------
# the gate, by hand

TASKS = ("salient", "entity", "part")


def eval_json(scores: dict) -> dict:
    """metrics/eval.json with point-protocol task scores: ``{model: {task: value}}`` after every
    reported round (1, 3, 6)."""
    out = {}
    for model, per_task in scores.items():
        tasks = {t: {f"miou_{r}": v for r in (1, 3, 6)} for t, v in per_task.items()}
        overall = {f"miou_{r}": sum(per_task.values()) / len(per_task) for r in (1, 3, 6)}
        out[model] = {"point": {"overall": overall, "tasks": tasks, "datasets": {}}}
    return out


def write_deltas(path: Path, rows) -> None:
    """deltas.csv rows: (model, task, round, delta, lo, hi, verdict)."""
    lines = ["metric,protocol,model,scope,round,delta,lo,hi,verdict,images,masks"]
    for model, task, r, d, lo, hi, verdict in rows:
        lines.append(f"iou,point,{model},{task},{r},{d},{lo},{hi},{verdict},4,12")
    path.write_text("\n".join(lines) + "\n")


def test_headline_is_the_mean_over_tasks_of_the_mean_over_rounds():
    metrics = {"m": {"point": {"tasks": {
        "salient": {"miou_1": 0.6, "miou_3": 0.8, "miou_6": 0.0},
        "part": {"miou_1": 0.2, "miou_3": 0.4, "miou_6": 0.0},
    }}}}
    # salient (0.6 + 0.8) / 2 = 0.7, part (0.2 + 0.4) / 2 = 0.3, mean 0.5
    assert gate.headline_score(metrics, "m", "point", "miou", [1, 3], "eval.json") == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"eval.json: m/point/salient has no miou after round\(s\) \[2\]"):
        gate.headline_score(metrics, "m", "point", "miou", [1, 2], "eval.json")
    with pytest.raises(ValueError, match="no model 'x'"):
        gate.headline_score(metrics, "x", "point", "miou", [1], "eval.json")


def test_forgetting_needs_a_loss_past_the_tolerance_that_the_interval_confirms(tmp_path):
    metrics = eval_json({"foundation": {t: 0.6 for t in TASKS}, "sum": {"salient": 0.7, "entity": 0.58, "part": 0.5}})
    write_deltas(tmp_path / "d.csv", [
        ("sum", "salient", 1, 0.1, 0.05, 0.15, "above"),
        ("sum", "entity", 1, -0.02, -0.03, -0.01, "below"),  # real, but within 1 point? no: 2 points
        ("sum", "part", 1, -0.1, -0.2, 0.01, "tie"),  # 10 points, but the interval holds 0
    ])
    deltas = gate.read_deltas(tmp_path / "d.csv")
    checks = gate.forgetting_checks(metrics, deltas, "sum", "foundation", "point", "miou", [1], 1.0, "eval.json")
    by_task = {c.task: c for c in checks}
    assert by_task["salient"].forgets is False and by_task["salient"].verdict == "above"
    assert by_task["entity"].forgets is True and by_task["entity"].delta == pytest.approx(-2.0)
    assert by_task["part"].forgets is False and by_task["part"].lo == pytest.approx(-20.0)
    # a wider tolerance lets the entity loss pass
    checks = gate.forgetting_checks(metrics, deltas, "sum", "foundation", "point", "miou", [1], 2.5, "eval.json")
    assert not any(c.forgets for c in checks)
    # without an interval (no deltas.csv) the estimate alone decides: part's 10 points now count
    checks = gate.forgetting_checks(metrics, {}, "sum", "foundation", "point", "miou", [1, 3], 1.0, "eval.json")
    assert [(c.task, c.round) for c in checks if c.forgets] == [("entity", 1), ("entity", 3), ("part", 1), ("part", 3)]
    assert all(c.verdict == "unknown" and math.isnan(c.lo) for c in checks)
    assert gate.Judgement("sum", 0.6, checks).forgets == ["entity", "part"]


def test_decide_each_way():
    clean = gate.Judgement("sum", 0.70, [gate.Check("part", 1, 0.5, -1.0, 2.0, "tie", False)])
    forgetful = gate.Judgement("sum", 0.90, [gate.Check("part", 3, -6.4, -11.1, -1.6, "below", True)])
    assert gate.decide(clean, None, 1.0).promoted
    assert gate.decide(clean, ("2", 0.65), 1.0) == gate.Decision(True, "headline 70.00 beats champion v2 (65.00) and forgets nothing")
    assert not gate.decide(clean, ("2", 0.75), 1.0).promoted
    assert not gate.decide(clean, ("2", 0.70), 1.0).promoted  # a tie does not beat
    d = gate.decide(forgetful, ("2", 0.10), 1.0)
    assert not d.promoted and d.reason.startswith("forgets part: worst part after 3 clicks -6.4 points [-11.1, -1.6]")
    assert not gate.decide(forgetful, None, 1.0).promoted
    assert not gate.decide(clean, ("2", None), 1.0).promoted


# ---------------------------------------------------------------------------------------------
# real stores


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A tiny SUM checkpoint with non-zero task vectors (ids 1-3), as `sumseg finetune` writes it."""
    from sum.model.build import build_sum_model
    from sum.model.checkpoint import save_sum_checkpoint

    cfg = model_config("tiny")
    torch.manual_seed(seed)
    model = build_sum_model(cfg)
    with torch.no_grad():
        for emb in model.prompt_encoder.task_prompt_embedding[1:]:
            emb.weight.normal_(0, 0.5)
    method = {"name": "sum", "use_unlabeled": True, "use_uncertainty_loss": True, "use_uncertainty_sampling": True,
              "use_task_prompt": True, "continuous_task_prompt": False}
    return save_sum_checkpoint(model, cfg, path, meta={"method": "sum", "steps": 3, "method_config": method})


def registry_cfg(root: Path, uri: str, name: str):
    from sum.config import Config

    cfg = Config()
    cfg.model = model_config("tiny")
    cfg.train.model_dir = str(root / "models")
    cfg.eval.models = {"foundation": "", "sum": str(root / "models" / "sum.pt")}
    cfg.eval.metrics = str(root / "eval.json")
    cfg.eval.out_dir = str(root / "eval")
    cfg.tracking = dataclasses.replace(cfg.tracking, uri=uri, experiment="sum-registry-test", system_metrics=False)
    cfg.registry = dataclasses.replace(cfg.registry, model_name=name, out=str(root / "register.json"))
    return cfg


def register_with(cfg, root: Path, sum_scores: dict, deltas=None) -> dict:
    from sum.registry.register import register

    (root / "eval.json").write_text(json.dumps(eval_json({"foundation": {t: 0.6 for t in TASKS}, "sum": sum_scores})))
    (root / "eval").mkdir(exist_ok=True)
    if deltas is not None:
        write_deltas(root / "eval" / "deltas.csv", deltas)
    else:
        (root / "eval" / "deltas.csv").unlink(missing_ok=True)
    return register(cfg)["methods"]["sum"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with local artifacts in a folder that also holds uv.lock (the stage pins the
    model's requirements from it); the tests run there."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copy(REPO / "uv.lock", root / "uv.lock")
    tiny_checkpoint(root / "models" / "sum.pt", seed=0)
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture()
def in_store(store, monkeypatch):
    root, uri = store
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return root, uri


@pytest.fixture(scope="module")
def champion(store):
    """``sum-tiny`` with version 1 as champion (it forgets nothing); yields (root, uri, name)."""
    from mlflow import MlflowClient

    root, uri = store
    here = os.getcwd()
    os.chdir(root)
    try:
        cfg = registry_cfg(root, uri, "sum-tiny")
        first = register_with(cfg, root, {"salient": 0.7, "entity": 0.6, "part": 0.6})
    finally:
        os.chdir(here)
    assert first["version"] == 1 and first["promoted"] and first["aliases"] == ["challenger", "champion"]
    assert str(MlflowClient(uri).get_model_version_by_alias("sum-tiny", "champion").version) == "1"
    return root, uri, "sum-tiny"


def test_the_gate_against_a_real_registry(champion, monkeypatch):
    from mlflow import MlflowClient

    root, uri, name = champion
    monkeypatch.chdir(root)
    client = MlflowClient(uri)
    cfg = registry_cfg(root, uri, name)

    # a better version forgets nothing and takes champion
    better = register_with(cfg, root, {"salient": 0.8, "entity": 0.6, "part": 0.6},
                           deltas=[("sum", t, r, 0.0, -0.01, 0.01, "tie") for t in TASKS for r in (1, 3, 6)])
    assert better["promoted"] and better["champion_before"]["version"] == 1
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(better["version"])

    # a worse one stays challenger
    worse = register_with(cfg, root, {"salient": 0.65, "entity": 0.6, "part": 0.6})
    assert not worse["promoted"] and "does not beat champion" in worse["reason"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == str(worse["version"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(better["version"])

    # a higher headline that forgets parts (a loss the interval confirms) never becomes champion
    forgets = register_with(cfg, root, {"salient": 0.99, "entity": 0.6, "part": 0.55},
                            deltas=[("sum", "part", r, -0.05, -0.08, -0.02, "below") for r in (1, 3, 6)])
    assert not forgets["promoted"] and forgets["forgets"] == ["part"]
    mv = client.get_model_version(name, str(forgets["version"]))
    assert mv.tags["forgets"] == "part" and mv.tags["promoted"] == "false"
    assert mv.tags["reason"].startswith("forgets part: worst part after 1 click -5.0 points [-8.0, -2.0]")
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(better["version"])

    # what the UI shows of a version: lineage, the figures it was judged on, the decision
    tags = client.get_model_version(name, str(better["version"])).tags
    assert tags["headline"] == "0.666667" and tags["eval.salient.miou_3"] == "0.8000"
    assert tags["delta.part.6"] == "+0.0 [-1.0, +1.0] tie" and tags["method.use_uncertainty_loss"] == "True"
    assert tags["checkpoint_md5"] == __import__("sum.io", fromlist=["md5_file"]).md5_file(root / "models" / "sum.pt")
    assert tags["promoted"] == "true" and tags["training_steps"] == "3" and tags["git_commit"]
    written = json.loads((root / "register.json").read_text())
    assert written["methods"]["sum"]["version"] == forgets["version"] and written["model_name"] == name


def test_the_first_version_is_not_promoted_when_it_forgets(store, in_store):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    root, uri = in_store
    cfg = registry_cfg(root, uri, "sum-tiny-first-forgets")
    first = register_with(cfg, root, {"salient": 0.9, "entity": 0.6, "part": 0.4})  # no interval: the estimate decides
    assert first["version"] == 1 and not first["promoted"] and first["forgets"] == ["part"]
    assert first["aliases"] == ["challenger"]
    with pytest.raises(MlflowException):
        MlflowClient(uri).get_model_version_by_alias("sum-tiny-first-forgets", "champion")


def test_register_names_what_is_missing(in_store):
    from sum.registry.register import register

    root, uri = in_store
    cfg = registry_cfg(root, uri, "never")
    cfg.registry = dataclasses.replace(cfg.registry, metric="dice")
    with pytest.raises(ValueError, match="registry.metric='dice'"):
        register(cfg)
    cfg = registry_cfg(root, uri, "never")
    cfg.eval.models = {"foundation": ""}
    with pytest.raises(ValueError, match=r"registry.methods: sum: .*sum.pt is not among eval.models"):
        register(cfg)


# ---------------------------------------------------------------------------------------------
# the pyfunc contract


def make_image_png(path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    image[10:30, 15:40] = (230, 40, 40)
    Image.fromarray(image).save(path)
    return image




def reference_predictions(checkpoint: Path, image: np.ndarray, requests: list) -> list:
    """The same requests through `SumPredictor` on a model loaded by the stage loader."""
    from sum.model.checkpoint import load_model
    from sum.model.predictor import SumPredictor
    from sum.registry.pyfunc import decode_array
    from sum.tasks import TASK_IDS

    cfg = dataclasses.replace(model_config("tiny"), checkpoint=str(checkpoint), device="cpu")
    predictor = SumPredictor(load_model(cfg))
    predictor.set_image(image)
    out = []
    for req in requests:
        kwargs = {"task_prompt": TASK_IDS[req.get("task", "unspecified")], "multimask_output": req.get("multimask", True)}
        if "point_coords" in req:
            kwargs.update(point_coords=np.asarray(req["point_coords"]), point_labels=np.asarray(req["point_labels"]))
        if "box" in req:
            kwargs["boxes"] = np.asarray(req["box"])
        if "mask_input" in req:
            kwargs["mask_input"] = decode_array(req["mask_input"], "mask_input")[None]
        masks, iou, low = predictor.predict(**kwargs)
        out.append((masks[0], iou[0], low[0]))
    return out


def as_dicts(responses) -> list:
    return [r.model_dump() if hasattr(r, "model_dump") else r for r in responses]


def assert_same(responses: list, expected: list) -> None:
    from pycocotools import mask as mask_utils

    from sum.registry.pyfunc import decode_array

    assert len(responses) == len(expected)
    for got, (masks, iou, low) in zip(responses, expected):
        decoded = np.stack([mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in got["masks"]])
        assert decoded.shape == masks.shape and np.array_equal(decoded.astype(bool), masks)
        np.testing.assert_allclose(got["iou_predictions"], iou, atol=1e-6, rtol=0)
        # A server is another process, whose thread count may differ: float32 sums in another order (~1e-7).
        np.testing.assert_allclose(np.stack([decode_array(x, "x") for x in got["low_res_logits"]]), low, atol=1e-5, rtol=0)


def click_requests(image_ref: str, low_res_of_first: str | None = None) -> list:
    reqs = [
        {"image": image_ref, "point_coords": [[20, 15]], "point_labels": [1], "task": "salient"},
        {"image": image_ref, "point_coords": [[20.5, 15], [50, 5]], "point_labels": [1, 0], "box": [10, 5, 45, 35],
         "task": "part", "multimask": False},
    ]
    if low_res_of_first is not None:
        reqs.append({"image": image_ref, "point_coords": [[20, 15], [30, 25]], "point_labels": [1, 1],
                     "mask_input": low_res_of_first, "multimask": False})
    return reqs


LOAD_AND_PREDICT = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(json.load(open(sys.argv[2])))
json.dump([r.model_dump() if hasattr(r, "model_dump") else r for r in out], open(sys.argv[3], "w"))
"""


def predict_in_fresh_process(uri: str, tracking: str, requests: list, tmp: Path, env_extra=None) -> list:
    (tmp / "requests.json").write_text(json.dumps(requests))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, **(env_extra or {})}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, str(tmp / "requests.json"), str(tmp / "out.json")],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


def test_load_by_alias_in_a_fresh_process_predicts_as_sum_predictor(champion, tmp_path):
    root, uri, name = champion
    from sum.registry.pyfunc import encode_array

    image = make_image_png(tmp_path / "img.png")
    first = reference_predictions(root / "models" / "sum.pt", image, click_requests(""))[0]
    requests = click_requests(str(tmp_path / "img.png"), encode_array(first[2][0]))  # a second round
    got = predict_in_fresh_process(f"models:/{name}@champion", uri, requests, tmp_path)
    # the champion is version 1 or the better version of the gate test: both hold this checkpoint
    assert_same(got, reference_predictions(root / "models" / "sum.pt", image, requests))
    assert [r["embedding_cached"] for r in got] == [False, True, True]


@pytest.fixture(scope="module")
def loaded(champion):
    import mlflow

    from sum.tracking import global_tracking_uri

    root, uri, name = champion
    with global_tracking_uri(uri):  # models:/ URIs resolve through the global tracking URI
        return mlflow.pyfunc.load_model(f"models:/{name}/1")


def png_b64(image: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_image_sources_give_the_same_masks_and_one_encoder_run(loaded, champion, tmp_path, s3_bucket, http_root):
    root, _, _ = champion
    image = make_image_png(tmp_path / "img.png")
    client, bucket = s3_bucket
    client.upload_file(str(tmp_path / "img.png"), bucket, "in/img.png")
    www, base = http_root
    shutil.copy(tmp_path / "img.png", www / "img.png")
    sources = [str(tmp_path / "img.png"), png_b64(image), "data:image/png;base64," + png_b64(image),
               f"s3://{bucket}/in/img.png", f"{base}/img.png"]
    req = click_requests("")[0]
    runs_before = loaded.unwrap_python_model().cache.encoder_runs
    got = as_dicts(loaded.predict([{**req, "image": s} for s in sources]))
    assert loaded.unwrap_python_model().cache.encoder_runs - runs_before <= 1
    expected = reference_predictions(root / "models" / "sum.pt", image, [req])
    for g in got:
        assert_same([g], expected)


def test_the_embedding_cache_is_an_lru_of_its_size(tmp_path):
    from sum.registry.pyfunc import EmbeddingLRU

    class Counting:
        def __init__(self):
            self.encoded = []

        def set_image(self, image):
            self.encoded.append(int(image[0, 0, 0]))
            self.current = image

        def get_embedding(self):
            return int(self.current[0, 0, 0])

        def set_embedding(self, emb):
            self.current = np.full((2, 2, 3), emb, np.uint8)

    images = [np.full((2, 2, 3), v, np.uint8) for v in range(3)]
    predictor, lru = Counting(), EmbeddingLRU(2)
    assert [lru.set_image(predictor, images[i]) for i in (0, 1, 0, 2, 1, 0)] == [False, False, True, False, False, False]
    # 0 was used last before 2 came, so 1 left; then 1 came back and pushed 0 out
    assert predictor.encoded == [0, 1, 2, 1, 0] and lru.encoder_runs == 5
    with pytest.raises(ValueError, match="embedding_cache_size=0"):
        EmbeddingLRU(0)


BAD_REQUESTS = [
    ("unknown task", {"task": "animal"}, "request[0].task", "'animal' is not one of"),
    ("point outside", {"point_coords": [[56, 10]]}, "request[0].point_coords[0]", "outside the 56x40 image"),
    ("negative point", {"point_coords": [[3, -1]]}, "request[0].point_coords[0]", "outside"),
    ("points not xy", {"point_coords": [[1, 2, 3]]}, "request[0].point_coords", "expected [[x, y], ...]"),
    ("labels mismatch", {"point_labels": [1, 0]}, "request[0].point_labels", "2 labels for 1 points"),
    ("bad label", {"point_labels": [2]}, "request[0].point_labels", "labels are 1 (positive) or 0"),
    ("labels missing", {"point_labels": None}, "request[0].point_labels", "missing"),
    ("box length", {"box": [1, 2, 3]}, "request[0].box", "got 3 numbers"),
    ("box outside", {"box": [1, 2, 80, 30]}, "request[0].box", "inside the 56x40 image"),
    ("no prompt", {"point_coords": None, "point_labels": None}, "request[0].point_coords", "no prompt"),
    ("mask shape", {"mask_input": "SHAPE"}, "request[0].mask_input", "shape [64, 64], expected [32, 32]"),
    ("mask not npy", {"mask_input": "bm90IG5weQ=="}, "request[0].mask_input", "not a base64 .npy array"),
    ("image not decodable", {"image": base64.b64encode(b"not an image at all").decode()}, "request[0].image", "cannot decode"),
    ("image gif", {"image": "GIF"}, "request[0].image", "a GIF image, expected PNG or JPEG"),
    ("image no file", {"image": "missing/photo.png"}, "request[0].image", "is no file, URI or base64"),
    ("image bucket", {"image": "s3://no-such-bucket-sum/x.png"}, "request[0].image", "no-such-bucket-sum"),
    ("unknown field", {"boxes": [1, 2, 3, 4]}, "boxes", "Extra inputs are not permitted"),
    ("wrong json type", {"multimask": "maybe"}, "multimask", "valid boolean"),
]


@pytest.mark.parametrize("case,change,field,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_one_error_naming_the_field(loaded, tmp_path, s3_env, case, change, field, message):
    from mlflow.exceptions import MlflowException

    from sum.registry.pyfunc import encode_array

    image = make_image_png(tmp_path / "img.png")
    req = {"image": png_b64(image), "point_coords": [[20, 15]], "point_labels": [1]}
    for k, v in change.items():
        if v == "SHAPE":
            v = encode_array(np.zeros((64, 64), np.float32))
        if v == "GIF":
            v = png_b64(image, "GIF")
        if v is None:
            req.pop(k)
        else:
            req[k] = v
    with pytest.raises(MlflowException) as err:
        loaded.predict([req])
    text = str(err.value)
    assert field in text and message in text
    if not field.startswith("request"):  # MLflow's own type check: names the field, stays one error
        return
    assert text.startswith(field + ":") and "\n" not in text


# ---------------------------------------------------------------------------------------------
# pulls


def test_pull_writes_the_checkpoint_or_a_stock_sam_state_dict(champion, tmp_path, monkeypatch):
    from sum.registry.pull import pull

    root, uri, name = champion
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", "sum", "pull", f"models:/{name}@champion", "--out",
                        str(tmp_path / "model.pt"), "--format", "sum"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "model.pt").read_bytes() == (root / "models" / "sum.pt").read_bytes()

    pull(f"models:/{name}@champion", tmp_path / "sam.pth", "sam", tracking=uri)
    stock = stock_sam(model_config("tiny"))
    stock.load_state_dict(torch.load(tmp_path / "sam.pth", weights_only=True), strict=True)

    with pytest.raises(ValueError, match=f"models:/{name}@nope: not in the registry"):
        pull(f"models:/{name}@nope", tmp_path / "x.pt", tracking=uri)
    with pytest.raises(ValueError, match="--format 'onnx'"):
        pull(f"models:/{name}@champion", tmp_path / "x.pt", "onnx", tracking=uri)
    with pytest.raises(ValueError, match="runs:/abc: expected models:/"):
        pull("runs:/abc", tmp_path / "x.pt", tracking=uri)
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------
# serving


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s: {log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_clicks_on_one_image_with_one_encoder_run(champion, tmp_path):
    root, uri, name = champion
    image = make_image_png(tmp_path / "img.png")
    port = free_port()
    # as in an activated environment: mlflow execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 180, log)
        url = f"http://127.0.0.1:{port}/invocations"
        image_b64 = png_b64(image)
        first_req, second_req = click_requests(image_b64)[:2]
        status, first = post(url, {"inputs": [first_req]})
        assert status == 200, first
        status, second = post(url, {"inputs": [second_req]})
        assert status == 200, second
        first, second = first["predictions"][0], second["predictions"][0]
        assert (first["embedding_cached"], second["embedding_cached"]) == (False, True)  # the encoder ran once
        expected = reference_predictions(root / "models" / "sum.pt", image, [first_req, second_req])
        assert_same([first, second], expected)
        # a bad request is a 400 naming the field, and the server stays up
        status, err = post(url, {"inputs": [{**first_req, "task": "animal"}]})
        assert status == 400 and "request[0].task" in err["message"]
        status, again = post(url, {"inputs": [first_req]})
        assert status == 200 and again["predictions"][0]["embedding_cached"] is True
    finally:
        stop_group(proc)


# ---------------------------------------------------------------------------------------------
# a team server: mlflow server proxying artifacts to S3


def test_register_and_load_through_an_mlflow_server_with_artifacts_on_s3(s3_bucket, tmp_path, monkeypatch):
    client_s3, bucket = s3_bucket
    port = free_port()
    server_env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL_S3"],
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.pop("MLFLOW_RUN_ID", None)
    server_env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts", "--artifacts-destination",
             f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=server_env, cwd=tmp_path, start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 180, log)
        uri = f"http://127.0.0.1:{port}"
        # the client holds no S3 credentials: artifacts go through the server
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        root = tmp_path / "work"
        root.mkdir()
        shutil.copy(REPO / "uv.lock", root / "uv.lock")
        tiny_checkpoint(root / "models" / "sum.pt", seed=1)
        monkeypatch.chdir(root)
        cfg = registry_cfg(root, uri, "sum-tiny-team")
        first = register_with(cfg, root, {"salient": 0.7, "entity": 0.6, "part": 0.6})
        assert first["promoted"]

        image = make_image_png(tmp_path / "img.png")
        requests = click_requests(str(tmp_path / "img.png"))
        got = predict_in_fresh_process("models:/sum-tiny-team@champion", uri, requests, tmp_path)
        assert_same(got, reference_predictions(root / "models" / "sum.pt", image, requests))
        keys = [o["Key"] for o in client_s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("artifacts/sum.pt") for k in keys), keys
    finally:
        stop_group(proc)
