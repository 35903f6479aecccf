"""``sumseg pull models:/<name>@<alias> --out model.pt``: a registered version's checkpoint on disk.

``--format sum`` writes the SUM checkpoint as registered (task prompt and stored config
included; ``sum.model.load_model(checkpoint=...)`` builds the model from it). ``--format sam``
writes the SAM part as a plain state dict (`sum.model.export.export_sam`): a ViT-based model
loads into stock ``segment_anything.sam_model_registry[...]``, a MobileSAM-based one into
``mobile_sam``'s ``sam_model_registry["vit_t"]`` (stock SAM cannot build TinyViT). The
checkpoint's sha256 is checked against the version's ``checkpoint_sha256`` tag before anything
is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from sum.io import atomic_path, sha256_file
from sum.model.export import export_sam
from sum.tracking import global_tracking_uri, tracking_uri

log = logging.getLogger(__name__)

FORMATS = ("sum", "sam")


def parse_models_uri(uri: str) -> tuple[str, str, str]:
    """``models:/name@alias`` or ``models:/name/version`` as (name, "alias" | "version", value).

    Raises:
      ValueError: naming the URI when it is neither.
    """
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, "alias", alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, "version", version
    raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def pull(uri: str, out: str | os.PathLike, fmt: str = "sum", tracking: Optional[str] = None) -> Path:
    """Download the checkpoint of the model version ``uri`` names and write it to ``out``.

    Arguments:
      uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
      out: the file to write (atomically).
      fmt: ``sum`` or ``sam`` (module docstring).
      tracking: the tracking/registry URI (None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).

    Raises:
      ValueError: a bad URI or format, an unknown model, alias or version, or a checksum mismatch,
        each naming it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    name, kind, value = parse_models_uri(uri)
    store = tracking_uri(tracking)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        mv = client.get_model_version_by_alias(name, value) if kind == "alias" else client.get_model_version(name, value)
    except MlflowException as e:
        raise ValueError(f"{uri}: not in the registry at {store} ({str(e).splitlines()[0]})") from None
    with tempfile.TemporaryDirectory(prefix="sum-pull-") as tmp, global_tracking_uri(store):
        local = Path(download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp,
                                        tracking_uri=store))
        found = sorted((local / "artifacts").glob("*")) if (local / "artifacts").is_dir() else []
        if len(found) != 1:
            raise ValueError(f"{uri}: version {mv.version} holds {len(found)} artifacts, expected its one checkpoint")
        ckpt = found[0]
        expected = mv.tags.get("checkpoint_sha256")
        if expected and sha256_file(ckpt) != expected:
            raise ValueError(f"{uri}: version {mv.version}'s checkpoint does not match its checkpoint_sha256 tag")
        out = Path(out)
        if fmt == "sum":
            with atomic_path(out) as dest:
                shutil.copyfile(ckpt, dest)
        else:
            export_sam(ckpt, out)
    log.info("pulled %s (version %s) to %s as %s", uri, mv.version, out, fmt)
    return out
