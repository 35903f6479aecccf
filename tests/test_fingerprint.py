"""`sum.train.fingerprint`: the inputs' content fingerprint behind resume and reuse keys."""

from __future__ import annotations

import hashlib
import logging
import os

from sum.train.fingerprint import FileDigests, input_fingerprint


def bump_mtime(path, seconds=5):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_bytes(b'{"masks": 1}')
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)
    return root


def reference(paths):
    """The fingerprint written out by hand from the definition: each path, then every file under
    it in sorted order with its relative path and the sha256 of its bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p}\0".encode())
        root = os.fspath(p)
        if "://" in root or not os.path.exists(root):
            continue
        if os.path.isfile(root):
            h.update(f"\0{hashlib.sha256(open(root, 'rb').read()).hexdigest()}\n".encode())
            continue
        rels = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
        for rel in rels:
            data = open(os.path.join(root, rel), "rb").read()
            h.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def test_fingerprint_matches_its_definition(tmp_path):
    tree = make_tree(tmp_path / "pseudo")
    single = tmp_path / "model.pt"
    single.write_bytes(b"weights")
    paths = [str(tree), str(single), str(tmp_path / "missing"), "s3://bucket/pool"]
    digests = FileDigests(tmp_path / "cache.sqlite")
    assert input_fingerprint(paths, digests) == reference(paths)


def test_same_bytes_rewritten_keep_it_new_bytes_change_it(tmp_path):
    tree = make_tree(tmp_path / "pseudo")
    digests = FileDigests(tmp_path / "cache.sqlite")
    first = input_fingerprint([str(tree)], digests)

    shard = tree / "a.json"
    shard.write_bytes(b'{"masks": 1}')  # dvc checkout: same bytes, a new file time
    bump_mtime(shard)
    assert input_fingerprint([str(tree)], digests) == first

    shard.write_bytes(b'{"masks": 2}')  # new pseudo labels of the same size
    bump_mtime(shard, 10)
    changed = input_fingerprint([str(tree)], digests)
    assert changed != first

    (tree / "sub" / "c.bin").write_bytes(b"")  # a file more, even empty
    assert input_fingerprint([str(tree)], digests) != changed
    os.rename(tree / "sub" / "c.bin", tree / "sub" / "d.bin")  # renamed
    assert input_fingerprint([str(tree)], digests) not in (first, changed)


def test_the_cache_spares_reading_unchanged_files(tmp_path):
    tree = make_tree(tmp_path / "pseudo")
    cache = tmp_path / "cache" / "digests.sqlite"
    first = FileDigests(cache)
    fp = input_fingerprint([str(tree)], first)
    assert first.read == 2 and cache.is_file()

    again = FileDigests(cache)  # a later process: nothing read
    assert input_fingerprint([str(tree)], again) == fp and again.read == 0

    bump_mtime(tree / "a.json")  # the stat changed: that file alone is read again
    third = FileDigests(cache)
    assert input_fingerprint([str(tree)], third) == fp and third.read == 1


def test_the_default_cache_lives_under_sum_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SUM_CACHE_DIR", str(tmp_path / "c"))
    tree = make_tree(tmp_path / "pseudo")
    assert input_fingerprint([str(tree)]) == reference([str(tree)])
    assert (tmp_path / "c" / "file_digests.sqlite").is_file()


def test_an_unusable_cache_warns_once_and_changes_nothing(tmp_path, caplog):
    tree = make_tree(tmp_path / "pseudo")
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"this is not an sqlite database" * 100)
    digests = FileDigests(bad)
    with caplog.at_level(logging.WARNING, logger="sum.train.fingerprint"):
        fp = input_fingerprint([str(tree)], digests)
    assert fp == reference([str(tree)])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    assert digests.read == 2


def test_new_digests_are_written_in_batches(tmp_path, monkeypatch):
    """Digests reach the cache in batches of FLUSH_ROWS (and on flush), not one transaction per
    file; another connection sees exactly what was flushed."""
    import sqlite3

    from sum.train import fingerprint

    monkeypatch.setattr(fingerprint, "FLUSH_ROWS", 2)
    monkeypatch.setattr(fingerprint, "FLUSH_SECONDS", 3600.0)
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * 10)
        files.append(f)
    cache = tmp_path / "cache.sqlite"
    digests = FileDigests(cache)

    def rows():
        with sqlite3.connect(cache) as db:
            return db.execute("SELECT COUNT(*) FROM digests").fetchone()[0]

    assert digests.sha256(files[0]) == hashlib.sha256(bytes([0]) * 10).hexdigest()
    assert rows() == 0
    digests.sha256(files[1])
    assert rows() == 2
    digests.sha256(files[2])
    assert rows() == 2
    digests.flush()
    assert rows() == 3
    digests.close()


def test_code_fingerprint_follows_python_sources_only(tmp_path):
    from sum.train.fingerprint import code_fingerprint

    root = tmp_path / "pkg"
    for name in ("train", "model"):
        (root / name / "__pycache__").mkdir(parents=True)
        (root / name / "a.py").write_text(f"X = '{name}'\n")
    (root / "eval").mkdir()
    (root / "eval" / "b.py").write_text("Y = 1\n")
    first = code_fingerprint(("train", "model"), root)
    assert first == code_fingerprint(("train", "model"), root)
    (root / "train" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")  # not source
    (root / "train" / "notes.md").write_text("docs")
    (root / "eval" / "b.py").write_text("Y = 2\n")  # a package not listed
    code_fingerprint.cache_clear()
    assert code_fingerprint(("train", "model"), root) == first
    (root / "model" / "a.py").write_text("X = 'changed'\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(("train", "model"), root) != first
    (root / "model" / "a.py").write_text("X = 'model'\n")
    (root / "train" / "c.py").write_text("")  # a new, empty module
    code_fingerprint.cache_clear()
    assert code_fingerprint(("train", "model"), root) != first
