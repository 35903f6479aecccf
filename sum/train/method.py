"""The training method (spec §9, A13): which `MethodConfig` a run trains, or a checkpoint was
trained with.

``sum`` uses pseudo labels with the uncertainty-aware focal/Dice losses (§5.3-5.4) and
certainty-weighted clicks (§6.2-6.3) and task prompts; ``vanilla`` takes pseudo labels as ground
truth (certainty None everywhere) without task prompts; ``hq_only`` trains on the labeled data
alone, without task prompts. Labeled data always gets the plain SAM loss (§5.5). Training and
evaluation both read the method from here.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sum.config import PARAMS_DIR, MethodConfig


def resolve_method(cfg, method_name: Optional[str]):
    """The `MethodConfig` to train: ``cfg.method`` when ``method_name`` is None or its name, else
    ``cfg.methods[method_name]`` where the config has such a map, else
    ``params/method/<method_name>.yaml`` (the DVC stage trains several methods from one params.yaml).

    Raises:
      ValueError: naming the method and the known ones.
    """
    if method_name is None or method_name == cfg.method.name:
        return cfg.method
    methods = getattr(cfg, "methods", None) or {}
    if method_name in methods:
        return methods[method_name]
    path = PARAMS_DIR / "method" / f"{method_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (PARAMS_DIR / "method").glob("*.yaml"))
        raise ValueError(f"method {method_name!r}: no {path}; known methods: {known}")
    return _method_config(OmegaConf.load(path))


def _method_config(raw):
    """A `MethodConfig` from a mapping (a params/method file or a checkpoint's stored flags),
    checked against the schema: unknown keys and bad values raise OmegaConf's errors."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MethodConfig), raw))


def checkpoint_method(cfg, meta: Dict[str, Any]):
    """The `MethodConfig` a SUM checkpoint was trained with: its ``meta.method_config`` (what
    `finetune` stores, overrides included), else, for checkpoints written before it was stored,
    ``resolve_method(cfg, meta.method)``; None when the meta names no method.

    Raises:
      ValueError: a stored method config with unknown keys or bad values, or an unknown method name.
    """
    stored = meta.get("method_config")
    if stored is None:
        name = meta.get("method")
        return resolve_method(cfg, name) if name else None
    try:
        return _method_config(dict(stored))
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        raise ValueError(f"meta.method_config {stored!r}: {str(e).splitlines()[0]}") from None
