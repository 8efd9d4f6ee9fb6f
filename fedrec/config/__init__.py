"""Config: YAML files -> typed objects, with dotted ``key=value`` CLI overrides and strict validation."""

from fedrec.config.loader import apply_overrides, build_experiment, config_to_dict, load_config, read_yaml
from fedrec.config.schema import ExperimentConfig, ModelSection, PreprocConfig, SyntheticConfig, TrainConfig

__all__ = [
    "ExperimentConfig",
    "ModelSection",
    "PreprocConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_overrides",
    "build_experiment",
    "config_to_dict",
    "load_config",
    "read_yaml",
]
