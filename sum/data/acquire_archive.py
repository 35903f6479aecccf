"""Read-only access to the members of a tar or zip archive, for the ``pypi`` sources of the
``acquire`` stage (spec §3): nothing is extracted wholesale, executed or followed.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Optional

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
ZIP_SUFFIXES = (".zip", ".whl", ".egg")


class Archive:
    """Read-only access to the regular-file members of a tar or zip archive; nothing is ever
    extracted wholesale, executed or followed (links are not regular files)."""

    def __init__(self, path: Path):
        self.path = path
        if path.name.endswith(ZIP_SUFFIXES):
            self._zip: Optional[zipfile.ZipFile] = zipfile.ZipFile(path)
            self._tar: Optional[tarfile.TarFile] = None
            self._members: dict[str, Any] = {i.filename: i for i in self._zip.infolist()}
        else:
            self._zip = None
            self._tar = tarfile.open(path, mode="r:*")
            self._members = {m.name: m for m in self._tar.getmembers()}

    def __enter__(self) -> "Archive":
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

