"""The ``manifest.json`` that closes every acquired source folder (spec §3).

A manifest lists every file of the folder (path relative to it, size, sha256), sorted by path, and
describes the source it came from (never credentials). It is written last and atomically, so its
presence means the folder is complete; its content depends only on the source and the bytes, so a
resumed run and a clean run write the same file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from sum.io import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def manifest_text(source: dict[str, Any], files: Iterable[dict[str, Any]]) -> str:
    """The exact text of a manifest: ``{"source": ..., "files": [{path, size, sha256}, ...]}``."""
    entries = sorted(
        ({"path": str(e["path"]), "size": int(e["size"]), "sha256": str(e["sha256"])} for e in files),
        key=lambda e: e["path"],
    )
    return json.dumps({"source": source, "files": entries}, indent=2, sort_keys=True) + "\n"


def write_manifest(folder: str | os.PathLike, source: dict[str, Any], files: Iterable[dict[str, Any]]) -> Path:
    """Write ``<folder>/manifest.json`` atomically; returns its path."""
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, manifest_text(source, files))
    return path


def read_manifest(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest of ``folder``, or ``None`` when there is none or it cannot be parsed."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(data.get("source"), dict) or not all(
            isinstance(e, dict) and {"path", "size", "sha256"} <= e.keys() for e in files
        ):
            raise ValueError("expected {source: {...}, files: [{path, size, sha256}]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning(
            "%s: ignoring unreadable manifest (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__
        )
        return None
    return data


def verify_manifest(folder: str | os.PathLike) -> list[str]:
    """Check every file of ``folder`` against its manifest; returns one line per problem
    (empty when the folder is complete and intact)."""
    folder = Path(folder)
    data = read_manifest(folder)
    if data is None:
        return [f"{folder / MANIFEST_NAME}: missing or unreadable manifest"]
    problems = []
    for e in data["files"]:
        path = folder / e["path"]
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != e["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, manifest says {e['size']}")
        elif (got := sha256_file(path)) != e["sha256"]:
            problems.append(f"{path}: sha256 {got}, manifest says {e['sha256']}")
    return problems
