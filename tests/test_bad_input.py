"""Bad input is refused, a stopped stage says so, and no secret is logged or written (issue 20).

`CASES` is the bad-input matrix: one row per bad input, each run as ``sumseg <argv>``
(`sum.cli.main`, in this process) inside a fresh copy of a tiny project (`base`: one 3-image
world set read as a labeled, an unlabeled and a benchmark dataset, the tiny model and its
embeddings). Every row must give its exit code (2 for bad input; 130 / 143 when SIGINT / SIGTERM
stops the stage), exactly one line on stderr holding every string of ``names`` (the file, key or
field), no traceback, none of the paths of ``absent`` (the stage's outputs under their final
names) and no temporary file left anywhere in the project.

To add a row, append a `Case`: ``setup`` breaks the project before the run (`set_params` edits
``params.yaml``; any function of the project folder will do: truncate a file, remove an index),
``fault`` sends a signal from inside the stage (`Fault`: after the n-th call of a function the
stage calls). Keep rows cheap: the tiny model, the 3 images.

`test_a_signal_stops_a_real_stage` sends real signals to ``sumseg`` subprocesses once they have
started work (a terminal's Ctrl-C reaches the whole process group). `test_no_secret_in_any_log_param_or_file`
runs ``evaluate`` and ``finetune`` with fake credentials in ``storage.s3``, a presigned checkpoint URL
and a password-bearing source URL, and scans the MLflow store, every file the stages wrote and the log.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from omegaconf import OmegaConf

import sum.config as sc
from sum.cli import main
from sum.data.skipped import write_skip_list
from sum.data.synthetic import generate_set
from sum.model.embed import run_embed

from conftest import model_config

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "" if not torch.cuda.is_available() else "this machine has CUDA"


# ---- the tiny project ------------------------------------------------------------------------


def project_config(n_pool_images: int = 0) -> sc.Config:
    """The tiny project's config, paths relative to the project folder. With ``n_pool_images``
    the unlabeled pool is ``data/pool`` (that many images) instead of the world set."""
    cfg = sc.Config(model=dataclasses.replace(model_config("tiny"), device="cpu", fast_path="off"))
    world = {"images": "data/world/images", "annotations": "data/world/annotations.json"}
    pool = {"images": "data/pool/images", "annotations": "data/pool/annotations.json"} if n_pool_images else world
    cfg.data.datasets = {
        "train": sc.DatasetConfig(format="coco", task="salient", role="labeled", **world),
        "pool": sc.DatasetConfig(format="coco", task="unspecified", role="unlabeled", **pool),
        "bench": sc.DatasetConfig(format="coco", task="salient", role="benchmark", **world),
    }
    cfg.pseudo = dataclasses.replace(cfg.pseudo, points_per_side=4, n_workers=0, shard_size=1, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0)
    method = OmegaConf.load(REPO / "params" / "method" / "hq_only.yaml")
    cfg.method = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(sc.MethodConfig), method))
    cfg.train = dataclasses.replace(cfg.train, iterations=4, batch_size=1, max_masks=2, loss_size=64, precision="fp32")
    cfg.eval = dataclasses.replace(cfg.eval, models={"foundation": ""}, protocols=["point"], rounds=2, max_images=1,
                                   max_masks_per_image=1, n_panels=1, bootstrap=0, threads=1)
    cfg.tracking = sc.TrackingConfig(enabled=False, system_metrics=False)
    return cfg


def write_params(root: Path, cfg: sc.Config) -> None:
    (root / "params.yaml").write_text(sc.to_yaml(cfg))


def set_params(**dotted: Any) -> Callable[[Path], None]:
    """A setup that edits the project's ``params.yaml``: ``set_params(**{"train.iterations": -1})``."""

    def setup(root: Path) -> None:
        raw = OmegaConf.load(root / "params.yaml")
        for key, value in dotted.items():
            OmegaConf.update(raw, key, value, force_add=True)
        OmegaConf.save(raw, root / "params.yaml")

    return setup


def chain(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    """Setups run one after the other."""

    def setup(root: Path) -> None:
        for step in setups:
            step(root)

    return setup


def write_skip_list_of(n_images: Optional[int]) -> Callable[[Path], None]:
    """A setup writing a skip list with no problems whose datasets have ``n_images`` images
    (None: a list of no dataset), as validate would write it for another version of the data."""

    def setup(root: Path) -> None:
        entries = {} if n_images is None else {n: {"source": "", "n_images": n_images, "problems": []}
                                               for n in ("train", "pool", "bench")}
        write_skip_list(root / "data/skip_list.json", entries)

    return setup


def empty_first_mask(root: Path) -> None:
    """A setup emptying the world set's first annotation (an all-zero RLE of its image's size)."""
    path = root / "data/world/annotations.json"
    doc = json.loads(path.read_text())
    ann = doc["annotations"][0]
    image = next(im for im in doc["images"] if im["id"] == ann["image_id"])
    ann["segmentation"] = {"size": [image["height"], image["width"]], "counts": [image["height"] * image["width"]]}
    path.write_text(json.dumps(doc))


def stale_report(root: Path) -> None:
    """A setup leaving ``metrics/validate.json`` of an earlier run (0 problems)."""
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/validate.json").write_text('{"problems": 0}\n')


def report_counts_problems(root: Path) -> None:
    """The check after a failed validate: its report is this run's (it counts the problems that
    stopped it; validate writes it before it fails), not `stale_report`'s."""
    doc = json.loads((root / "metrics/validate.json").read_text())
    assert doc.get("n_problems", 0) >= 1, doc


def corrupt_first_image(root: Path) -> None:
    """A setup truncating the world set's first image (a PNG that does not decode)."""
    path = sorted((root / "data/world/images").iterdir())[0]
    path.write_bytes(path.read_bytes()[:40])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny project: the world set, ``params.yaml`` and the embeddings of its datasets."""
    root = tmp_path_factory.mktemp("bad_input")
    generate_set(root / "data", "world", sc.WorldSetConfig(task="salient", role="labeled", n_images=3, seed=2),
                 image_size=64, workers=1)
    cfg = project_config()
    write_params(root, cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        torch.set_num_threads(1)
        run_embed(cfg)
    return root


@pytest.fixture()
def project(base, tmp_path, monkeypatch):
    """A fresh copy of `base`, the working directory of the test."""
    root = tmp_path / "project"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    return root


# ---- the matrix ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Send ``signum`` to this process right after the ``n``-th call of ``target``
    ("module:name", as the stage's module names it): a stop from inside the stage's work."""

    target: str
    signum: int
    n: int = 1

    def install(self, monkeypatch) -> None:
        module, name = self.target.split(":")
        real = getattr(importlib.import_module(module), name)
        calls = []

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == self.n:
                os.kill(os.getpid(), self.signum)
            return out

        monkeypatch.setattr(f"{module}.{name}", wrapped)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Tuple[str, ...]  # sumseg's arguments
    code: int  # expected exit code
    names: Tuple[str, ...]  # strings the one stderr line holds: the file, key or field
    setup: Optional[Callable[[Path], None]] = None  # breaks the project before the run
    absent: Tuple[str, ...] = ()  # paths (relative to the project) that must not exist after the run
    fault: Optional[Fault] = None  # a signal sent from inside the stage
    hidden: Tuple[str, ...] = ()  # strings stderr must not hold (a secret given with the bad input)
    skip: str = ""  # a reason to skip the row on this machine
    after: Optional[Callable[[Path], None]] = None  # a further check of the project after the run


NEW_EMBED = {"embed.out_dir": "data/embeddings_new"}  # embed rows write here (base holds data/embeddings)
FINETUNE_OUT = ("models/hq_only.pt", "metrics/finetune/hq_only.json")

CASES = [
    # item 4: values the schema's types accept but the pipeline cannot use
    Case("role misspelt", ("validate",), 2, ("params.yaml", "data.datasets.pool.role", "labelled"),
         set_params(**{"data.datasets.pool.role": "labelled"}), ("metrics/validate.json",)),
    Case("role misspelt by override", ("validate", "data.datasets.hq_train.role=labelled"), 2,
         ("data.datasets.hq_train.role", "labelled"), absent=("metrics/validate.json",)),
    Case("task misspelt", ("embed",), 2, ("params.yaml", "data.datasets.train.task", "salent"),
         set_params(**NEW_EMBED, **{"data.datasets.train.task": "salent"}), ("data/embeddings_new",)),
    Case("world set role misspelt", ("world",), 2, ("data.world.sets.extra.role", "trainng"),
         set_params(**{"data.world.out_dir": "data/world_new",
                       "data.world.sets": {"extra": {"role": "trainng", "task": "salient", "n_images": 1}}}),
         ("data/world_new",)),
    Case("refine on a benchmark set", ("refine",), 2, ("refine.datasets", "'bench'", "role 'benchmark'"),
         set_params(**{"refine.datasets": ["train", "bench"]}), ("models/refiner.ckpt",)),
    Case("refine on an unknown set", ("refine",), 2, ("refine.datasets", "'nope'"),
         set_params(**{"refine.datasets": ["nope"]}), ("models/refiner.ckpt",)),
    Case("train.iterations negative", ("finetune",), 2, ("params.yaml", "train.iterations", "-1"),
         set_params(**{"train.iterations": -1}), (*FINETUNE_OUT, "runs/finetune")),
    Case("train.iterations zero", ("finetune",), 2, ("train.iterations", "0"),
         set_params(**{"train.iterations": 0}), (*FINETUNE_OUT, "runs/finetune")),
    Case("--params missing", ("validate", "--params", "nope.yaml"), 2, ("nope.yaml",),
         absent=("metrics/validate.json",)),
    Case("--params with overrides", ("validate", "--params", "params.yaml", "train.lr=1"), 2,
         ("--params params.yaml", "train.lr=1"), absent=("metrics/validate.json",)),
    Case("model.device=cuda without CUDA", ("embed",), 2, ("model.device", "cuda"),
         set_params(**NEW_EMBED, **{"model.device": "cuda"}), ("data/embeddings_new",), skip=NO_CUDA),
    Case("unknown key: Hydra's whole hint", ("validate", "foo.bar=1"), 2,
         ("Could not override 'foo.bar'", "To append to your config use +foo.bar=1"), absent=("metrics/validate.json",)),
    Case("unknown key added with +", ("validate", "+foo.bar=1"), 2, ("'foo'", "not in 'Config'"),
         absent=("metrics/validate.json",)),
    Case("bad value beside a secret override", ("validate", "storage.s3.secret_access_key=FakeSecret0H20A",
                                                "train.iterations=-1"), 2,
         ("train.iterations", "storage.s3.secret_access_key=***"), absent=("metrics/validate.json",),
         hidden=("FakeSecret0H20A",)),
    # items 2, 3: skip mode reads validate's one skip list; demo names an empty mask's file
    Case("skip mode without a skip list", ("embed",), 2, ("data/skip_list.json", "no skip list"),
         set_params(**NEW_EMBED, **{"data.validate.mode": "skip"}), ("data/embeddings_new",)),
    Case("skip list of another version of the data", ("embed",), 2, ("data/skip_list.json", "'train'", "re-run"),
         chain(set_params(**NEW_EMBED, **{"data.validate.mode": "skip"}), write_skip_list_of(n_images=2)),
         ("data/embeddings_new",)),
    Case("skip list without the dataset", ("embed",), 2, ("data/skip_list.json", "no entry for dataset 'train'"),
         chain(set_params(**NEW_EMBED, **{"data.validate.mode": "skip"}), write_skip_list_of(n_images=None)),
         ("data/embeddings_new",)),
    Case("validate on a corrupt image, a report of an earlier run present", ("validate",), 2,
         ("data/world/images/", "cannot decode image"), chain(stale_report, write_skip_list_of(n_images=3), corrupt_first_image),
         ("data/skip_list.json",), after=report_counts_problems),
    Case("missing checkpoint", ("embed",), 2, ("model.checkpoint", "models/nope.pt"),
         set_params(**NEW_EMBED, **{"model.checkpoint": "models/nope.pt"}), ("data/embeddings_new",)),
    Case("demo on an empty mask", ("demo",), 2, ("data/world/images/", "annotation", "mask is empty"),
         empty_first_mask, ("metrics/demo.json", "outputs/demo/panel.png")),
    # item 5: a stopped stage says so in one line and exits 128 + the signal
    Case("embed SIGINT", ("embed",), 130, ("stopped by SIGINT", "1 of 3 images of train", "run it again"),
         set_params(**NEW_EMBED), fault=Fault("sum.model.embed:atomic_torch_save", signal.SIGINT)),
    Case("embed SIGTERM", ("embed",), 143, ("stopped by SIGTERM", "2 of 3 images of train"),
         set_params(**NEW_EMBED), fault=Fault("sum.model.embed:atomic_torch_save", signal.SIGTERM, n=2)),
    Case("pseudolabel SIGINT", ("pseudolabel",), 130, ("stopped by SIGINT", "shards are kept"),
         absent=("metrics/pseudolabel.json",), fault=Fault("sum.pseudo.cluster:run_shard", signal.SIGINT)),
    Case("pseudolabel SIGTERM", ("pseudolabel",), 143, ("stopped by SIGTERM", "shards are kept"),
         absent=("metrics/pseudolabel.json",), fault=Fault("sum.pseudo.cluster:run_shard", signal.SIGTERM)),
    Case("finetune SIGINT", ("finetune",), 130, ("stopped by SIGINT", "after step 2", "train_state.pt"),
         absent=FINETUNE_OUT, fault=Fault("sum.train.trainer:reduce_metrics", signal.SIGINT)),
    Case("finetune SIGTERM", ("finetune",), 143, ("stopped by SIGTERM", "after step 2", "train_state.pt"),
         absent=FINETUNE_OUT, fault=Fault("sum.train.trainer:reduce_metrics", signal.SIGTERM)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_leaves_no_output(case, project, monkeypatch, capsys):
    if case.skip:
        pytest.skip(case.skip)
    if case.setup is not None:
        case.setup(project)
    if case.fault is not None:
        case.fault.install(monkeypatch)
    code = main(list(case.argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sumseg {case.argv[0]}: "), lines[0]
    missing = [name for name in case.names if name not in lines[0]]
    assert not missing, f"{lines[0]!r} does not name {missing}"
    assert not [s for s in case.hidden if s in err], err
    written = [p for p in case.absent if (project / p).exists()]
    assert not written, f"written under a final name: {written}"
    temporaries = [str(p.relative_to(project)) for p in project.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not temporaries, temporaries
    if case.after is not None:
        case.after(project)


def test_the_matrix_covers_every_stop_and_both_exit_codes():
    """Bad input exits 2, a stop 128 + its signal; each stage that stops on a signal has a row of each."""
    assert {c.code for c in CASES} == {2, 130, 143}
    for c in CASES:
        assert (c.fault is None) == (c.code == 2), c.id
        if c.fault is not None:
            assert c.code == 128 + c.fault.signum, c.id
    stops = {(c.argv[0], c.fault.signum) for c in CASES if c.fault is not None}
    assert stops == {(s, n) for s in ("embed", "pseudolabel", "finetune") for n in (signal.SIGINT, signal.SIGTERM)}


# ---- real signals to a real stage ------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_pool(base, tmp_path_factory):
    """`base` with a 240-image unlabeled pool (hard links of the world set's images, one COCO
    file) and its embeddings: enough work that a signal arrives while the stage runs."""
    root = tmp_path_factory.mktemp("big_pool") / "project"
    shutil.copytree(base, root)
    world = json.loads((root / "data/world/annotations.json").read_text())
    images = root / "data/pool/images"
    images.mkdir(parents=True)
    doc: Dict[str, list] = {"images": [], "annotations": [], "categories": world.get("categories", [])}
    for i in range(240):
        src = world["images"][i % len(world["images"])]
        os.link(root / "data/world/images" / src["file_name"], images / f"{i:04d}.png")
        doc["images"].append({**src, "id": i + 1, "file_name": f"{i:04d}.png"})
        doc["annotations"] += [{**a, "id": len(doc["annotations"]) + 1, "image_id": i + 1}
                               for a in world["annotations"] if a["image_id"] == src["id"]]
    (root / "data/pool/annotations.json").write_text(json.dumps(doc))
    cfg = project_config(n_pool_images=240)
    cfg.embed.datasets = ["pool"]
    write_params(root, cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_embed(cfg)
    return root


@pytest.mark.parametrize(
    "stage, signum, group, started, setup",
    [
        # Ctrl-C in a terminal: SIGINT to the whole process group
        ("embed", signal.SIGINT, True, "data/embeddings_new/pool/*.pt", set_params(**NEW_EMBED, **{"embed.datasets": ["pool"]})),
        # a scheduler's stop: SIGTERM to the stage's process
        ("pseudolabel", signal.SIGTERM, False, "data/pseudo/pool/*.json", None),
    ],
    ids=["embed SIGINT to the group", "pseudolabel SIGTERM"],
)
def test_a_signal_stops_a_real_stage(big_pool, tmp_path, stage, signum, group, started, setup):
    root = tmp_path / "project"
    shutil.copytree(big_pool, root)
    if setup is not None:
        setup(root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sum", stage], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(root.glob(started)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"{stage} ended before it was signalled: {proc.stderr.read()[-2000:]}"
        (os.killpg if group else os.kill)(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sumseg {stage}: stopped by {name}") and "run it again" in last, last
    assert sum(line.startswith("sumseg ") for line in err.splitlines()) == 1, err[-3000:]


# ---- no secret in any log, MLflow param or tag, or written file ---------------------------------------

# fake credentials, letters and digits only (so that no URL quoting hides one from the scan)
FAKE = {
    "access_key_id": "AKIAFAKEKEYID0H20A",
    "secret_access_key": "FakeSecretAccessKey0H20A",
    "credential": "AKIAFAKECREDENTIAL0H20A",
    "security_token": "FakeSecurityToken0H20A",
    "signature": "fakesignature0h20a0feed",
    "password": "FakeUrlPassword0H20A",
    "query_token": "FakeQueryToken0H20A",
}


def presigned(url: str) -> str:
    """``url`` as S3 presigns it, with the fake credential, session token and signature."""
    return (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={FAKE['credential']}%2F20250101%2Fus-east-1%2Fs3"
            f"%2Faws4_request&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            f"&X-Amz-Security-Token={FAKE['security_token']}&X-Amz-Signature={FAKE['signature']}")


def test_no_secret_in_any_log_param_or_file(project, http_root, tmp_path, monkeypatch, capsys, caplog):
    from mlflow import MlflowClient

    from sum.model.build import build_sum_model

    www, url = http_root
    torch.manual_seed(0)
    torch.save(build_sum_model(model_config("tiny")).state_dict(), www / "tiny.pt")
    cfg = sc.load_params(project / "params.yaml")
    cfg.storage.s3 = sc.S3Config(access_key_id=FAKE["access_key_id"], secret_access_key=FAKE["secret_access_key"])
    cfg.model.checkpoint = presigned(f"{url}/tiny.pt")  # the foundation weights, fetched by both stages
    cfg.eval.models = {"foundation": "", "again": presigned(f"{url}/tiny.pt")}
    cfg.data.acquire.sources = {"mirror": sc.SourceConfig(
        kind="https", uri=f"https://mirror-user:{FAKE['password']}@mirror.example/x.tar?token={FAKE['query_token']}")}
    cfg.tracking = sc.TrackingConfig(enabled=True, uri=f"sqlite:///{project / 'mlflow.db'}", system_metrics=False)
    write_params(project, cfg)
    monkeypatch.setenv("SUM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # the CLI sets it for the pipeline's parent run
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="sum")

    for stage in ("evaluate", "finetune"):
        assert main([stage]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("stage") for r in runs} >= {"evaluate", "finetune"}
    logged = [f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()]
    seen = {"log": caplog.text + out + err, "mlflow params and tags": "\n".join(logged)}
    for path in [*project.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file() and path != project / "params.yaml":  # the input, not something written
            seen[str(path.relative_to(tmp_path))] = path.read_bytes().decode("latin-1")
    leaks = [f"{what} holds {name}" for what, text in seen.items() for name, value in FAKE.items() if value in text]
    assert not leaks, "; ".join(leaks)

    # not vacuous: the secrets were there to leak, and went through as ***
    params = next(r for r in runs if r.data.tags.get("stage") == "evaluate").data.params
    assert params["storage.s3.secret_access_key"] == "***" and "X-Amz-Signature=***" in params["model.checkpoint"]
    assert "mirror-user:***@mirror.example" in params["data.acquire.sources.mirror.uri"]
    assert "X-Amz-Signature=***" in seen[str((project / "outputs/eval/run.json").relative_to(tmp_path))]
    assert len([p for p in seen if p.endswith(".pt")]) >= 2  # the fine-tuned model and the downloaded weights
