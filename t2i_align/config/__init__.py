"""Typed configuration: sections (`sections.py`) loaded from YAML with dotted overrides (`loader.py`)."""
from .loader import config_to_dict, load_config, save_config
from .sections import (Config, ConfigError, DataConfig, FieldError, LoraConfig, ModelConfig, ObjectiveConfig,
                       PpdConfig, RaftConfig, SeppoConfig, TrackingConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "FieldError", "LoraConfig", "ModelConfig", "ObjectiveConfig",
           "PpdConfig", "RaftConfig", "SeppoConfig", "TrackingConfig", "TrainConfig", "config_to_dict", "load_config",
           "save_config"]
