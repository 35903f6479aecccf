"""What a run's input files hold: a content fingerprint, with each file's digest cached by its stat.

A fine-tune resumes, and the seeds and recipe commands reuse a finished run, only on the same
inputs (`sum.train.state.resume_key`). "The same" means the same bytes: `dvc checkout`, a
teammate's `dvc pull` or a `dvc repro` whose outputs did not change rewrites files with new
modification times but the same contents, and must not make hours of fine-tunes run again.

Reading every byte at every start would cost minutes on a large pool, so, like DVC's own state
database, `FileDigests` keeps each file's sha256 keyed by its path, size, modification time and
inode in an SQLite file (default ``$SUM_CACHE_DIR/file_digests.sqlite``, else
``~/.cache/sum/file_digests.sqlite``): a file is read again only when its stat changed. The cache
only saves time: when it cannot be opened or written (read-only home, corrupt file) the digests
are computed without it, with one warning naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from sum.io import sha256_file

log = logging.getLogger(__name__)

FLUSH_ROWS = 500  # new digests written to the cache in one transaction
FLUSH_SECONDS = 2.0


def default_cache_path() -> Path:
    """``$SUM_CACHE_DIR/file_digests.sqlite``, else ``~/.cache/sum/file_digests.sqlite``."""
    return Path(os.environ.get("SUM_CACHE_DIR") or Path.home() / ".cache" / "sum") / "file_digests.sqlite"


class FileDigests:
    """sha256 of local files, cached in SQLite by (resolved path, size, mtime_ns, inode).

    New digests are written in batches (`FLUSH_ROWS`, `FLUSH_SECONDS`, and at `close`), so the
    database is locked only while a batch is written, never while a file is read, and a pool of
    many files is not one transaction per file.

    Arguments:
      cache: the SQLite file (created with its folder); None for `default_cache_path`.
    """

    def __init__(self, cache: Optional[os.PathLike] = None):
        self.cache = Path(cache) if cache is not None else default_cache_path()
        self._db: Optional[sqlite3.Connection] = None
        self._broken = False
        self._pending: list = []
        self._flushed = time.monotonic()
        self.read = 0  # files whose bytes were read by this instance (the rest came from the cache)

    def _connect(self) -> Optional[sqlite3.Connection]:
        if self._db is None and not self._broken:
            try:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.cache, timeout=60)
                db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                           "mtime_ns INTEGER, ino INTEGER, sha256 TEXT)")
                db.commit()
                self._db = db
            except (OSError, sqlite3.Error) as e:
                self._cache_failed(e)
        return self._db

    def _cache_failed(self, e: Exception) -> None:
        log.warning("file digest cache %s unusable (%s: %s): digests computed without it", self.cache,
                    type(e).__name__, e)
        self._broken = True
        if self._db is not None:
            self._db.close()
        self._db = None

    def sha256(self, path: Path) -> str:
        """The sha256 of ``path``'s bytes, read only when its stat is not in the cache."""
        path = Path(path).resolve()
        st = path.stat()
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        db = self._connect()
        if db is not None:
            try:
                row = db.execute("SELECT size, mtime_ns, ino, sha256 FROM digests WHERE path = ?", (str(path),)).fetchone()
                if row is not None and tuple(row[:3]) == stat:
                    return row[3]
            except sqlite3.Error as e:
                self._cache_failed(e)
        digest = sha256_file(path)
        self.read += 1
        if self._db is not None:
            self._pending.append((str(path), *stat, digest))
            if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._flushed >= FLUSH_SECONDS:
                self.flush()
        return digest

    def flush(self) -> None:
        """Write the digests computed since the last flush to the cache."""
        if self._db is not None and self._pending:
            try:
                with self._db:  # one transaction
                    self._db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", self._pending)
            except sqlite3.Error as e:
                self._cache_failed(e)
        self._pending = []
        self._flushed = time.monotonic()

    def close(self) -> None:
        """Flush, then close the database."""
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


def input_fingerprint(paths: Sequence[str], digests: Optional[FileDigests] = None) -> str:
    """sha256 over ``paths`` (as given) and, for every file under each (files or folders, walked in
    sorted order), its path relative to that root and the sha256 of its bytes. A missing or remote
    (``scheme://``) path counts by its name. New pseudo labels, uncertainty maps, embeddings or a
    new checkpoint change it; the same bytes rewritten (new modification times) do not.

    Arguments:
      paths: files or folders.
      digests: the digest cache to use; None for a `FileDigests` on the default cache.
    """
    own = digests is None
    digests = FileDigests() if own else digests
    h = hashlib.sha256()
    try:
        for p in paths:
            h.update(f"{p}\0".encode())
            root = Path(p)
            if "://" in p or not root.exists():
                continue
            files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
            for f in files:
                h.update(f"{f.relative_to(root) if f != root else ''}\0{digests.sha256(f)}\n".encode())
    finally:
        if own:
            digests.close()
        else:  # the caller's cache: its new digests written now
            digests.flush()
    return h.hexdigest()


# what a fine-tune's result depends on besides its config and inputs: the packages dvc.yaml lists
# as the finetune stage's code
TRAINING_CODE = ("data", "model", "pseudo", "train")


@lru_cache(maxsize=None)
def code_fingerprint(packages: Sequence[str] = TRAINING_CODE, root: Optional[Path] = None) -> str:
    """sha256 over the ``.py`` sources (relative path and bytes, sorted) of the subpackages
    ``packages`` of ``root`` (default: the ``sum`` package as installed): a finished run of other
    code is not resumed or reused, as ``dvc repro`` reruns a stage whose code changed. Computed
    once per process and arguments."""
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    h = hashlib.sha256()
    for name in packages:
        for f in sorted((root / name).rglob("*.py")):
            h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()
