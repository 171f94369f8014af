"""Attacker adaptation interface (the plugins live in ``tsdf_bench_plugins.adaptations``)."""
from .base import Adaptation

__all__ = ["Adaptation"]
