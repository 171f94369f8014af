"""tsdf-bench: a benchmark for active defenses against deepfakes, retraining attackers included.

Public API for plugin authors: :data:`hookimpl` and the typed records.
"""
from .errors import (CheckpointError, ConfigError, ImageError, PluginError, TsdfBenchError,
                     UnknownNameError)
from .plugins import Registry, get_registry, hookimpl
from .records import (AdaptationEntry, DefenseEntry, DetectorEntry, MetricEntry, ModelEntry, lazy,
                      PluginEntry)

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "Registry", "get_registry", "PluginEntry", "DefenseEntry", "ModelEntry",
    "DetectorEntry", "AdaptationEntry", "MetricEntry", "lazy", "TsdfBenchError", "PluginError",
    "UnknownNameError", "ConfigError", "ImageError", "CheckpointError", "__version__",
]
