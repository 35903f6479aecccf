"""Reading files from local paths, ``s3://`` and ``https://`` with checksums, and writing atomically.

Every failure is one `FetchError` line naming the URI (never the credentials). Every write goes to a
temporary name beside its destination and is renamed into place only when complete, so nothing
half-written ever sits under a final name; errors show a URI as `display_uri` does (no query, no
password). boto3 and torch are imported where used: S3 is optional, and torch costs seconds to
callers that only read files.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from sum.config.data import S3Config

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A source could not be read or failed its checksum; the message names it."""


class S3Options(S3Config):
    """S3 endpoint, region and credentials (`S3Config`'s fields); ``None`` falls back to the AWS
    environment. Its repr never shows the credentials."""

    @classmethod
    def from_config(cls, cfg) -> "S3Options":
        """Build from an ``S3Config`` (or anything with the same attributes)."""
        return cls(**{k: getattr(cfg, k, None) for k in cls.__dataclass_fields__})


def _file_digest(path: str | os.PathLike, h) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return _file_digest(path, hashlib.sha256())


def md5_file(path: str | os.PathLike) -> str:
    """The md5 of a file's bytes: what ``dvc.lock`` records for it."""
    return _file_digest(path, hashlib.md5())


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists() and stat.S_IMODE(tmp_path.stat().st_mode) == 0o600:
            # mkstemp's private 0600 would otherwise stick to the final file: give it what open() gives
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# the names `atomic_path` gives its temporaries: ".<name>.<8 mkstemp characters>.tmp"
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_temporaries(path: str | os.PathLike) -> None:
    """Remove what `atomic_path` left when its writer was killed (``.<name>.XXXXXXXX.tmp``): for a
    folder ``path``, every such temporary under it; else the temporaries of the file ``path``
    beside it. A stage calls it on its outputs before writing, so that a run after a killed one
    leaves exactly what an uninterrupted run leaves."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in path.rglob(".*.tmp") if TEMP_NAME.match(p.name)]
    elif path.parent.is_dir():
        found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if TEMP_NAME.match(p.name)]
    else:
        found = []
    for p in found:
        if p.is_file():
            log.info("%s: removing the temporary file of an interrupted run", p)
            p.unlink(missing_ok=True)


def remove_stale_dirs(folder: str | os.PathLike, pattern: str) -> None:
    """Remove the folders matching ``pattern`` (a glob) in ``folder``: the half-built folders of a
    killed run, which a stage builds beside their final name and renames into place when whole."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(pattern):
        if p.is_dir() and not p.is_symlink():
            log.info("%s: removing the folder of an interrupted run", p)
            shutil.rmtree(p, ignore_errors=True)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(dest, text.encode())


def display_uri(uri: str) -> str:
    """``uri`` as it may appear in a message: user info and query string (a presigned URL's
    ``X-Amz-Credential`` and signature) are replaced by ``***``."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or (not parts.query and "@" not in parts.netloc):
        return uri
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    if not uri.startswith("s3://"):
        raise FetchError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise FetchError(f"{uri}: no bucket in s3:// URI")
    return bucket, key


def s3_client(opts: Optional[S3Options] = None):
    """A boto3 S3 client; endpoint, region and keys from ``opts`` else the AWS environment."""
    import boto3
    from botocore.config import Config as BotoConfig

    opts = opts or S3Options()
    session = boto3.session.Session(profile_name=opts.profile) if opts.profile else boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=opts.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=opts.access_key_id,
        aws_secret_access_key=opts.secret_access_key,
        config=BotoConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=60),
    )


def s3_error_line(uri: str, err: Exception) -> str:
    """One line for a boto3/botocore error, naming the URI and never the credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return f"{uri}: bucket does not exist"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{uri}: no such key"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{uri}: access denied ({code})"
        return f"{uri}: S3 error {code}"
    if isinstance(err, EndpointConnectionError):
        return f"{uri}: S3 endpoint unreachable ({err.kwargs.get('endpoint_url', '?')})"
    if isinstance(err, NoCredentialsError):
        return f"{uri}: no S3 credentials (set them in storage.s3 or the AWS environment)"
    return f"{uri}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _is_404(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in ("404", "NotFound")


def _bucket_exists(client, bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        return e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:
        pass
    return True


def _copy_stream(src, dst_path: Path) -> None:
    with open(dst_path, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def fetch(
    uri: str | os.PathLike,
    dest: str | os.PathLike,
    sha256: Optional[str] = None,
    s3: Optional[S3Options] = None,
    timeout: float = 60.0,
) -> Path:
    """Copy ``uri`` (local path, ``s3://``, ``https://`` or ``http://``) to ``dest`` atomically.

    If ``sha256`` is given the bytes are checked before the rename; a mismatch leaves ``dest``
    untouched and raises. Returns ``dest``.

    Raises:
        FetchError: one line naming ``uri``: missing file, unreachable bucket or host, bad checksum.
    """
    uri = str(uri)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if uri.startswith("s3://"):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = split_s3_uri(uri)
            client = s3_client(s3)
            try:
                client.download_file(bucket, key, str(tmp))
            except (ClientError, BotoCoreError) as e:
                if _is_404(e) and not _bucket_exists(client, bucket):
                    # download_file starts with HeadObject, whose 404 has no body to tell a missing
                    # bucket from a missing key.
                    raise FetchError(f"{uri}: bucket does not exist") from None
                raise FetchError(s3_error_line(uri, e)) from None
        elif uri.startswith(("https://", "http://")):
            shown = display_uri(uri)
            try:
                with urllib.request.urlopen(uri, timeout=timeout) as resp:
                    _copy_stream(resp, tmp)
            except urllib.error.HTTPError as e:
                raise FetchError(f"{shown}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = str(getattr(e, "reason", e)).splitlines()[0:1] or [type(e).__name__]
                raise FetchError(f"{shown}: unreachable ({reason[0]})") from None
        else:
            path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
            if not path.is_file():
                raise FetchError(f"{path}: file not found")
            shutil.copyfile(path, tmp)
        if sha256:
            got = sha256_file(tmp)
            if got.lower() != sha256.lower():
                raise FetchError(f"{display_uri(uri)}: sha256 mismatch: expected {sha256}, got {got}")
    return dest


def resolve_local(
    uri: str | os.PathLike,
    sha256: Optional[str] = None,
    s3: Optional[S3Options] = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local path holding ``uri``'s bytes: the path itself for local files (checksum verified),
    else a download into ``cache_dir`` (default ``~/.cache/sum``) keyed by the URI.
    """
    uri = str(uri)
    if not uri.startswith(("s3://", "https://", "http://")):
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
        if not path.is_file():
            raise FetchError(f"{path}: file not found")
        if sha256:
            got = sha256_file(path)
            if got.lower() != sha256.lower():
                raise FetchError(f"{path}: sha256 mismatch: expected {sha256}, got {got}")
        return path
    cache = Path(cache_dir or os.environ.get("SUM_CACHE_DIR", Path.home() / ".cache" / "sum")) / "remote"
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + Path(uri.split("?")[0]).name
    dest = cache / name
    if dest.is_file() and sha256 and sha256_file(dest).lower() == sha256.lower():
        return dest
    return fetch(uri, dest, sha256=sha256, s3=s3)


def atomic_torch_save(obj, dest: str | os.PathLike) -> Path:
    """``torch.save`` to ``dest`` atomically, with bytes that depend only on ``obj``.

    ``torch.save`` to a path names the zip archive's inner folder after the file, so saving to a
    random temporary name made every run's bytes (and DVC hashes) differ; a buffer gets a fixed name.
    """
    import torch  # heavy: the library's file I/O is used where torch is not (acquire, the CLI)

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(dest, buf.getvalue())
    return Path(dest)


def check_format(doc: object, expected: str, path: str | os.PathLike, what: str) -> dict:
    """``doc`` when it is a mapping whose ``"format"`` tag is ``expected``; else a ``ValueError``
    naming ``path`` and saying it is not ``what`` (e.g. "a SUM image embedding")."""
    if not isinstance(doc, dict) or doc.get("format") != expected:
        raise ValueError(f"{path}: not {what} (expected format {expected!r})")
    return doc
