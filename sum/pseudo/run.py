"""The ``pseudolabel`` stage: automatic masks over the unlabeled pool, sharded, on Dask (spec §3.3).

`pseudolabel` splits each unlabeled dataset into shards of ``shard_size`` images and hands the
shards that are not already on disk to a Dask cluster: a `distributed.LocalCluster` of
``n_workers`` processes by default, or the scheduler at ``scheduler_address``. A task
(`run_shard`) loads the model once per worker process (`sum.pseudo.worker.worker_model` caches it), reads each
image's embedding from the ``embed`` stage's cache (a required `sum.model.embeddings.EmbeddingSource`:
no image is encoded again), runs `sum.pseudo.amg.MaskGenerator` with task prompt 0 (plain SAM,
§3.3) and writes its shard atomically (`sum.pseudo.store.write_shard`).

Resuming: a shard whose json exists with the same ``config_hash`` and ``inputs_hash`` is kept.
``config_hash`` covers the generator's parameters and source, a hash of every model weight, the
embedding dtype and the shard format; ``inputs_hash`` the ids and content hashes of the shard's
images (from the embedding index), so new images under old ids or a changed generator are
recomputed; the §3.5 read-time filters are not in it (they act when reading,
`sum.pseudo.dataset.PseudoLabelDataset`). Each shard's output depends only on its images, the model
and the parameters, and the archives have fixed timestamps, so a run killed and re-run writes the
same bytes as one clean run (at equal torch threads per task, `task_threads`: float reductions
depend on the thread count). With a remote scheduler the workers must see the same paths and the same code.
LocalCluster workers are spawned processes: a script that calls `pseudolabel` needs the usual
``if __name__ == "__main__":`` guard (the ``sum`` CLI has it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

import sum.pseudo.amg as amg
import sum.pseudo.point_decoder as point_decoder
from sum.data.dataset import select_datasets
from sum.data.skipped import open_dataset
from sum.io import S3Options, atomic_write_text
from sum.model.checkpoint import config_to_dict
from sum.model.embeddings import INDEX_NAME, EmbeddingSource
from sum.model.predictor import encoder_fingerprint
from sum.progress import StopSignals
from sum.pseudo.settings import amg_params
from sum.pseudo.cluster import run_jobs, task_threads, where_run
from sum.pseudo.store import SHARD_FORMAT, keep_by_ratio, list_shards, read_shard_json, shard_paths
from sum.pseudo.worker import worker_model
from sum.tracking import stage_run

log = logging.getLogger(__name__)

def code_hash() -> str:
    """sha256 of the mask generator's source (`sum.pseudo.amg` and its decoder,
    `sum.pseudo.point_decoder`): a changed generator is a changed stage, as DVC sees it, so its
    shards are not reused."""
    h = hashlib.sha256()
    for module in (amg, point_decoder):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def config_hash(params: Dict[str, Any], model_hash: str, embed_dtype: str) -> str:
    """What every mask of a dataset depends on, besides its images: generator parameters and
    code, model weights, the stored embedding dtype and the shard format."""
    doc = {
        "format": SHARD_FORMAT,
        "amg": params,
        "code": code_hash(),
        "model": model_hash,
        "embed_dtype": embed_dtype,
        "task_prompt": 0,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def inputs_hash(images: List[Dict[str, Any]]) -> str:
    """A shard's ``inputs_hash``: the id and content (``image_sha256`` of the embedding index) of
    each of its images, so that a changed image (re-embedded by the ``embed`` stage under the same
    id) invalidates its shard only."""
    text = "".join(f"|{img['image_id']}={img.get('image_sha256', '')}" for img in images)
    return hashlib.sha256(text.encode()).hexdigest()


def _plan(cfg, name: str, embeddings: EmbeddingSource) -> Tuple[List[List[Dict[str, Any]]], str]:
    """The shards of one dataset, ``shard_size`` images (id, file name, size, position, from the
    dataset and the embedding index) each, and the dtype the embeddings are stored in."""
    dcfg = cfg.data.datasets[name]
    ds = open_dataset(cfg.data, name)
    index = embeddings.index(name)
    index_path = Path(cfg.embed.out_dir) / name / INDEX_NAME
    if index.get("fingerprint") != embeddings.fingerprint:
        raise ValueError(f"{index_path}: embeddings made by another image encoder than model {cfg.model.name!r} (run `sumseg embed`)")
    images = []
    for i, image_id in enumerate(ds.image_ids):
        entry = index["images"].get(str(image_id))
        if entry is None:
            raise ValueError(f"{index_path}: no embedding of image {image_id!r} of dataset {name!r} (run `sumseg embed`)")
        file_name = os.path.relpath(ds.image_path(i), dcfg.images)
        h, w = entry["original_size"]
        images.append(
            {
                "image_id": str(image_id),
                "file_name": file_name,
                "height": int(h),
                "width": int(w),
                "position": i,
                "image_sha256": str(entry.get("image_sha256", "")),
            }
        )
    size = int(cfg.pseudo.shard_size)
    if size < 1:
        raise ValueError(f"pseudo.shard_size={size}: expected >= 1")
    return [images[s : s + size] for s in range(0, len(images), size)], str(index.get("dtype", "float16"))


def _shard_is_done(out_dir: str, name: str, shard: int, chash: str, images: List[dict]) -> bool:
    json_path, npz_path = shard_paths(out_dir, name, shard)
    if not (json_path.is_file() and npz_path.is_file()):
        return False
    try:
        doc = read_shard_json(out_dir, name, shard)
    except ValueError:
        return False
    return (
        doc["config_hash"] == chash
        and doc.get("inputs_hash") == inputs_hash(images)
        and [img["image_id"] for img in doc["images"]] == [img["image_id"] for img in images]
    )


def _clean(folder: Path, n_shards: int) -> None:
    """Remove temporaries of a killed run and shards past the last one (json first: it marks a
    complete shard)."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir(), key=lambda p: p.suffix != ".json"):
        stem, _, number = p.stem.partition("-")
        if p.name.endswith(".tmp") or (stem == "shard" and number.isdigit() and int(number) >= n_shards):
            p.unlink()


def pseudolabel(cfg) -> Dict[str, Any]:
    """The ``pseudolabel`` stage (spec §3.3): pseudo labels of every unlabeled dataset into
    ``cfg.pseudo.out_dir``, from the embeddings in ``cfg.embed.out_dir``; writes the metrics JSON
    ``cfg.pseudo.metrics``.

    Returns:
      the metrics: per dataset and in total images, masks, masks/image, masks/image after the
      §3.5 ratio filters, shards computed and reused, and seconds per computed image (wall clock
      of the stage, and worker time).

    Raises:
      ValueError: naming the config key, or the embedding index, when something is missing.
      RuntimeError: one line naming the scheduler address when it is unreachable, or the shard
        whose task failed.
      sum.progress.StageStopped: on SIGINT / SIGTERM, at once; the finished shards are kept.
    """
    threads = torch.get_num_threads()
    with stage_run(cfg.tracking, "pseudolabel", params={"pseudo": cfg.pseudo}) as tracker:
        # a shard can take minutes: a signal stops at once (shards are written atomically)
        try:
            with StopSignals("pseudolabel", "finished shards are kept, run it again to resume", at_once=True):
                metrics = _pseudolabel(cfg)
        finally:
            torch.set_num_threads(threads)  # in-process runs and the driver's model set their own
        tracker.log_json_metrics(cfg.pseudo.metrics)
    return metrics


def _pseudolabel(cfg) -> Dict[str, Any]:
    t0 = time.perf_counter()
    pcfg = cfg.pseudo
    names = list(pcfg.datasets) or [n for n, d in cfg.data.datasets.items() if d.role == "unlabeled"]
    if not names:
        raise ValueError("pseudo.datasets: no dataset with role unlabeled in data.datasets")
    names = select_datasets(cfg.data.datasets, names, "pseudo.datasets")
    if int(pcfg.crop_n_layers) != 0:
        log.warning(
            "pseudo.crop_n_layers=%d: the §3.5 filters take the crop box as the image size, true only for 0 (spec §3.3)",
            pcfg.crop_n_layers,
        )

    s3 = S3Options.from_config(cfg.storage.s3)
    model_cfg = config_to_dict(cfg.model)
    threads = task_threads(pcfg)
    model, model_hash, _ = worker_model(model_cfg, s3, threads)
    fingerprint = encoder_fingerprint(model)
    embeddings = EmbeddingSource(cfg.embed.out_dir, fingerprint=fingerprint, required=True)
    params = amg_params(pcfg)

    jobs, plan = [], {}
    for name in names:
        shards, embed_dtype = _plan(cfg, name, embeddings)
        chash = config_hash(params, model_hash, embed_dtype)
        folder = Path(pcfg.out_dir) / name
        _clean(folder, len(shards))
        todo = [s for s, imgs in enumerate(shards) if not _shard_is_done(pcfg.out_dir, name, s, chash, imgs)]
        plan[name] = {"shards": len(shards), "computed": len(todo), "images": sum(len(s) for s in shards), "config_hash": chash}
        log.info(
            "%s: %d images in %d shards, %d to compute, %d reused",
            name, plan[name]["images"], len(shards), len(todo), len(shards) - len(todo),
        )
        for s in todo:
            jobs.append(
                {
                    "dataset": name,
                    "shard": s,
                    "images": shards[s],
                    "images_dir": str(Path(cfg.data.datasets[name].images).resolve()),
                    "out_dir": str(Path(pcfg.out_dir).resolve()),
                    "embed_dir": str(Path(cfg.embed.out_dir).resolve()),
                    "model_cfg": model_cfg,
                    "s3": s3,
                    "threads": threads,
                    "amg": params,
                    "model_hash": model_hash,
                    "fingerprint": fingerprint,
                    "config_hash": chash,
                    "inputs_hash": inputs_hash(shards[s]),
                }
            )

    results = run_jobs(pcfg, jobs)
    wall = time.perf_counter() - t0
    metrics = _metrics(cfg, plan, results, wall)
    atomic_write_text(pcfg.metrics, json.dumps(metrics, indent=2) + "\n")
    log.info(
        "pseudolabel: %d images, %d masks (%.1f/image), %d computed in %.1f s -> %s",
        metrics["images"], metrics["masks"], metrics["masks_per_image"] or 0, metrics["images_computed"], wall, pcfg.out_dir,
    )
    return metrics


def _metrics(cfg, plan: Dict[str, dict], results: List[dict], wall: float) -> Dict[str, Any]:
    """Counts over every shard on disk (reused ones included) and timings of this run."""
    pcfg = cfg.pseudo
    out: Dict[str, Any] = {
        "model": cfg.model.name,
        "points_per_side": pcfg.points_per_side,
        "workers": where_run(pcfg),
        "datasets": {},
    }
    tot = {"images": 0, "masks": 0, "kept": 0, "computed": 0, "worker_s": 0.0}
    for name, p in plan.items():
        masks = kept = 0
        for shard in list_shards(pcfg.out_dir, name):
            doc = read_shard_json(pcfg.out_dir, name, shard)
            img_size = int(doc.get("img_size", 1024))
            for img in doc["images"]:
                masks += len(img["annotations"])
                kept += sum(
                    keep_by_ratio(a["area"], a["crop_box"][2], a["crop_box"][3], pcfg.min_ratio, pcfg.max_ratio, img_size)
                    for a in img["annotations"]
                )
        mine = [r for r in results if r["dataset"] == name]
        computed = sum(r["images"] for r in mine)
        worker_s = sum(r["seconds"] for r in mine)
        n = p["images"]
        out["datasets"][name] = {
            "images": n,
            "masks": masks,
            "masks_per_image": round(masks / n, 3) if n else None,
            "masks_kept_per_image": round(kept / n, 3) if n else None,
            "shards": p["shards"],
            "shards_computed": p["computed"],
            "shards_reused": p["shards"] - p["computed"],
            "worker_seconds_per_image": round(worker_s / computed, 3) if computed else None,
            "config_hash": p["config_hash"],
        }
        for k, v in (("images", n), ("masks", masks), ("kept", kept), ("computed", computed), ("worker_s", worker_s)):
            tot[k] += v
    out.update(
        images=tot["images"],
        masks=tot["masks"],
        masks_per_image=round(tot["masks"] / tot["images"], 3) if tot["images"] else None,
        masks_kept_per_image=round(tot["kept"] / tot["images"], 3) if tot["images"] else None,
        images_computed=tot["computed"],
        model_loads=sum(bool(r.get("model_loaded")) for r in results),
        seconds=round(wall, 2),
        seconds_per_image=round(wall / tot["computed"], 3) if tot["computed"] else None,
        worker_seconds_per_image=round(tot["worker_s"] / tot["computed"], 3) if tot["computed"] else None,
    )
    return out

