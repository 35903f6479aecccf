"""Export the SAM part of a SAM / MobileSAM / SUM checkpoint as a plain state dict that the stock
segment-anything builders load strictly (spec §2): the task-prompt embeddings are dropped.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from sum.io import S3Options, atomic_torch_save
from sum.model.checkpoint import CheckpointError, is_task_prompt_key, nonzero_task_prompts, read_checkpoint

log = logging.getLogger(__name__)


def export_sam(
    src_uri: str | os.PathLike,
    out_path: str | os.PathLike,
    sha256: Optional[str] = None,
    s3: Optional[S3Options] = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the SAM part of a checkpoint as a plain state dict the stock builders load strictly
    (``segment_anything.sam_model_registry["vit_b"](checkpoint=out_path)``).

    The task-prompt embeddings are dropped, so the exported model is the SUM model with every task
    vector zero: with id 0 frozen at zero (the default) that is SUM under task prompt 0. A warning
    is logged when non-zero task vectors are dropped.

    Returns:
      ``out_path`` (written atomically).
    """
    ckpt = read_checkpoint(src_uri, sha256=sha256, s3=s3, cache_dir=cache_dir)
    nonzero = nonzero_task_prompts(ckpt.state_dict)
    sam_sd = OrderedDict((k, v) for k, v in ckpt.state_dict.items() if not is_task_prompt_key(k))
    parts = {k.split(".", 1)[0] for k in sam_sd}
    expected = {"image_encoder", "prompt_encoder", "mask_decoder"}
    if not expected <= parts:
        raise CheckpointError(f"{ckpt.source}: no {sorted(expected - parts)} keys, expected a SAM model's state dict")
    if nonzero:
        if 0 in nonzero:
            log.warning(
                "%s: dropping non-zero task prompt ids %s, id 0 among them: the exported SAM matches "
                "the SUM model under no task prompt",
                ckpt.source,
                nonzero,
            )
        else:
            log.warning(
                "%s: dropping non-zero task prompt ids %s: the exported SAM behaves as the SUM model "
                "with task prompt 0",
                ckpt.source,
                nonzero,
            )
    out_path = Path(out_path)
    atomic_torch_save(sam_sd, out_path)
    log.info("exported %s to %s (%d tensors)", ckpt.source, out_path, len(sam_sd))
    return out_path
