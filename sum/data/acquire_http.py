"""The ``https`` source kind of the ``acquire`` stage (spec §3), and the http pieces the ``pypi``
kind shares: ``urlopen`` with same-host basic auth, one-line error messages, a checked download,
and a PEP 503 HTML index page parser.
"""

from __future__ import annotations

import base64
import contextlib
import html
import html.parser
import http.client
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Optional

from sum.data.acquire_common import AcquireError, ByteProgress, HashingWriter, Item, Source
from sum.io import display_uri

HTTP_TIMEOUT = 60.0
USER_AGENT = "sum-acquire/0.1 (python urllib)"


def _host_port(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def http_open(url: str, *, accept: str = "", auth_from: str = "", timeout: float = HTTP_TIMEOUT):
    """``urlopen`` with user info in the URL (or in ``auth_from``, same host only) sent as basic
    auth that is never forwarded on redirects."""
    parts = urllib.parse.urlsplit(url)
    user, password = parts.username, parts.password
    if user is None and auth_from:
        a = urllib.parse.urlsplit(auth_from)
        if a.username is not None and (a.hostname, a.port) == (parts.hostname, parts.port):
            user, password = a.username, a.password
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=_host_port(parts))))
    req.add_header("User-Agent", USER_AGENT)
    if accept:
        req.add_header("Accept", accept)
    if user is not None:
        token = base64.b64encode(
            f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
        ).decode()
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return urllib.request.urlopen(req, timeout=timeout)


def http_error_line(url: str, e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"{display_uri(url)}: HTTP {e.code} {e.reason}"
    reason = getattr(e, "reason", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"{display_uri(url)}: unreachable ({reason})"


def http_download(url: str, w: HashingWriter, progress: ByteProgress, auth_from: str = "") -> None:
    try:
        with http_open(url, auth_from=auth_from) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                progress.add_total(int(length))
            w.copy_from(resp)
        if length is not None and length.isdigit() and w.size != int(length):
            raise AcquireError(f"{display_uri(url)}: connection closed after {w.size} of {length} bytes")
    except urllib.error.HTTPError as e:
        raise AcquireError(http_error_line(url, e)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise AcquireError(http_error_line(url, e)) from None


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


def parse_pep503(text: str) -> list[dict]:
    p = _Pep503Parser()
    p.feed(text)
    return p.files


def local_index_page(page: str) -> bytes:
    """The project page ``file:///<index>/<project>/`` of a simple index on disk, as pip reads one:
    the folder's ``index.html``, else a PEP 503 listing of the files in it (a folder of archives,
    e.g. filled by ``pip download``; their sha256 is the pinned ``archive_sha256``).

    Raises:
      FileNotFoundError: when the project's folder does not exist.
    """
    folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(page).path))
    if (folder / "index.html").is_file():
        return (folder / "index.html").read_bytes()
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    links = "".join(f'<a href="{urllib.parse.quote(p.name)}">{html.escape(p.name)}</a>\n'
                    for p in sorted(folder.iterdir()) if p.is_file())
    return f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()



class HttpsSource(Source):
    """One file at an http(s) URL, named by its one ``members`` key or the URL's last segment."""

    def __init__(self, *a):
        super().__init__(*a)
        self.where = self.key + ".members"

    def plan(self, old_files, hashes):
        if self.src.members:
            ((name, sha),) = self.src.members.items()
        else:
            name, sha = urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(self.src.uri).path).name), ""
            if not name:
                raise AcquireError(
                    f"{display_uri(self.src.uri)}: no file name in the URL; name it in {self.key}.members"
                )
        return [Item("", self.src.uri, sha, path=name)]

    @contextlib.contextmanager
    def session(self, pending, progress):
        yield lambda item, w: http_download(item.src, w, progress)

