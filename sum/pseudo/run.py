"""The ``pseudolabel`` stage: automatic masks over the unlabeled pool, sharded, on Dask (spec §3.3).

`pseudolabel` splits each unlabeled dataset into shards of ``shard_size`` images and hands the
shards that are not already on disk to a Dask cluster: a `distributed.LocalCluster` of
``n_workers`` processes by default, or the scheduler at ``scheduler_address``. A task
(`run_shard`) loads the model once per worker process (`_worker_model` caches it), reads each
image's embedding from the ``embed`` stage's cache (`sum.model.embeddings.EmbeddingCache`, so no
image is encoded again), runs `sum.pseudo.amg.MaskGenerator` with task prompt 0 (plain SAM,
§3.3) and writes its shard atomically (`sum.pseudo.store.write_shard`).

Resuming: a shard whose json exists with the same ``config_hash`` and ``inputs_hash`` is kept.
``config_hash`` covers the generator's parameters and source, a hash of every model weight, the
embedding dtype and the shard format; ``inputs_hash`` the ids and content hashes of the shard's
images (from the embedding index), so new images under old ids or a changed generator are
recomputed; the §3.5 read-time filters are not in it (they act when reading,
`sum.pseudo.store.PseudoLabelDataset`). Each shard's output depends only on its images, the model
and the parameters, and the archives have fixed timestamps, so a run killed and re-run writes the
same bytes as one clean run (at equal torch threads per task, `task_threads`: float reductions
depend on the thread count). With a remote scheduler the workers must see the same paths and the same code.
LocalCluster workers are spawned processes: a script that calls `pseudolabel` needs the usual
``if __name__ == "__main__":`` guard (the ``sum`` CLI has it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

log = logging.getLogger(__name__)

from sum.config import PseudoConfig  # noqa: E402,F401  (re-exported for callers)

# MaskGenerator arguments that are not settings of the stage
_NOT_AMG = {"self", "model", "point_grids", "output_mode", "task_prompt"}
_MODELS: Dict[str, Tuple[Any, str]] = {}  # model config json -> (model, weights hash), per process


def amg_params(pcfg) -> Dict[str, Any]:
    """The `MaskGenerator` keyword arguments: every one ``pcfg`` sets, the generator's own default
    for the rest (so that a changed default in `sum.pseudo.amg` also changes `config_hash`)."""
    from sum.pseudo.amg import MaskGenerator

    params = {}
    for name, p in inspect.signature(MaskGenerator.__init__).parameters.items():
        if name in _NOT_AMG or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(pcfg, name, p.default)
        params[name] = value
    return params


def weights_hash(model) -> str:
    """sha256 over every tensor of the model's state dict (names, shapes, dtypes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def code_hash() -> str:
    """sha256 of the mask generator's source (`sum.pseudo.amg`): a changed generator is a changed
    stage, as DVC sees it, so its shards are not reused."""
    import sum.pseudo.amg as amg

    return hashlib.sha256(Path(amg.__file__).read_bytes()).hexdigest()


def config_hash(params: Dict[str, Any], model_hash: str, embed_dtype: str) -> str:
    """What every mask of a dataset depends on, besides its images: generator parameters and
    code, model weights, the stored embedding dtype and the shard format."""
    from sum.pseudo.store import SHARD_FORMAT

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


def _worker_model(model_cfg: Dict[str, Any], s3, threads: int):
    """The model of ``model_cfg``, loaded once per process, its `weights_hash`, and whether this
    call loaded it.

    The RNG is seeded before building, so a model without a checkpoint (tests) is the same in
    every process.
    """
    import torch

    torch.set_num_threads(max(1, int(threads)))
    key = json.dumps(model_cfg, sort_keys=True)
    loaded = key not in _MODELS
    if loaded:
        from sum.config import ModelConfig
        from sum.model.checkpoint import load_model

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
    import torch

    from sum.data.formats import read_image
    from sum.model.embeddings import EmbeddingCache
    from sum.pseudo.amg import MaskGenerator
    from sum.pseudo.store import ShardImage, shard_paths, write_shard

    t0 = time.perf_counter()
    model, model_hash, loaded = _worker_model(job["model_cfg"], job["s3"], job["threads"])
    json_path, _ = shard_paths(job["out_dir"], job["dataset"], job["shard"])
    if model_hash != job["model_hash"]:
        raise RuntimeError(
            f"{json_path}: the worker's model weights differ from the driver's "
            f"(hash {model_hash[:12]}... vs {job['model_hash'][:12]}...)"
        )
    generator = MaskGenerator(model, output_mode="coco_rle", task_prompt=0, **job["amg"])
    cache = EmbeddingCache(job["embed_dir"], fingerprint=job["fingerprint"])
    images, n_masks = [], 0
    with torch.inference_mode():
        for img in job["images"]:
            size = (img["height"], img["width"])
            emb = cache.load(job["dataset"], img["image_id"], original_size=size)
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


def _plan(cfg, name: str, fingerprint: str) -> Tuple[List[List[Dict[str, Any]]], str]:
    """The shards of one dataset, ``shard_size`` images (id, file name, size, position, from the
    dataset and the embedding index) each, and the dtype the embeddings are stored in."""
    from sum.data.dataset import build_dataset
    from sum.model.embeddings import INDEX_NAME, EmbeddingCache

    dcfg = cfg.data.datasets[name]
    ds = build_dataset(dcfg, name)
    cache = EmbeddingCache(cfg.embed.out_dir)
    index = cache.index(name)
    index_path = Path(cfg.embed.out_dir) / name / INDEX_NAME
    if index.get("fingerprint") != fingerprint:
        raise ValueError(f"{index_path}: embeddings made by another image encoder than model {cfg.model.name!r} (run `sum embed`)")
    images = []
    for i, image_id in enumerate(ds.image_ids):
        entry = index["images"].get(str(image_id))
        if entry is None:
            raise ValueError(f"{index_path}: no embedding of image {image_id!r} of dataset {name!r} (run `sum embed`)")
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
    from sum.pseudo.store import read_shard_json, shard_paths

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


def _where(pcfg) -> str:
    """Where the shards run, for logs and metrics."""
    if pcfg.scheduler_address:
        return pcfg.scheduler_address
    if int(pcfg.n_workers) == 0:
        return "in-process"
    return f"local:{pcfg.n_workers}x{pcfg.threads_per_worker}"


def _log_shard(res: Dict[str, Any]) -> None:
    log.info("%s shard %d: %d images, %d masks, %.1f s", res["dataset"], res["shard"], res["images"], res["masks"], res["seconds"])


def task_threads(pcfg) -> int:
    """torch intra-op threads of one shard task: ``pseudo.torch_threads``, or ``threads_per_worker``
    when 0. Dask's ``threads_per_worker`` is how many tasks a worker runs *at once*, so one worker
    with 1 task slot and 2 torch threads is not the same as one worker with 2 slots of 1 thread
    (the second runs two shards side by side)."""
    return max(1, int(pcfg.torch_threads or pcfg.threads_per_worker))


def _client(pcfg):
    """A Dask client: to ``scheduler_address``, or to a new LocalCluster (returned for closing)."""
    from distributed import Client, LocalCluster

    if pcfg.scheduler_address:
        try:
            return Client(pcfg.scheduler_address, timeout=pcfg.connect_timeout_s), None
        except (OSError, TimeoutError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(f"pseudo.scheduler_address={pcfg.scheduler_address!r}: Dask scheduler unreachable ({first})") from None
    # Dask's nanny starts workers with its pre-spawn-environ: OMP/MKL/OPENBLAS_NUM_THREADS=1, which
    # pins torch's matmuls to one thread whatever torch.set_num_threads says, and
    # MALLOC_TRIM_THRESHOLD_=65536, which switches off glibc's adaptive mmap threshold so that every
    # large tensor is mmapped, page-faulted and unmapped again (40% of the CPU time went to the
    # kernel). Local workers get the task's thread count and glibc's defaults instead (measured on
    # the embedded pool: 3.9 s/image under Dask's environment, 2.2 s with this). A remote cluster's
    # workers are configured where they are started.
    import dask

    threads = str(task_threads(pcfg))
    environ = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=int(pcfg.n_workers),
            threads_per_worker=int(pcfg.threads_per_worker),
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # no dashboard; its http server on a free port
            silence_logs=logging.WARNING,
        )
    return Client(cluster), cluster


def _run_jobs(pcfg, jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Run the shard jobs on Dask (or in this process with ``n_workers = 0``, with the model the
    driver loaded); raise on the first failure after cancelling the rest."""
    from tqdm.auto import tqdm

    results: List[Dict[str, Any]] = []
    bar = tqdm(total=sum(len(j["images"]) for j in jobs), desc="pseudolabel", unit="img", disable=None)
    if not jobs:
        bar.close()
        return results
    if not pcfg.scheduler_address and int(pcfg.n_workers) == 0:
        try:
            for job in jobs:
                results.append(run_shard(job))
                bar.update(results[-1]["images"])
                _log_shard(results[-1])
        finally:
            bar.close()
        return results

    from distributed import as_completed

    client, cluster = _client(pcfg)
    try:
        log.info("pseudolabel: %d shards on Dask %s (%s)", len(jobs), client.scheduler.address, _where(pcfg))
        futures = [
            client.submit(run_shard, job, key=f"pseudolabel-{job['dataset']}-{job['shard']:05d}-{job['config_hash'][:12]}")
            for job in jobs
        ]
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as e:
                client.cancel(futures)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RuntimeError(f"pseudolabel: shard task {fut.key} failed: {type(e).__name__}: {first}") from e
            results.append(res)
            bar.update(res["images"])
            _log_shard(res)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return results


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
    """
    import torch

    from sum.tracking import stage_run

    threads = torch.get_num_threads()
    with stage_run(cfg.tracking, "pseudolabel", params={"pseudo": cfg.pseudo}) as tracker:
        try:
            metrics = _pseudolabel(cfg)
        finally:
            torch.set_num_threads(threads)  # in-process runs and the driver's model set their own
        tracker.log_json_metrics(cfg.pseudo.metrics)
    return metrics


def _pseudolabel(cfg) -> Dict[str, Any]:
    from sum.io import S3Options, atomic_write_text
    from sum.model.checkpoint import config_to_dict
    from sum.model.predictor import encoder_fingerprint

    t0 = time.perf_counter()
    pcfg = cfg.pseudo
    names = list(pcfg.datasets) or [n for n, d in cfg.data.datasets.items() if d.role == "unlabeled"]
    if not names:
        raise ValueError("pseudo.datasets: no dataset with role unlabeled in data.datasets")
    unknown = [n for n in names if n not in cfg.data.datasets]
    if unknown:
        raise ValueError(f"pseudo.datasets: unknown dataset(s) {unknown}; known: {sorted(cfg.data.datasets)}")
    if int(pcfg.crop_n_layers) != 0:
        log.warning(
            "pseudo.crop_n_layers=%d: the §3.5 filters take the crop box as the image size, true only for 0 (spec §3.3)",
            pcfg.crop_n_layers,
        )

    s3 = S3Options.from_config(cfg.storage.s3)
    model_cfg = config_to_dict(cfg.model)
    threads = task_threads(pcfg)
    model, model_hash, _ = _worker_model(model_cfg, s3, threads)
    fingerprint = encoder_fingerprint(model)
    params = amg_params(pcfg)

    jobs, plan = [], {}
    for name in names:
        shards, embed_dtype = _plan(cfg, name, fingerprint)
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

    results = _run_jobs(pcfg, jobs)
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
    from sum.pseudo.store import keep_by_ratio, list_shards, read_shard_json

    pcfg = cfg.pseudo
    out: Dict[str, Any] = {
        "model": cfg.model.name,
        "points_per_side": pcfg.points_per_side,
        "workers": _where(pcfg),
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

