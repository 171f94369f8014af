"""Defense interface (the plugins live in ``tsdf_bench_plugins.defenses``)."""
from .base import Defense, UniversalDefense, load_perturbation, save_perturbation

__all__ = ["Defense", "UniversalDefense", "save_perturbation", "load_perturbation"]
