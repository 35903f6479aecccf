"""Secrets out of everything logged or written: credential config keys, URL passwords and
presigned-URL signatures become ``***`` (`redact`, `redact_text`, `RedactFilter`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import urllib.parse
from typing import Mapping

REDACTED = "***"
# The secret rule: a config key or URL query parameter is secret when its name, lowercased without
# "_", "-" and ".", holds one of these words or is "sig" (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, AWSAccessKeyId, Signature, sig, token, storage.s3.secret_access_key ...).
SECRET_WORDS = ("secret", "password", "passwd", "token", "accesskey", "credential", "signature", "apikey")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_URL_TAIL = ".,;:)]}"  # punctuation that ends a sentence, not the URL
_ASSIGNMENT_RE = re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-]*)=([^\s&,;#'\"\])}]+)")


def is_secret_name(name: str) -> bool:
    """Whether a key or query parameter ``name`` names a secret (the rule of `SECRET_WORDS`)."""
    flat = re.sub(r"[_\-.]", "", str(name).rsplit(".", 1)[-1].lower())
    return flat == "sig" or any(word in flat for word in SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with its user info's password (or a lone user name: a token) and the values of its
    secret query parameters replaced by ``***``; everything else as written."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable (a bad IPv6 host): nothing of it is shown
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if has_password else f"{REDACTED}@{host}"
    query = "&".join(
        f"{name}={REDACTED}" if sep and is_secret_name(urllib.parse.unquote_plus(name)) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    ) if parts.query else ""
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (a log line, an error message) with every URL in it passed through `redact_url`
    and the value of every ``name=value`` whose name is secret (a Hydra override
    ``storage.s3.secret_access_key=...``) replaced by ``***``."""

    def url(m: re.Match) -> str:
        found = m.group(0)
        cut = len(found.rstrip(_URL_TAIL))
        return redact_url(found[:cut]) + found[cut:]

    def assignment(m: re.Match) -> str:
        flag = m.group(2).lower() in ("true", "false", "none", "null")  # model.zero_token_no_grad=true
        return f"{m.group(1)}={REDACTED}" if is_secret_name(m.group(1)) and not flag else m.group(0)

    if "://" in text:
        text = _URL_RE.sub(url, text)
    return _ASSIGNMENT_RE.sub(assignment, text) if "=" in text else text


def redact(obj, key: str = ""):
    """``obj`` (plain data, dataclasses, strings) as it may be logged or written: the non-empty
    string value of a secret key (`is_secret_name`) becomes ``***``, every other string goes
    through `redact_text`; mappings become dicts and sequences lists, in their order; numbers,
    booleans and None are kept. What every log line, MLflow param and tag and written run record
    of the library passes through (`RedactFilter`, `sum.tracking.flatten`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str):
        return REDACTED if obj and is_secret_name(key) else redact_text(obj)
    return obj


class RedactFilter(logging.Filter):
    """A logging filter that passes each record's message through `redact_text` (installed by the
    CLI on its log handlers, so that a module logging a raw URI cannot leak a signature)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
