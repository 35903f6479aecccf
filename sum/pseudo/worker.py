"""One shard task of the ``pseudolabel`` stage, as a Dask worker runs it: the model loaded once per
worker process (and the hash of its weights, checked against the driver's), the masks of the
shard's images generated from their cached embeddings, and the shard written.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from sum.config import ModelConfig
from sum.data.formats import read_image
from sum.model.checkpoint import load_model
from sum.model.embeddings import EmbeddingSource
from sum.pseudo.amg import MaskGenerator
from sum.pseudo.store import ShardImage, shard_paths, write_shard

_MODELS: Dict[str, Tuple[Any, str]] = {}  # model config json -> (model, weights hash), per process


def weights_hash(model) -> str:
    """sha256 over every tensor of the model's state dict (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker_model(model_cfg: Dict[str, Any], s3, threads: int):
    """The model of ``model_cfg``, loaded once per process, its `weights_hash`, and whether this
    call loaded it.

    The RNG is seeded before building, so a model without a checkpoint (tests) is the same in
    every process.
    """
    torch.set_num_threads(max(1, int(threads)))
    key = json.dumps(model_cfg, sort_keys=True)
    loaded = key not in _MODELS
    if loaded:
        torch.manual_seed(0)
        model = load_model(ModelConfig(**model_cfg), s3=s3)
        _MODELS.clear()  # one model per process
        _MODELS[key] = (model, weights_hash(model))
    return (*_MODELS[key], loaded)


def run_shard(job: Dict[str, Any]) -> Dict[str, Any]:
    """One Dask task: generate the masks of one shard from cached embeddings and write it.

    Arguments:
      job: plain data built by `pseudolabel` (dataset, shard, images, paths, model config,
        generator parameters, expected model hash and config hash).

    Returns:
      {"dataset", "shard", "images", "masks", "seconds", "model_loaded"} (whether this task had to
      load the model: once per worker process).

    Raises:
      RuntimeError: naming the shard when this process's model differs from the driver's.
    """
    t0 = time.perf_counter()
    model, model_hash, loaded = worker_model(job["model_cfg"], job["s3"], job["threads"])
    json_path, _ = shard_paths(job["out_dir"], job["dataset"], job["shard"])
    if model_hash != job["model_hash"]:
        raise RuntimeError(
            f"{json_path}: the worker's model weights differ from the driver's "
            f"(hash {model_hash[:12]}... vs {job['model_hash'][:12]}...)"
        )
    generator = MaskGenerator(model, output_mode="coco_rle", task_prompt=0, **job["amg"])
    embeddings = EmbeddingSource(job["embed_dir"], fingerprint=job["fingerprint"], required=True)
    images, n_masks = [], 0
    with torch.inference_mode():
        for img in job["images"]:
            size = (img["height"], img["width"])
            emb = embeddings.load(job["dataset"], img["image_id"], original_size=size)
            if generator.crop_n_layers > 0:
                image = read_image(Path(job["images_dir"]) / img["file_name"])
                records = generator.generate(image, embedding=emb.features)
            else:
                records = generator.generate_from_embedding(emb.features, emb.original_size, emb.input_size)
            n_masks += len(records)
            images.append(ShardImage(img["image_id"], img["file_name"], img["height"], img["width"], img["position"], records))
    he, we = model.prompt_encoder.image_embedding_size
    write_shard(
        job["out_dir"], job["dataset"], job["shard"], job["config_hash"], images,
        logits_hw=(4 * he, 4 * we), img_size=int(model.image_encoder.img_size), inputs_hash=job.get("inputs_hash"),
    )
    return {
        "dataset": job["dataset"],
        "shard": job["shard"],
        "images": len(images),
        "masks": n_masks,
        "seconds": time.perf_counter() - t0,
        "model_loaded": loaded,
    }
