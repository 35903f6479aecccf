"""Checkpoints: `load_model` (the model with SAM / MobileSAM / SUM weights, on its device) and
SUM checkpoints saved and read (spec §2); exporting plain SAM is `sum.model.export`.

Three formats are read, from a local path, ``s3://bucket/key`` or ``https://`` (through
`sum.io.resolve_local`, sha256 checked before the bytes are unpickled):

- the official SAM checkpoints (``sam_vit_b_01ec64.pth`` ...): a plain state dict;
- MobileSAM's ``mobile_sam.pt``: the same layout with TinyViT encoder keys;
- SUM checkpoints written by `save_sum_checkpoint`: ``{"format": "sum-checkpoint", "version",
  "model_config", "state_dict", "meta"}``.

Loading is strict on every SAM key. Only the task-prompt embeddings (spec §2.2) may be absent: SAM
checkpoints do not have them and they keep their zero init, which is what the released code gets
from ``load_state_dict(strict=False)`` without letting any other key slip through.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from segment_anything.modeling import Sam
from torch import nn

from sum.config import ModelConfig
from sum.io import FetchError, S3Options, atomic_torch_save, display_uri, resolve_local
from sum.model.build import build_sum_model, task_prompt_keys
from sum.model.fast import enable_fast_path

log = logging.getLogger(__name__)

SUM_FORMAT = "sum-checkpoint"
SUM_VERSION = 1
TASK_PROMPT_PREFIX = "prompt_encoder.task_prompt_embedding."
_SHOW = 3  # offending keys named in one error line

# Fields that decide the module tree and tensor shapes. Training flags (use_task_prompt,
# zero_token_no_grad), weights and runtime fields (device, fast_path) may differ.
_COMMON_ARCH_FIELDS = (
    "encoder",
    "img_size",
    "patch_size",
    "prompt_embed_dim",
    "mask_in_chans",
    "decoder_depth",
    "decoder_mlp_dim",
    "decoder_num_heads",
    "num_multimask_outputs",
    "iou_head_depth",
    "iou_head_hidden_dim",
    "num_task_prompts",
)
_ENCODER_ARCH_FIELDS = {
    "vit": ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "encoder_global_attn_indexes", "window_size"),
    "tiny_vit": ("tiny_vit_embed_dims", "tiny_vit_depths", "tiny_vit_num_heads", "tiny_vit_window_sizes"),
}


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the model; the message names the file and keys."""


@dataclass
class Checkpoint:
    """A checkpoint as read: its state dict and, for SUM checkpoints, the stored config and meta."""

    source: str  # the URI as it may be shown in messages
    format: str  # "sam" (plain state dict, SAM or MobileSAM) or "sum-checkpoint"
    state_dict: "OrderedDict[str, torch.Tensor]"
    model_config: Optional[Dict[str, Any]] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def read_checkpoint(
    uri: str | os.PathLike,
    sha256: Optional[str] = None,
    s3: Optional[S3Options] = None,
    cache_dir: str | os.PathLike | None = None,
) -> Checkpoint:
    """Fetch (if remote), verify and unpickle a checkpoint with ``weights_only=True``.

    Raises:
        sum.io.FetchError: missing file, unreachable bucket or host, sha256 mismatch.
        CheckpointError: the file is not a PyTorch checkpoint in a supported format.
    """
    source = display_uri(str(uri))
    path = resolve_local(uri, sha256=sha256, s3=s3, cache_dir=cache_dir)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad bytes; all mean "not a checkpoint"
        raise CheckpointError(f"{source}: {_load_failure(e)}") from None
    return _parse(obj, source)


def _load_failure(err: Exception) -> str:
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"holds a {refused.group(1)} object, which torch.load(weights_only=True) refuses"
    # torch's weights-only errors are paragraphs of advice; the cause follows "WeightsUnpickler error:".
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    cause = f"{type(err).__name__}: {first[:120]}" if first else type(err).__name__
    return f"not a readable PyTorch checkpoint (corrupt or truncated: {cause})"


def _parse(obj: Any, source: str) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, expected a state dict or a SUM checkpoint dict")
    if "format" in obj:
        if obj["format"] != SUM_FORMAT:
            raise CheckpointError(f"{source}: format {obj['format']!r}, expected {SUM_FORMAT!r} or a plain state dict")
        for key in ("version", "model_config", "state_dict"):
            if key not in obj:
                raise CheckpointError(f"{source}: SUM checkpoint without {key!r}")
        version = obj["version"]
        if not isinstance(version, int) or not 1 <= version <= SUM_VERSION:
            raise CheckpointError(f"{source}: SUM checkpoint version {version!r}, this code reads 1..{SUM_VERSION}")
        if not isinstance(obj["model_config"], Mapping):
            raise CheckpointError(f"{source}: 'model_config' is a {type(obj['model_config']).__name__}, expected a dict")
        meta = obj.get("meta") or {}
        return Checkpoint(
            source, SUM_FORMAT, _tensors(obj["state_dict"], source, "state_dict"), dict(obj["model_config"]), dict(meta)
        )
    return Checkpoint(source, "sam", _tensors(obj, source, None))


def _tensors(sd: Any, source: str, where: Optional[str]) -> "OrderedDict[str, torch.Tensor]":
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: {where!r} is a {type(sd).__name__}, expected a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: {_count(bad, 'entry', 'entries')} that are not tensors ({_first(bad)}); "
            "expected a SAM state dict or a SUM checkpoint"
        )
    if not sd:
        raise CheckpointError(f"{source}: empty state dict")
    return OrderedDict(sd)


def _first(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def _count(keys: List[str], one: str, many: str) -> str:
    return f"{len(keys)} {one if len(keys) == 1 else many}"


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(n) for n in t.shape) or "scalar"


def is_task_prompt_key(key: str) -> bool:
    """Whether ``key`` is a task-prompt embedding's (spec §2.2), the one part SAM does not have."""
    return key.startswith(TASK_PROMPT_PREFIX)


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Copy ``state_dict`` into ``model``, strict on every key except the task prompt.

    Raises:
        CheckpointError: one line naming ``source`` and the first offending keys of each kind
            (unexpected, missing, wrong shape).
    """
    own = model.state_dict()
    optional = set(task_prompt_keys(model))
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict and k not in optional]
    shape = [
        f"{k} {_shape(state_dict[k])} vs model {_shape(own[k])}"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected key', 'unexpected keys')} ({_first(unexpected)})")
    if missing:
        problems.append(f"{_count(missing, 'missing key', 'missing keys')} ({_first(missing)})")
    if shape:
        problems.append(f"{_count(shape, 'shape mismatch', 'shape mismatches')} ({_first(shape)})")
    if problems:
        raise CheckpointError(f"{source}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)
    prompt_encoder = getattr(model, "prompt_encoder", None)
    if getattr(prompt_encoder, "use_task_prompt", True) is False:
        nonzero = nonzero_task_prompts(state_dict)
        if nonzero:
            # use_task_prompt=False means the model is SAM (spec §2.2): the loaded vectors must not act.
            log.warning("%s: use_task_prompt is off; zeroing the loaded task prompt ids %s", source, nonzero)
            with torch.no_grad():
                for emb in prompt_encoder.task_prompt_embedding:
                    emb.weight.zero_()
    return model


def nonzero_task_prompts(state_dict: Mapping[str, torch.Tensor]) -> List[int]:
    ids = []
    for k, v in state_dict.items():
        if is_task_prompt_key(k) and bool(torch.any(v != 0)):
            ids.append(int(k[len(TASK_PROMPT_PREFIX) :].split(".")[0]))
    return sorted(ids)


def config_to_dict(cfg: ModelConfig) -> Dict[str, Any]:
    """A ``ModelConfig`` as plain data (what a SUM checkpoint stores)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"model config is a {type(cfg).__name__}, expected a ModelConfig")


def config_from_dict(raw: Mapping[str, Any], source: str) -> ModelConfig:
    """The ``ModelConfig`` stored in a SUM checkpoint; unknown fields fail naming the field."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{source}: model_config has unknown fields ({_first(unknown)})")
    return ModelConfig(**dict(raw))


def architecture_diff(stored: Mapping[str, Any], cfg: ModelConfig) -> List[str]:
    """Architecture fields on which ``stored`` (a checkpoint's config) and ``cfg`` differ."""
    want = config_to_dict(cfg)
    encoder = stored.get("encoder", ModelConfig.encoder)
    fields = _COMMON_ARCH_FIELDS + _ENCODER_ARCH_FIELDS.get(want["encoder"], ()) + _ENCODER_ARCH_FIELDS.get(encoder, ())
    defaults = config_to_dict(ModelConfig())
    diffs = []
    for name in dict.fromkeys(fields):
        a, b = stored.get(name, defaults[name]), want[name]
        if _norm(a) != _norm(b):
            diffs.append(f"{name} (checkpoint {a!r}, config {b!r})")
    return diffs


def _norm(v: Any) -> Any:
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_plain(value: Any, where: str) -> None:
    """``torch.load(weights_only=True)`` reads only tensors and plain data: refuse anything else."""
    if value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}, expected str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__}: store plain data (str, number, bool, None, list, dict)")


def save_sum_checkpoint(
    model: nn.Module,
    cfg: ModelConfig,
    path: str | os.PathLike,
    meta: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model`` (task prompt included) and its architecture config as a SUM checkpoint.

    The stored config has ``checkpoint`` and ``checkpoint_sha256`` cleared: the weights are this
    file. ``meta`` (step, metrics, git revision ...) must be plain data. Written atomically.

    Returns:
      ``path``.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    stored = config_to_dict(cfg)
    stored.update(checkpoint=None, checkpoint_sha256=None)
    meta = dict(meta or {})
    check_plain(meta, "meta")
    check_plain(stored, "model_config")
    state_dict = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    obj = {
        "format": SUM_FORMAT,
        "version": SUM_VERSION,
        "model_config": stored,
        "state_dict": state_dict,
        "meta": meta,
    }
    path = Path(path)
    atomic_torch_save(obj, path)
    log.info("saved SUM checkpoint %s (%d tensors)", path, len(state_dict))
    return path


def resolve_device(name: str) -> torch.device:
    """``model.device``: ``auto`` is CUDA when available, else CPU; anything else as torch reads it.
    A ValueError names ``model.device`` for a name torch does not read or a CUDA device not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
        raise ValueError(f"model.device={name!r}: this machine has {count} CUDA device(s) (use auto or cpu)")
    return device


def load_model(
    cfg: Optional[ModelConfig] = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    *,
    sha256: Optional[str] = None,
    s3: Optional[S3Options] = None,
    cache_dir: str | os.PathLike | None = None,
    device: Optional[str] = None,
    fast_path: Optional[str] = None,
) -> Sam:
    """The SUM model with its weights, on its device, with the encoder fast path (spec §2; the fast
    path is `sum.model.fast`): what every stage calls to get a ready-to-run model.

    Without ``checkpoint``: ``cfg``'s architecture with ``cfg.checkpoint`` loaded (sha256
    ``cfg.checkpoint_sha256``); a SUM checkpoint's stored config must agree with ``cfg`` on every
    architecture field; no ``cfg.checkpoint`` gives random weights from the torch seed (tests).
    With ``checkpoint``: a SUM checkpoint builds the architecture it stores; a plain SAM or
    MobileSAM state dict is loaded into ``cfg``'s architecture.

    Arguments:
      cfg (ModelConfig): the model config; may be None for a SUM ``checkpoint``.
      checkpoint: local path, ``s3://bucket/key``, ``https://`` or ``http://``, or a `Checkpoint`
        that `read_checkpoint` returned (for callers that also need its meta).
      sha256: expected sha256 of the ``checkpoint`` file, checked before it is unpickled.
      s3: S3 endpoint and credentials; ``None`` uses the AWS environment.
      cache_dir: where remote files are downloaded (default ``$SUM_CACHE_DIR`` or ``~/.cache/sum``).
      device (str): auto | cpu | cuda[:N]; default ``cfg.device``, "cpu" without ``cfg``.
      fast_path (str): auto | on | off; default ``cfg.fast_path``, "off" without ``cfg``.

    Returns:
      (Sam): the model on ``device``, in eval mode; its prompt encoder is a `TaskPromptEncoder`.

    Raises:
      sum.io.FetchError, CheckpointError: one line naming the checkpoint and what is wrong.
      ValueError: naming ``device`` or ``fast_path`` when it is none of the values above.
    """
    if cfg is None and checkpoint is None:
        raise ValueError("load_model: give a model config, a checkpoint or both")
    if sha256 is not None and (checkpoint is None or isinstance(checkpoint, Checkpoint)):
        raise ValueError("load_model: sha256 checks a checkpoint file; cfg.checkpoint_sha256 is cfg.checkpoint's")
    mode = fast_path if fast_path is not None else cfg.fast_path if cfg is not None else "off"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{'model.' if fast_path is None else ''}fast_path={mode!r}: expected auto, on or off")
    device = resolve_device(device if device is not None else cfg.device if cfg is not None else "cpu")
    if checkpoint is None:
        model = _from_config(cfg, s3, cache_dir)
    else:
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = read_checkpoint(checkpoint, sha256=sha256, s3=s3, cache_dir=cache_dir)
        model = _from_checkpoint(checkpoint, cfg)
    model = model.to(device)
    plan = enable_fast_path(model, mode, device=device, compile=cfg is not None and cfg.compile_encoder)
    log.info("model on %s, fast path %s", device, plan)
    return model


def _from_config(cfg: ModelConfig, s3: Optional[S3Options], cache_dir: str | os.PathLike | None) -> Sam:
    model = build_sum_model(cfg)
    if not cfg.checkpoint:
        return model
    try:
        ckpt = read_checkpoint(cfg.checkpoint, sha256=cfg.checkpoint_sha256, s3=s3, cache_dir=cache_dir)
    except (FetchError, CheckpointError) as e:
        raise type(e)(f"model.checkpoint: {e}") from None  # the key too: the file came from the config
    if ckpt.model_config is not None:
        diffs = architecture_diff(ckpt.model_config, cfg)
        if diffs:
            raise CheckpointError(
                f"{ckpt.source}: model config {cfg.name!r} differs from the checkpoint's: {'; '.join(diffs)}"
            )
    apply_state_dict(model, ckpt.state_dict, ckpt.source)
    log.info("built %s from %s (%s)", cfg.name, ckpt.source, ckpt.format)
    return model.eval()  # after the weights: TinyViT caches its attention biases on eval()


def _from_checkpoint(ckpt: Checkpoint, cfg: Optional[ModelConfig]) -> Sam:
    if ckpt.model_config is not None:
        stored = config_from_dict(ckpt.model_config, ckpt.source)
        try:
            model = build_sum_model(stored)
        except (ValueError, TypeError) as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(f"{ckpt.source}: stored model config does not build: {first}") from None
    elif cfg is None:
        raise CheckpointError(f"{ckpt.source}: a plain SAM state dict carries no model config: pass the config it fits")
    else:
        model = build_sum_model(cfg)
    apply_state_dict(model, ckpt.state_dict, ckpt.source)
    log.info("loaded %s (%s, %d tensors)", ckpt.source, ckpt.format, len(ckpt.state_dict))
    return model.eval()
