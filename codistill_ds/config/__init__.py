"""The run's configuration: typed sections (`schema`), loading and `--set` (`load`), value checks
before any collective (`validation`), and the generated reference (`doc`).

`from codistill_ds.config import Config, CodistillConfig, load_config, ConfigError` is the
import path users have; it stays.
"""

from codistill_ds.config.load import (
    config_to_dict,
    load_config,
    resolve_path,
    save_config,
)
from codistill_ds.config.schema import (
    PACKAGE_DIR,
    PACKAGE_ROOT,
    BackendConfig,
    CodistillConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)

__all__ = [
    "PACKAGE_DIR", "PACKAGE_ROOT", "BackendConfig", "CodistillConfig", "Config", "ConfigError",
    "DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "config_to_dict", "load_config",
    "resolve_path", "save_config",
]
