"""Where caches, derived data, trained checkpoints and run outputs live (never in the package).

The cache root is ``$TSDF_BENCH_CACHE`` if set, else ``.tsdf-cache`` in the current directory
(git-ignored).  Run outputs go to the config's ``output`` folder (default ``runs/``).
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TSDF_BENCH_CACHE"


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or ".tsdf-cache").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def cache_dir(*parts: str) -> Path:
    """A sub-folder of the cache, created on demand: ``cache_dir("models", "demo")``."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` for an atomic write (write it, then ``os.replace``): unique
    per process, so two worker processes writing the same cache file never collide."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
