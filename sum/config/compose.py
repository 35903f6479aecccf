"""Reading and composing the config: ``params.yaml`` (what ``dvc repro`` reads), ``params/`` with
Hydra overrides (what ``dvc exp run -S`` composes), validated against the schema with one error
naming the file and the key. Hydra is imported only to compose (stages read ``params.yaml``
without it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sum.config.data import ROLES, DataConfig
from sum.config.stages import Config, EvalConfig, MethodConfig, ModelConfig, TrainConfig
from sum.tasks import TASK_IDS

PARAMS_DIR = Path(__file__).resolve().parent.parent.parent / "params"


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (``params/config.yaml`` extends them)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    # Schemas are registered for Hydra users (``defaults: [config_schema, ...]``); params/config.yaml
    # does not list them so that DVC's own Hydra composition (``dvc exp run``) works without them,
    # and `load_params`/`compose` validate against `Config` instead.
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("method", MethodConfig),
        ("train", TrainConfig),
        ("eval", EvalConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def validated(raw: Any, source: str, schema: type = Config) -> Any:
    """``raw`` (a mapping, a DictConfig) merged onto ``schema``'s defaults, resolved, as a ``schema``
    instance: the one params-against-schema merge of the library.

    Raises:
      ConfigError: "<source>: bad config key '<key>': ..." for an unknown key or a value of the wrong type.
    """
    schema = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad config key {key!r}: {msg}") from None
    if isinstance(cfg, Config):
        check_values(cfg, source)
    return cfg  # type: ignore[return-value]


def check_values(cfg: Config, source: str) -> None:
    """Refuse the values a type cannot: a dataset's or world set's ``role`` outside `ROLES`, a
    dataset ``task`` outside `sum.tasks.TASK_IDS`, ``train.iterations`` below 1.

    Raises:
      ConfigError: "<source>: bad value <key>=<value>: expected ..." for the first one found.
    """
    def refuse(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{source}: bad value {key}={value!r}: expected {expected}")

    for name, d in cfg.data.datasets.items():
        if d.role not in ROLES:
            refuse(f"data.datasets.{name}.role", d.role, f"one of {', '.join(ROLES)}")
        if d.task not in TASK_IDS:
            refuse(f"data.datasets.{name}.task", d.task, f"one of {', '.join(TASK_IDS)}")
    for name, s in cfg.data.world.sets.items():
        if s.role not in ROLES:
            refuse(f"data.world.sets.{name}.role", s.role, f"one of {', '.join(ROLES)}")
    if cfg.train.iterations < 1:
        refuse("train.iterations", cfg.train.iterations, "at least 1 (optimiser steps)")


def one_line(message: str) -> str:
    """A multi-line library message (Hydra's) as one line: its lines joined with " ", a list of
    tab-indented options with ", ", the config search path left out (e.g. "Could not override
    'foo.bar'. To append to your config use +foo.bar=1")."""
    out = ""
    for line in message.split("Config search path:")[0].splitlines():
        item = line.strip()
        if item:
            out += (", " if line.startswith("\t") and not out.endswith(":") else " ") + item if out else item
    return out


def load_params(path: str | os.PathLike = "params.yaml") -> Config:
    """Read the composed ``params.yaml`` (what DVC stages use) into a validated `Config`.

    Raises:
        ConfigError: naming the file and the key when a key is unknown or has the wrong type.
        FileNotFoundError: naming the file when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run `sumseg params` to compose it)")
    return validated(OmegaConf.load(path), str(path))


def _hydra_compose(overrides: List[str] | None, config_dir: str | os.PathLike | None) -> Tuple[DictConfig, str]:
    """The plain Hydra composition of ``params/config.yaml`` with overrides, as ``dvc exp run``
    composes it (`dvc.utils.hydra.compose_and_dump`: ``version_base=None``, the installed Hydra's
    defaults), and a name for it in error messages."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    config_dir = Path(config_dir or PARAMS_DIR).resolve()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg: DictConfig = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as e:
        raise ConfigError(f"{config_dir}: {one_line(str(e))}") from None
    return cfg, f"{config_dir}/config.yaml with overrides {list(overrides or [])}"


def compose(overrides: List[str] | None = None, config_dir: str | os.PathLike | None = None) -> Config:
    """Compose ``params/config.yaml`` with Hydra overrides (``model=vit_b``, ``train.lr=1e-4``)."""
    return validated(*_hydra_compose(overrides, config_dir))


def params_yaml_text(overrides: List[str] | None = None, config_dir: str | os.PathLike | None = None) -> str:
    """The text of ``params.yaml``: the plain Hydra composition of ``params/`` (validated against
    the schema first), exactly what ``dvc exp run`` writes (`dvc.utils.hydra.compose_and_dump`).

    Not the schema-completed config: defaults that ``params/`` does not list would be keys DVC's own
    composition lacks, so every ``dvc exp run -S`` would look like a change of the params of every
    stage (``model``, ``data.acquire``) and re-run the whole pipeline.
    """
    cfg, source = _hydra_compose(overrides, config_dir)
    validated(cfg, source)  # one clear error naming a bad key
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def to_yaml(cfg: Config) -> str:
    """The YAML text of a config, as ``params.yaml`` holds it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)
