"""Deepfake model interface (the plugins live in ``tsdf_bench_plugins.models``)."""
from .base import DeepfakeModel, SCALES

__all__ = ["DeepfakeModel", "SCALES"]
