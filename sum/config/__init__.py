"""Structured configs (dataclasses) for every stage, registered with Hydra's ConfigStore.

``params/`` holds the Hydra config groups; ``params.yaml`` is their composition for the embedded
default, committed so that ``dvc repro`` (which never composes) reads the same values. Stages read
it through `load_params`; the CLI composes ``params/`` with overrides through `compose`. Modules never
read config: ``build_*`` functions turn these dataclasses into objects. The schema of the data room
is in `sum.config.data`, the others in `sum.config.stages`, reading and composing in `sum.config.compose`.
"""

from sum.config.compose import (
    PARAMS_DIR,
    ConfigError,
    compose,
    load_params,
    params_yaml_text,
    register_configs,
    to_yaml,
    validated,
)
from sum.config.data import (
    ROLES,
    AcquireConfig,
    DataConfig,
    DatasetConfig,
    PhotosConfig,
    RealBenchConfig,
    S3Config,
    SourceConfig,
    StorageConfig,
    ValidateConfig,
    WorldConfig,
    WorldSetConfig,
)
from sum.config.stages import (
    Config,
    DemoConfig,
    EmbedConfig,
    EvalConfig,
    FlowConfig,
    MethodConfig,
    ModelConfig,
    PseudoConfig,
    RecipeConfig,
    RefineConfig,
    RegistryConfig,
    SeedsConfig,
    TrackingConfig,
    TrainConfig,
    UncertaintyConfig,
)
