"""sum.io against real local services: files, an HTTP server on 127.0.0.1 and the moto S3 server."""

from __future__ import annotations

import hashlib

import pytest

from sum.io import FetchError, S3Options, atomic_path, display_uri, fetch, resolve_local
from sum.redact import RedactFilter, redact

DATA = b"segment anything, uncertainty-aware\n" * 100
SHA = hashlib.sha256(DATA).hexdigest()
BAD_SHA = "0" * 64


def _only(dest_dir) -> list[str]:
    return sorted(p.name for p in dest_dir.iterdir()) if dest_dir.exists() else []


def _assert_one_line(err: Exception, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_fetch_local_sha_ok(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    dest = fetch(src, tmp_path / "out" / "dest.bin", sha256=SHA.upper())
    assert dest.read_bytes() == DATA
    assert _only(tmp_path / "out") == ["dest.bin"]


def test_fetch_local_sha_mismatch_leaves_nothing(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    out = tmp_path / "out"
    with pytest.raises(FetchError) as e:
        fetch(src, out / "dest.bin", sha256=BAD_SHA)
    _assert_one_line(e.value, str(src), "sha256 mismatch", BAD_SHA, SHA)
    assert _only(out) == []


def test_fetch_local_mismatch_keeps_previous_dest(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(FetchError):
        fetch(src, dest, sha256=BAD_SHA)
    assert dest.read_bytes() == b"previous"
    assert _only(tmp_path) == ["dest.bin", "src.bin"]


def test_fetch_local_missing(tmp_path):
    with pytest.raises(FetchError) as e:
        fetch(tmp_path / "nope.bin", tmp_path / "out" / "d.bin")
    _assert_one_line(e.value, "nope.bin", "file not found")
    assert _only(tmp_path / "out") == []


def test_fetch_http_sha_ok_and_mismatch(http_root, tmp_path):
    root, base = http_root
    (root / "file.bin").write_bytes(DATA)
    out = tmp_path / "out"
    assert fetch(f"{base}/file.bin", out / "a.bin", sha256=SHA).read_bytes() == DATA
    with pytest.raises(FetchError) as e:
        fetch(f"{base}/file.bin", out / "b.bin", sha256=BAD_SHA)
    _assert_one_line(e.value, f"{base}/file.bin", "sha256 mismatch")
    assert _only(out) == ["a.bin"]


def test_fetch_http_404_names_url(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(FetchError) as e:
        fetch(f"{base}/missing.bin", tmp_path / "out" / "x.bin")
    _assert_one_line(e.value, f"{base}/missing.bin", "404")
    assert _only(tmp_path / "out") == []


def test_fetch_http_hides_presigned_query(http_root, tmp_path):
    _, base = http_root
    url = f"{base}/missing.bin?X-Amz-Credential=AKIASECRETID%2F20240101&X-Amz-Signature=deadbeef"
    with pytest.raises(FetchError) as e:
        fetch(url, tmp_path / "x.bin")
    _assert_one_line(e.value, f"{base}/missing.bin", "404")
    assert "AKIASECRETID" not in str(e.value) and "deadbeef" not in str(e.value)


def test_display_uri():
    assert display_uri("s3://b/k.pt") == "s3://b/k.pt"
    assert display_uri("/data/x?.pt") == "/data/x?.pt"
    assert display_uri("https://user:pw@host/x.pt?sig=1") == "https://***@host/x.pt?***"


def test_redact_the_secret_rule():
    """Secret-named keys (their string values), URL passwords and credential query parameters
    become ***; everything else, types and order included, is kept."""
    cfg = {
        "storage": {"s3": {"access_key_id": "AKIA1", "secret_access_key": "s3cr3t", "profile": None, "region": "eu"}},
        "model": {"checkpoint": "https://h/m.pt?versionId=7&X-Amz-Credential=AKIA2%2Fx&X-Amz-Signature=ab&x-amz-security-token=t",
                  "zero_token_no_grad": True, "img_size": 1024},
        "sources": ["https://u:pw@h/a.tar?sig=1&Signature=2&token=3&AWSAccessKeyId=4#frag", "s3://b/k"],
        "api_token": "", "password": None,
    }
    assert redact(cfg) == {
        "storage": {"s3": {"access_key_id": "***", "secret_access_key": "***", "profile": None, "region": "eu"}},
        "model": {"checkpoint": "https://h/m.pt?versionId=7&X-Amz-Credential=***&X-Amz-Signature=***&x-amz-security-token=***",
                  "zero_token_no_grad": True, "img_size": 1024},
        "sources": ["https://u:***@h/a.tar?sig=***&Signature=***&token=***&AWSAccessKeyId=***#frag", "s3://b/k"],
        "api_token": "", "password": None,
    }
    assert redact("see https://tok@h/x?a=1, or (http://h/y?sig=2).") == "see https://***@h/x?a=1, or (http://h/y?sig=***)."
    assert redact("overrides ['+storage.s3.secret_access_key=k1', 'train.lr=1', 'model.zero_token_no_grad=true']") == (
        "overrides ['+storage.s3.secret_access_key=***', 'train.lr=1', 'model.zero_token_no_grad=true']")
    assert redact(S3Options(access_key_id="AKIA1", region="eu"))["access_key_id"] == "***"


def test_redact_filter_masks_log_lines(caplog):
    import logging

    logger = logging.getLogger("sum.test_redact")
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RedactFilter())
    logger.info("model %s: %s", "foundation", "https://h/m.pt?X-Amz-Signature=deadbeef")
    assert "deadbeef" not in caplog.text and "X-Amz-Signature=***" in caplog.text


def test_fetch_s3_sha_ok_and_mismatch(s3_bucket, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="dir/file.bin", Body=DATA)
    out = tmp_path / "out"
    assert fetch(f"s3://{bucket}/dir/file.bin", out / "a.bin", sha256=SHA).read_bytes() == DATA
    with pytest.raises(FetchError) as e:
        fetch(f"s3://{bucket}/dir/file.bin", out / "b.bin", sha256=BAD_SHA)
    _assert_one_line(e.value, f"s3://{bucket}/dir/file.bin", "sha256 mismatch")
    assert _only(out) == ["a.bin"]


def test_fetch_s3_missing_key_and_bucket(s3_bucket, tmp_path):
    _, bucket = s3_bucket
    with pytest.raises(FetchError) as e:
        fetch(f"s3://{bucket}/nope.bin", tmp_path / "out" / "a.bin")
    _assert_one_line(e.value, f"s3://{bucket}/nope.bin", "no such key")
    with pytest.raises(FetchError) as e:
        fetch("s3://no-such-bucket-sum/x.bin", tmp_path / "out" / "b.bin")
    _assert_one_line(e.value, "s3://no-such-bucket-sum/x.bin", "bucket does not exist")
    assert _only(tmp_path / "out") == []


def test_resolve_local_uses_verified_cache(s3_bucket, tmp_path):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="file.bin", Body=DATA)
    uri = f"s3://{bucket}/file.bin"
    first = resolve_local(uri, sha256=SHA, cache_dir=tmp_path / "cache")
    client.delete_object(Bucket=bucket, Key="file.bin")
    assert resolve_local(uri, sha256=SHA, cache_dir=tmp_path / "cache") == first
    assert first.read_bytes() == DATA


def test_resolve_local_local_mismatch(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    assert resolve_local(src, sha256=SHA) == src
    with pytest.raises(FetchError) as e:
        resolve_local(src, sha256=BAD_SHA)
    _assert_one_line(e.value, str(src), "sha256 mismatch")


def test_atomic_path_leaves_nothing_on_exception(tmp_path):
    dest = tmp_path / "d" / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert _only(tmp_path / "d") == []


def test_atomic_path_keeps_old_dest_on_exception(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert _only(tmp_path) == ["out.txt"]
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert _only(tmp_path) == ["out.txt"]


def test_s3_options_repr_hides_keys():
    opts = S3Options(endpoint_url="http://127.0.0.1:9000", access_key_id="AKIAHIDDEN", secret_access_key="s3cr3t")
    for text in (repr(opts), str(opts), f"{opts}", f"{opts!r}"):
        assert "AKIAHIDDEN" not in text and "s3cr3t" not in text
        assert "127.0.0.1:9000" in text


def test_atomic_torch_save_bytes_depend_only_on_the_object(tmp_path):
    """DVC hashes outputs: the same object saved twice (to different names) gives the same bytes."""
    import torch

    from sum.io import atomic_torch_save

    obj = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3), "meta": {"a": 1}}
    a = atomic_torch_save(obj, tmp_path / "a.pt")
    b = atomic_torch_save(obj, tmp_path / "sub" / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(a, weights_only=True)["w"], obj["w"])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.pt", "b.pt"]
