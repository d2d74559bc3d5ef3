"""Typed configs, validated at the edge: the blocks of a trial (``models``), of a sweep (``sweep``),
YAML reading and ``--set`` overrides (``files``), and the error that names every problem (``base``).

This package imports nothing else of the project; composing a sweep from ``configs/`` needs the
registries of datasets, methods and backbones and lives in ``unmix_ray.compose``.
"""

from unmix_ray.config.base import ConfigError, Model, build, invalid
from unmix_ray.config.files import CONFIG_DIR, apply_overrides, deep_merge, read_yaml
from unmix_ray.config.models import (
    AugmentConfig,
    DatasetConfig,
    EvalConfig,
    MethodConfig,
    MixtureConfig,
    MixtureType,
    OptimConfig,
    TrainConfig,
    TrialConfig,
)
from unmix_ray.config.sweep import AshaSettings, GridConfig, Sweep, SweepConfig, TuneSettings

__all__ = [
    "CONFIG_DIR", "AshaSettings", "AugmentConfig", "ConfigError", "DatasetConfig", "EvalConfig", "GridConfig",
    "MethodConfig", "MixtureConfig", "MixtureType", "Model", "OptimConfig", "Sweep", "SweepConfig", "TrainConfig",
    "TrialConfig", "TuneSettings", "apply_overrides", "build", "deep_merge", "invalid", "read_yaml",
]
