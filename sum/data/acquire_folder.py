"""The ``folder`` source kind of the ``acquire`` stage (spec §3): files copied from a local folder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sum.data.acquire_common import AcquireError, HashingWriter, Item, Source, select_paths


class FolderSource(Source):
    """A local folder (``uri``, optionally ``file://``), walked recursively."""

    def __init__(self, *a):
        super().__init__(*a)
        self.where = str(self._root())

    def _root(self) -> Path:
        uri = self.src.uri
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)

    def plan(self, old_files, hashes):
        root = self._root()
        if not root.is_dir():
            raise AcquireError(f"{root}: source folder not found ({self.key}.uri)")
        paths = sorted((Path(r) / f).relative_to(root).as_posix() for r, _, files in os.walk(root) for f in files)
        chosen = select_paths(
            paths, self.src, str(root), lambda m: f"{root / m}: listed in {self.key}.members but not found"
        )
        return [
            Item("", str(root / p), sha, (root / p).stat().st_size, local=str(root / p), path=p)
            for p, sha in chosen
        ]

    @contextlib.contextmanager
    def session(self, pending, progress):
        def fetch(item: Item, w: HashingWriter) -> None:
            try:
                with open(item.src, "rb") as f:
                    w.copy_from(f)
            except OSError as e:
                raise AcquireError(f"{item.src}: cannot read ({e.strerror or e})") from None

        yield fetch

