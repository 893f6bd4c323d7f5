from raymoe.config.loader import PRESETS, load_config, to_dict, to_yaml
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
    "load_config",
    "to_dict",
    "to_yaml",
]
