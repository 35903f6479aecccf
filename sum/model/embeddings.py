"""The image-embedding cache: every image is encoded once, later stages read the embedding.

SUM keeps the image encoder frozen in the embedded default (decoder fine-tuning, spec §7), and
pseudo-labelling (spec §3.3), uncertainty maps and evaluation all start from the same image
embedding. The ``embed`` stage writes it once per image:

- ``<out_dir>/<dataset>/<quoted image_id>.pt``: the record `SumPredictor.save_embedding` writes
  (format ``sum-image-embedding/1``: features, original and input size, ``img_size``, encoder
  fingerprint), with the features stored as float16 by default. That halves the disk (256x64x64
  is 2 MB instead of 4 MB) at no real cost: on the CPU/GPU fast path the encoder already runs in
  bf16 autocast (`sum.model.fast`), whose 8-bit mantissa is coarser than float16's 11 bits over
  the range of SAM embeddings (|x| << 65504), so float16 storage adds rounding well below what
  the encoder itself carries. `SumPredictor.load_embedding` reads these files as they are.
- ``<out_dir>/<dataset>/index.json``: the image ids, their files and sizes, the dtype and the
  encoder fingerprint (`sum.model.predictor.encoder_fingerprint`).

`EmbeddingCache.load` casts back to fp32 and refuses, naming the file, an embedding that is
missing, of another size or made by another encoder. `embed_datasets` resumes: images whose file
already holds an embedding from the same encoder and dtype, of the same image bytes (sha256), are
skipped. Every later stage gets its embeddings from an `EmbeddingSource`: this cache, else the encoder.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from sum.data.dataset import build_dataset, select_datasets
from sum.data.formats import read_image
from sum.io import S3Options, atomic_torch_save, atomic_write_text, check_format, sha256_file
from sum.model.checkpoint import load_model
from sum.model.predictor import EMBEDDING_FORMAT, ImageEmbedding, SumPredictor, read_embedding_record
from sum.progress import progress_bar

log = logging.getLogger(__name__)

INDEX_FORMAT = "sum-embedding-index/1"
INDEX_NAME = "index.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_INDEX_EVERY_S = 30.0  # rewrite the index at least this often, so a killed run resumes cheaply


def embedding_file(out_dir: str | os.PathLike, dataset: str, image_id: str) -> Path:
    """``<out_dir>/<dataset>/<image_id>.pt``, the id percent-quoted so that any id is one file name."""
    return Path(out_dir) / dataset / f"{urllib.parse.quote(str(image_id), safe='')}.pt"


def _read_index(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable embedding index ({type(e).__name__})") from None
    return check_format(index, INDEX_FORMAT, path, "a SUM embedding index")


def _write_index(path: Path, dataset: str, fingerprint: str, img_size: int, dtype: str, images: dict) -> None:
    index = {
        "format": INDEX_FORMAT,
        "dataset": dataset,
        "fingerprint": fingerprint,
        "img_size": img_size,
        "dtype": dtype,
        "images": images,
    }
    atomic_write_text(path, json.dumps(index, indent=1) + "\n")


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
) -> Dict[str, dict]:
    """Encode every image of every dataset once and store its embedding (module docstring).

    Images already embedded by the same encoder (fingerprint), in the same dtype, from the same
    image file (sha256 of its bytes) are skipped, so a killed run resumes where it stopped. Files of images no longer in a
    dataset, and temporaries of a killed run, are removed.

    Arguments:
      model (Sam): the model (weights loaded, fast path as configured); only its encoder runs.
      datasets: name -> `sum.data.sample.SegDataset` (``image_ids``, ``image_path(i)``).
      out_dir: the cache folder.
      dtype (str): "float16" (default) or "float32", the storage dtype of the features.

    Returns:
      name -> {"images", "encoded", "skipped", "seconds", "seconds_per_encoded_image"}.

    Raises:
      ValueError: naming ``dtype`` when unknown, or a dataset with duplicate image ids.
      FileNotFoundError: naming a missing image file.
      sum.data.formats.ImageReadError: naming the image file that does not decode.
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
        old = _read_index(index_path) or {}
        old_images = old.get("images", {}) if old.get("fingerprint") == fingerprint and old.get("dtype") == dtype else {}
        keep = {embedding_file(out_dir, name, i).name for i in ids}
        for stale in folder.iterdir():
            if (stale.suffix == ".pt" and stale.name not in keep) or stale.name.endswith(".tmp"):
                stale.unlink()  # images gone from the dataset, or temporaries of a killed run

        images: dict = {}
        encoded, t0, last_index = 0, time.perf_counter(), time.perf_counter()
        bar = progress_bar(len(ids), f"embed {name}", unit="img")
        for i, image_id in enumerate(ids):
            path = embedding_file(out_dir, name, image_id)
            image_path = ds.image_path(i)
            if not Path(image_path).is_file():
                raise FileNotFoundError(f"{image_path}: image {image_id!r} of dataset {name!r} not found")
            digest = sha256_file(image_path)
            entry = old_images.get(image_id)
            if entry and entry.get("image_sha256") == digest and path.is_file():
                images[image_id] = entry  # the index is written only after its files
            elif entry is None and _is_current(path, fingerprint, torch_dtype, digest):
                images[image_id] = _entry(path, read_embedding_record(path))  # written before a kill, not yet indexed
            else:
                images[image_id] = _encode(predictor, image_path, path, torch_dtype, img_size, fingerprint, digest)
                encoded += 1
            bar.update(1)
            if time.perf_counter() - last_index > _INDEX_EVERY_S:
                _write_index(index_path, name, fingerprint, img_size, dtype, {**images})
                last_index = time.perf_counter()
        bar.close()
        _write_index(index_path, name, fingerprint, img_size, dtype, images)
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
    return {
        "file": path.name,
        "original_size": [int(s) for s in record["original_size"]],
        "input_size": [int(s) for s in record["input_size"]],
        "image_sha256": record["image_sha256"],
    }


class EmbeddingCache:
    """Read access to the embeddings `embed_datasets` wrote under ``out_dir``.

    Arguments:
      out_dir: the cache folder.
      fingerprint (str or None): `encoder_fingerprint` of the model that will use the embeddings;
        when given, every `load` checks it (also settable per call).
    """

    def __init__(self, out_dir: str | os.PathLike, fingerprint: Optional[str] = None) -> None:
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint
        self._indexes: Dict[str, dict] = {}

    def index(self, dataset: str) -> dict:
        """The dataset's ``index.json`` (read once).

        Raises:
          FileNotFoundError: naming the index when the dataset was never embedded.
        """
        if dataset not in self._indexes:
            path = self.out_dir / dataset / INDEX_NAME
            index = _read_index(path)
            if index is None:
                raise FileNotFoundError(f"{path}: no embedding index for dataset {dataset!r} (run `sumseg embed`)")
            self._indexes[dataset] = index
        return self._indexes[dataset]

    def image_ids(self, dataset: str) -> List[str]:
        return list(self.index(dataset)["images"])

    def path(self, dataset: str, image_id: str) -> Path:
        return embedding_file(self.out_dir, dataset, image_id)

    def load(
        self,
        dataset: str,
        image_id: str,
        fingerprint: Optional[str] = None,
        original_size: Optional[Tuple[int, int]] = None,
    ) -> ImageEmbedding:
        """The fp32 embedding of one image.

        Arguments:
          dataset, image_id: which image.
          fingerprint: expected encoder fingerprint (default: the cache's; None checks nothing).
          original_size: expected (H, W) of the image, if known.

        Raises:
          FileNotFoundError: naming the file when the image was not embedded.
          ValueError: naming the file when it is not an embedding, disagrees with the index or
            ``original_size``, or was made by another encoder.
        """
        path = self.path(dataset, image_id)
        index = self.index(dataset)
        entry = index["images"].get(str(image_id))
        if entry is None or not path.is_file():
            raise FileNotFoundError(f"{path}: no embedding of image {image_id!r} of dataset {dataset!r} (run `sumseg embed`)")
        record = read_embedding_record(path)
        expected = fingerprint or self.fingerprint
        if record.get("fingerprint") != index.get("fingerprint") or (expected and record.get("fingerprint") != expected):
            made = str(record.get("fingerprint"))[:12]
            want = str(expected or index.get("fingerprint"))[:12]
            raise ValueError(f"{path}: embedding made by another image encoder (fingerprint {made}..., expected {want}...)")
        size = tuple(int(s) for s in record["original_size"])
        if size != tuple(entry["original_size"]) or (original_size is not None and size != tuple(original_size)):
            want = tuple(original_size) if original_size is not None else tuple(entry["original_size"])
            raise ValueError(f"{path}: embedding of a {size[0]}x{size[1]} image, expected {want[0]}x{want[1]}")
        return ImageEmbedding(
            features=record["features"].to(torch.float32),
            original_size=size,
            input_size=tuple(int(s) for s in record["input_size"]),
            fingerprint=record["fingerprint"],
        )


def run_embed(cfg) -> Dict[str, dict]:
    """The ``embed`` stage: `embed_datasets` over ``cfg.embed.datasets`` (empty = every dataset of
    ``cfg.data.datasets``) with the model of ``cfg.model``, into ``cfg.embed.out_dir``.

    Raises:
      ValueError: naming unknown dataset names.
    """
    names = select_datasets(cfg.data.datasets, cfg.embed.datasets, "embed.datasets")
    torch.manual_seed(0)  # a randomly initialised model (no checkpoint) is the same in every stage
    model = load_model(cfg.model, s3=S3Options.from_config(cfg.storage.s3))
    datasets = {n: build_dataset(cfg.data.datasets[n], n) for n in names}
    return embed_datasets(model, datasets, cfg.embed.out_dir, cfg.embed.dtype)


class EmbeddingSource:
    """Where every stage gets an image's embedding: the ``embed`` stage's cache when it holds the
    dataset, else the image encoder. The encoder is frozen wherever an embedding is reused: the
    refinement module shares SAM's (spec §4.1); pseudo-labelling (spec §3.3) and decoder-mode
    fine-tuning (spec §8.1) never run it.

    Per dataset, at its first image, the source decides once: the cache when
    ``<embed_dir>/<dataset>/index.json`` exists (and, with ``same_encoder_only``, was made by this
    encoder), its stored features cast to fp32, each `load` refusing an embedding of another
    encoder or size (`EmbeddingCache.load`); else ``predictor`` encodes, in fp32, the image the
    caller hands in or the dataset's file of that id. Nothing is kept in memory; ``loaded`` and
    ``encoded`` count the embeddings read and computed.

    Arguments:
      embed_dir: the ``embed`` stage's folder (``cfg.embed.out_dir``), or None: encode every image.
      predictor (SumPredictor or None): encodes what the cache lacks; None: the cache only.
      fingerprint (str or None): `encoder_fingerprint` the cached embeddings must carry; default
        the predictor's, computed when first needed. None without a predictor checks nothing.
      required (bool): raise `FileNotFoundError` naming the index of a dataset the cache lacks
        (implied without a predictor): for stages that exist so that nothing is encoded twice.
      same_encoder_only (bool): encode, instead of raising at `load`, when the dataset's cache was
        made by another encoder (evaluation of full fine-tunes, whose encoder moved).
      datasets: name -> `SegDataset`, to read an image by id when `load` is given none.
    """

    def __init__(
        self, embed_dir: Optional[str | os.PathLike], predictor: Optional[SumPredictor] = None, *,
        fingerprint: Optional[str] = None, required: bool = False, same_encoder_only: bool = False,
        datasets: Optional[Mapping[str, object]] = None,
    ) -> None:
        if embed_dir is None and (required or predictor is None):
            raise ValueError("EmbeddingSource: embed_dir=None needs a predictor to encode with and required=False")
        self.cache = EmbeddingCache(embed_dir) if embed_dir is not None else None
        self.predictor = predictor
        self.required = required or predictor is None
        self.same_encoder_only = same_encoder_only
        self.datasets = datasets or {}
        self._fingerprint = fingerprint
        self._from_cache: Dict[str, bool] = {}
        self._positions: Dict[str, Dict[str, int]] = {}
        self.loaded = self.encoded = 0

    @property
    def fingerprint(self) -> Optional[str]:
        """The encoder fingerprint the cached embeddings must carry (class docstring)."""
        if self._fingerprint is None and self.predictor is not None:
            self._fingerprint = self.predictor.fingerprint()
        return self._fingerprint

    def index(self, dataset: str) -> dict:
        """The cache's ``index.json`` of ``dataset`` (`EmbeddingCache.index`: FileNotFoundError naming it)."""
        return self.cache.index(dataset)

    def cached(self, dataset: str) -> bool:
        """Whether the embeddings of ``dataset`` come from the cache (decided at its first call).

        Raises:
          FileNotFoundError: naming the index, when the cache lacks the dataset and is required.
        """
        if dataset not in self._from_cache:
            if self.required:
                self.index(dataset)  # FileNotFoundError naming the index when the cache lacks it
                use = True
            else:
                use = self.cache is not None and (self.cache.out_dir / dataset / INDEX_NAME).is_file()
                if use and self.same_encoder_only:
                    use = self.index(dataset).get("fingerprint") == self.fingerprint
                if not use:
                    where = self.cache.out_dir if self.cache is not None else "no embed_dir"
                    log.info("%s: no embeddings of encoder %s... in %s, encoding its images", dataset, self.fingerprint[:12], where)
            self._from_cache[dataset] = use
        return self._from_cache[dataset]

    def load(
        self, dataset: str, image_id: str, image: Optional[np.ndarray] = None, original_size: Optional[Tuple[int, int]] = None
    ) -> ImageEmbedding:
        """The fp32 embedding of one image (class docstring).

        Arguments:
          dataset, image_id: which image.
          image (np.ndarray or None): (H, W, 3) uint8, the image to encode when it is not cached;
            None reads the file of ``image_id`` in ``datasets[dataset]``.
          original_size: expected (H, W) of a cached embedding, if known.
        Returns:
          `ImageEmbedding`: features (1, C, He, We) fp32, sizes, fingerprint.
        Raises:
          FileNotFoundError, ValueError: from `EmbeddingCache.load`, naming the file.
          KeyError: naming the dataset when an image to encode is neither given nor one of its ids.
        """
        if self.cached(dataset):
            self.loaded += 1
            return self.cache.load(dataset, image_id, fingerprint=self.fingerprint, original_size=original_size)
        if image is None:
            image = read_image(self._image_path(dataset, str(image_id)))
        self.predictor.set_image(image)
        self.encoded += 1
        return self.predictor.get_embedding()

    def _image_path(self, dataset: str, image_id: str) -> Path:
        ds = self.datasets.get(dataset)
        if ds is None:
            raise KeyError(f"dataset {dataset!r}: no image given to encode image {image_id!r}, and no dataset to read it from")
        if dataset not in self._positions:
            self._positions[dataset] = {str(i): k for k, i in enumerate(ds.image_ids)}
        if image_id not in self._positions[dataset]:
            raise KeyError(f"dataset {dataset!r} ({ds.source}): no image {image_id!r}")
        return ds.image_path(self._positions[dataset][image_id])
