from raymoe.config.loader import PRESETS, config_from_yaml, load_config, to_dict, to_yaml
from raymoe.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    MtpConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RoutingConfig,
    RunConfig,
    ScheduleConfig,
)

__all__ = [
    "PRESETS",
    "Config",
    "DataConfig",
    "ModelConfig",
    "MtpConfig",
    "OptimConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RoutingConfig",
    "RunConfig",
    "ScheduleConfig",
    "config_from_yaml",
    "load_config",
    "to_dict",
    "to_yaml",
]
