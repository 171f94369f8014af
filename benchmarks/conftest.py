"""Shared fixtures and helpers of the pytest-benchmark suite (``tox -e benchmark``, or
``.venv/bin/python -m pytest benchmarks --benchmark-only``; not collected by the normal test run).

Sizes are small so that the whole folder runs in about 5 minutes on 2 CPU cores; paper-scale
benchmarks carry the ``paper_scale`` marker (deselect with ``-m "not paper_scale"``).  Every
benchmark with a straightforward counterpart (the papers' per-target / per-image loops,
recomputed clean outputs) times both the same way in the same run and stores, in
``benchmark.extra_info``: ``optimized_s``, ``straightforward_s`` and ``speedup`` (their ratio).
Peak memory goes into ``extra_info`` too (:func:`measure.peak_memory`).  The timing and counting
helpers live in ``measure.py`` (``benchmarks/cuda_check.py`` uses them too).
"""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "paper_scale: a paper-scale (256 px, random weights) benchmark; slow on CPU")


@pytest.fixture(scope="session", autouse=True)
def _cache_and_threads(tmp_path_factory):
    """Caches in a temporary folder; one torch thread (the machine is shared, and timings of the
    optimised and straightforward paths are compared at equal parallelism)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TSDF_BENCH_CACHE", str(tmp_path_factory.mktemp("tsdf-cache")))
    mp.delenv("TSDF_BENCH_OPTIMIZE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    mp.undo()


@pytest.fixture(scope="session")
def registry():
    from tsdf_bench.plugins import get_registry

    return get_registry()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def faces():
    """Eight embedded face photos at 128 px (``[8, 3, 128, 128]`` in [-1, 1]) with 13 attributes."""
    from tsdf_bench.data.embedded import load_embedded

    return load_embedded(image_size=128, n_train=8, n_eval=0).train
