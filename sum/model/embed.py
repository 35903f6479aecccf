"""The ``embed`` stage: encode every image of the configured datasets once into the cache that
`sum.model.embeddings` reads.

A killed run resumes: an image whose file already holds an embedding of the same encoder, dtype
and image bytes is skipped, and an indexed file is trusted only while its size and sha256 match
the index. SIGINT / SIGTERM finish the image in flight, write the index and stop (`StopSignals`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from sum.data.dataset import select_datasets
from sum.data.formats import read_image
from sum.data.skipped import open_dataset
from sum.io import S3Options, atomic_torch_save, sha256_file
from sum.model.checkpoint import load_model
from sum.model.embeddings import DTYPES, INDEX_NAME, embedding_file, read_index, write_index
from sum.model.predictor import EMBEDDING_FORMAT, SumPredictor, read_embedding_record
from sum.progress import StopSignals, progress_bar

log = logging.getLogger(__name__)

INDEX_EVERY_S = 30.0  # rewrite the index at least this often, so a killed run resumes cheaply


def _is_current(path: Path, fingerprint: str, dtype: torch.dtype, image_sha256: str) -> bool:
    """Whether ``path`` holds a readable embedding of this encoder and dtype, of this image file."""
    if not path.is_file():
        return False
    try:
        record = read_embedding_record(path)
    except ValueError:
        return False
    return (
        record.get("fingerprint") == fingerprint
        and record["features"].dtype == dtype
        and record.get("image_sha256") == image_sha256
    )


def embed_datasets(
    model,
    datasets: Mapping[str, object],
    out_dir: str | os.PathLike,
    dtype: str = "float16",
    stop: Optional[StopSignals] = None,
) -> Dict[str, dict]:
    """Encode every image of every dataset once and store its embedding (`sum.model.embeddings` describes the files).

    Images already embedded by the same encoder (fingerprint), in the same dtype, from the same
    image file (sha256 of its bytes) are skipped, so a killed run resumes where it stopped; an
    indexed embedding is trusted only when its file still has the size and sha256 the index
    lists, else it is encoded again (a truncated or replaced file). Files of images no longer in a
    dataset, and temporaries of a killed run, are removed.

    Arguments:
      model (Sam): the model (weights loaded, fast path as configured); only its encoder runs.
      datasets: name -> `sum.data.sample.SegDataset` (``image_ids``, ``image_path(i)``).
      out_dir: the cache folder.
      dtype (str): "float16" (default) or "float32", the storage dtype of the features.
      stop: the stage's `StopSignals`: after a signal, the image in flight and the index are written.

    Returns:
      name -> {"images", "encoded", "skipped", "seconds", "seconds_per_encoded_image"}.

    Raises:
      ValueError: naming ``dtype`` when unknown, or a dataset with duplicate image ids.
      FileNotFoundError: naming a missing image file.
      sum.data.formats.ImageReadError: naming the image file that does not decode.
      sum.progress.StageStopped: after SIGINT / SIGTERM (``stop``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"embed.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    predictor = SumPredictor(model)
    fingerprint = predictor.fingerprint()
    img_size = int(model.image_encoder.img_size)
    summary: Dict[str, dict] = {}
    for name, ds in datasets.items():
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        index_path = folder / INDEX_NAME
        ids = list(ds.image_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"dataset {name!r} ({getattr(ds, 'source', '')}): duplicate image ids, cannot key embeddings")
        old = read_index(index_path) or {}
        old_images = old.get("images", {}) if old.get("fingerprint") == fingerprint and old.get("dtype") == dtype else {}
        _remove_stale(folder, {embedding_file(out_dir, name, i).name for i in ids})

        images: dict = {}
        encoded, t0, last_index = 0, time.perf_counter(), time.perf_counter()
        bar = progress_bar(len(ids), f"embed {name}", unit="img")
        for i, image_id in enumerate(ids):
            path = embedding_file(out_dir, name, image_id)
            image_path = ds.image_path(i)
            if not Path(image_path).is_file():
                raise FileNotFoundError(f"{image_path}: image {image_id!r} of dataset {name!r} not found")
            digest = sha256_file(image_path)
            images[image_id] = _reusable(path, old_images.get(image_id), digest, fingerprint, torch_dtype, index_path)
            if images[image_id] is None:
                images[image_id] = _encode(predictor, image_path, path, torch_dtype, img_size, fingerprint, digest)
                encoded += 1
            bar.update(1)
            if stop is not None and stop.signum is not None:
                write_index(index_path, name, fingerprint, img_size, dtype, images)
                stop.stop(f"{len(images)} of {len(ids)} images of {name}")
            if time.perf_counter() - last_index > INDEX_EVERY_S:
                write_index(index_path, name, fingerprint, img_size, dtype, {**images})
                last_index = time.perf_counter()
        bar.close()
        write_index(index_path, name, fingerprint, img_size, dtype, images)
        seconds = time.perf_counter() - t0
        summary[name] = {
            "images": len(ids),
            "encoded": encoded,
            "skipped": len(ids) - encoded,
            "seconds": round(seconds, 3),
            "seconds_per_encoded_image": round(seconds / encoded, 4) if encoded else None,
        }
        log.info("embed %s: %d images, %d encoded, %d already cached, %.1f s", name, len(ids), encoded, len(ids) - encoded, seconds)
    return summary


def _remove_stale(folder: Path, keep: set) -> None:
    """Remove the embeddings in ``folder`` of images gone from the dataset (not in ``keep``) and
    the temporaries of a killed run."""
    for stale in folder.iterdir():
        if (stale.suffix == ".pt" and stale.name not in keep) or stale.name.endswith(".tmp"):
            stale.unlink()


def _encode(
    predictor: SumPredictor, image_path, path: Path, torch_dtype: torch.dtype, img_size: int, fingerprint: str, digest: str
) -> dict:
    """Encode one image, write its embedding record to ``path`` and return its index entry."""
    predictor.set_image(read_image(image_path))
    emb = predictor.get_embedding()
    record = {
        "format": EMBEDDING_FORMAT,
        "features": emb.features.to("cpu", torch_dtype).contiguous(),
        "original_size": list(emb.original_size),
        "input_size": list(emb.input_size),
        "img_size": img_size,
        "fingerprint": fingerprint,
        "image_sha256": digest,
    }
    atomic_torch_save(record, path)
    return _entry(path, record)


def _entry(path: Path, record: dict) -> dict:
    """The index entry of the embedding file ``path`` holding ``record``: with the file's size and
    sha256, which a resumed run checks before it trusts the file (`_reusable`)."""
    return {
        "file": path.name,
        "original_size": [int(s) for s in record["original_size"]],
        "input_size": [int(s) for s in record["input_size"]],
        "image_sha256": record["image_sha256"],
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _reusable(path: Path, entry: Optional[dict], digest: str, fingerprint: str, torch_dtype: torch.dtype, index_path: Path) -> Optional[dict]:
    """The index entry of the embedding at ``path`` when a resumed run may keep it, else None: an
    indexed file of this image that still has the size and sha256 its ``entry`` lists (the index
    is written only after its files), or a readable embedding of this encoder, dtype and image
    that no entry with a sha256 lists (written before a kill, or indexed by an older version)."""
    if entry and entry.get("image_sha256") == digest and "sha256" in entry:
        if path.is_file() and path.stat().st_size == entry.get("size") and sha256_file(path) == entry["sha256"]:
            return entry  # the size first: cheap
        log.warning("%s: not the file %s lists (size or sha256 differ): encoded again", path, index_path)
        return None
    if (entry is None or "sha256" not in entry) and _is_current(path, fingerprint, torch_dtype, digest):
        return _entry(path, read_embedding_record(path))
    return None


def run_embed(cfg) -> Dict[str, dict]:
    """The ``embed`` stage: `embed_datasets` over ``cfg.embed.datasets`` (empty = every dataset of
    ``cfg.data.datasets``) with the model of ``cfg.model``, into ``cfg.embed.out_dir``.

    Raises:
      ValueError: naming unknown dataset names.
      sum.progress.StageStopped: after SIGINT / SIGTERM, once the image in flight is stored.
    """
    names = select_datasets(cfg.data.datasets, cfg.embed.datasets, "embed.datasets")
    torch.manual_seed(0)  # a randomly initialised model (no checkpoint) is the same in every stage
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    datasets = {n: open_dataset(cfg.data, n) for n in names}
    with StopSignals("embed", unit="image") as stop:
        return embed_datasets(model, datasets, cfg.embed.out_dir, cfg.embed.dtype, stop=stop)
