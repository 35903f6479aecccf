"""The image-embedding cache (sum.model.embeddings): round trip, resume, encoder check; the source
every stage reads embeddings from (cache, else encoder)."""

from __future__ import annotations

import json

import pytest
import torch

from sum.config import DatasetConfig, WorldSetConfig
from sum.data.dataset import build_dataset
from sum.data.formats import read_image
from sum.data.image_files import write_image
from sum.data.synthetic import generate_set
from sum.model.checkpoint import load_model
from sum.model.embeddings import EmbeddingCache, EmbeddingSource, embed_datasets, embedding_file
from sum.model.predictor import SumPredictor, encoder_fingerprint


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Four 128-px procedural images (landscape and portrait) as an unlabeled COCO set."""
    root = tmp_path_factory.mktemp("world")
    folder = generate_set(root, "pool", WorldSetConfig(task="unspecified", role="unlabeled", n_images=4, seed=3), image_size=128, workers=1)
    return DatasetConfig(format="coco", images=str(folder / "images"), annotations=str(folder / "annotations.json"), role="unlabeled")


def _model(tiny_cfg, seed=0):
    torch.manual_seed(seed)
    return load_model(tiny_cfg)


def test_round_trip_equals_fresh_encoding_and_resumes(pool, tiny_cfg, tmp_path):
    model = _model(tiny_cfg)
    ds = build_dataset(pool, "pool")
    out = tmp_path / "emb"
    summary = embed_datasets(model, {"pool": ds}, out, dtype="float32")
    assert summary["pool"]["encoded"] == len(ds) == 4

    index = json.loads((out / "pool" / "index.json").read_text())
    assert index["fingerprint"] == encoder_fingerprint(model) and index["dtype"] == "float32"
    assert list(index["images"]) == ds.image_ids

    cache = EmbeddingCache(out, fingerprint=encoder_fingerprint(model))
    predictor = SumPredictor(model)
    for i, image_id in enumerate(ds.image_ids):
        predictor.set_image(read_image(ds.image_path(i)))
        emb = cache.load("pool", image_id)
        assert emb.features.dtype == torch.float32
        assert torch.equal(emb.features, predictor.features)
        assert emb.original_size == predictor.original_size and emb.input_size == predictor.input_size
    assert {tuple(e["original_size"]) for e in index["images"].values()} == {(96, 128), (128, 96)}

    # the files are SumPredictor's embedding format
    other = SumPredictor(model)
    other.load_embedding(embedding_file(out, "pool", ds.image_ids[0]))
    assert other.original_size == cache.load("pool", ds.image_ids[0]).original_size

    # resume: nothing re-encoded, files untouched; a lost index is rebuilt from the files
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "pool").glob("*.pt")}
    assert embed_datasets(model, {"pool": ds}, out, dtype="float32")["pool"]["encoded"] == 0
    (out / "pool" / "index.json").unlink()
    (out / "pool" / ".1.pt.xyz.tmp").write_bytes(b"half written")
    assert embed_datasets(model, {"pool": ds}, out, dtype="float32")["pool"]["encoded"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "pool").glob("*.pt")} == mtimes
    assert not list((out / "pool").glob("*.tmp"))
    assert json.loads((out / "pool" / "index.json").read_text()) == index


def test_float16_storage(pool, tiny_cfg, tmp_path):
    model = _model(tiny_cfg)
    ds = build_dataset(pool, "pool")
    embed_datasets(model, {"pool": ds}, tmp_path, dtype="float16")
    record = torch.load(embedding_file(tmp_path, "pool", ds.image_ids[1]), weights_only=True)
    assert record["features"].dtype == torch.float16
    predictor = SumPredictor(model)
    predictor.set_image(read_image(ds.image_path(1)))
    emb = EmbeddingCache(tmp_path).load("pool", ds.image_ids[1])
    assert emb.features.dtype == torch.float32
    torch.testing.assert_close(emb.features, predictor.features, rtol=1e-3, atol=1e-3)


def test_other_encoder_or_missing_file_is_refused_naming_the_file(pool, tiny_cfg, tmp_path):
    model, other = _model(tiny_cfg, seed=0), _model(tiny_cfg, seed=1)
    ds = build_dataset(pool, "pool")
    embed_datasets(model, {"pool": ds}, tmp_path)
    path = embedding_file(tmp_path, "pool", ds.image_ids[0])

    with pytest.raises(ValueError, match=f"{path}: embedding made by another image encoder"):
        EmbeddingCache(tmp_path, fingerprint=encoder_fingerprint(other)).load("pool", ds.image_ids[0])
    with pytest.raises(ValueError, match=f"{path}: embedding of a"):
        EmbeddingCache(tmp_path).load("pool", ds.image_ids[0], original_size=(1, 1))
    with pytest.raises(FileNotFoundError, match=str(embedding_file(tmp_path, "pool", "nope"))):
        EmbeddingCache(tmp_path).load("pool", "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "index.json")):
        EmbeddingCache(tmp_path).load("elsewhere", ds.image_ids[0])

    # a file swapped in from another encoder, though the index says otherwise
    record = torch.load(path, weights_only=True)
    torch.save({**record, "fingerprint": encoder_fingerprint(other)}, path)
    with pytest.raises(ValueError, match=f"{path}: embedding made by another image encoder"):
        EmbeddingCache(tmp_path).load("pool", ds.image_ids[0])
    torch.save(record, path)

    # another encoder re-embeds everything
    assert embed_datasets(other, {"pool": ds}, tmp_path)["pool"]["encoded"] == len(ds)
    emb = EmbeddingCache(tmp_path, fingerprint=encoder_fingerprint(other)).load("pool", ds.image_ids[0])
    assert emb.fingerprint == encoder_fingerprint(other)


def test_changed_image_is_re_encoded(pool, tiny_cfg, tmp_path):
    model = _model(tiny_cfg)
    ds = build_dataset(pool, "pool")
    embed_datasets(model, {"pool": ds}, tmp_path / "emb")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(len(ds)):
        (images / ds.image_path(i).name).write_bytes(ds.image_path(i).read_bytes())
    moved = DatasetConfig(format="coco", images=str(images), annotations=pool.annotations, role="unlabeled")
    assert embed_datasets(model, {"pool": build_dataset(moved, "pool")}, tmp_path / "emb")["pool"]["encoded"] == 0
    image = read_image(ds.image_path(0)).copy()
    image[0, 0] = 255 - image[0, 0]
    write_image(images / ds.image_path(0).name, image)
    summary = embed_datasets(model, {"pool": build_dataset(moved, "pool")}, tmp_path / "emb")
    assert summary["pool"]["encoded"] == 1
    with pytest.raises(ValueError, match="embed.dtype='bfloat16'"):
        embed_datasets(model, {"pool": ds}, tmp_path / "emb", dtype="bfloat16")


def test_source_reads_the_cache_else_encodes(pool, tiny_cfg, tmp_path):
    """Cached datasets come from the cache (fp16 storage, cast to fp32), the others from the
    encoder, on the caller's image or the dataset's file of that id: the values of a fresh
    `SumPredictor.set_image`."""
    model = _model(tiny_cfg)
    ds = build_dataset(pool, "pool")
    embed_datasets(model, {"pool": ds}, tmp_path)
    fresh = SumPredictor(model)
    fresh.set_image(read_image(ds.image_path(2)))

    source = EmbeddingSource(tmp_path, SumPredictor(model), datasets={"pool": ds, "again": ds})
    cached = source.load("pool", ds.image_ids[2])
    assert source.cached("pool") and not source.cached("again")
    assert torch.equal(cached.features, EmbeddingCache(tmp_path).load("pool", ds.image_ids[2]).features)
    assert not torch.equal(cached.features, fresh.features)
    assert torch.equal(source.load("again", ds.image_ids[2]).features, fresh.features)
    assert torch.equal(source.load("again", "any", image=read_image(ds.image_path(2))).features, fresh.features)
    assert (source.loaded, source.encoded) == (1, 2)
    with pytest.raises(KeyError, match="no image 'nope'"):
        source.load("again", "nope")

    encode_all = EmbeddingSource(None, SumPredictor(model), datasets={"pool": ds})
    assert torch.equal(encode_all.load("pool", ds.image_ids[2]).features, fresh.features)


def test_source_required_and_other_encoders(pool, tiny_cfg, tmp_path):
    model, other = _model(tiny_cfg, seed=0), _model(tiny_cfg, seed=1)
    ds = build_dataset(pool, "pool")
    embed_datasets(model, {"pool": ds}, tmp_path)
    path = embedding_file(tmp_path, "pool", ds.image_ids[0])

    required = EmbeddingSource(tmp_path, fingerprint=encoder_fingerprint(model), required=True)
    size = read_image(ds.image_path(0)).shape[:2]
    assert required.load("pool", ds.image_ids[0], original_size=size).fingerprint == encoder_fingerprint(model)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "index.json")):
        required.load("elsewhere", ds.image_ids[0])
    with pytest.raises(ValueError, match="needs a predictor"):
        EmbeddingSource(None, fingerprint=encoder_fingerprint(model))

    # the cache of another encoder: an error by default, encoded instead with same_encoder_only
    with pytest.raises(ValueError, match=f"{path}: embedding made by another image encoder"):
        EmbeddingSource(tmp_path, SumPredictor(other)).load("pool", ds.image_ids[0])
    own = EmbeddingSource(tmp_path, SumPredictor(other), same_encoder_only=True)
    emb = own.load("pool", ds.image_ids[0], image=read_image(ds.image_path(0)))
    assert emb.fingerprint == encoder_fingerprint(other) and (own.loaded, own.encoded) == (0, 1)
