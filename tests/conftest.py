import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# One intra-op thread for the whole suite: the test models are tiny, and on a 2-core machine
# two threads thrash (measured 20-40x slower for small convolutions under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache unless it asks for the shared session cache."""
    if "TSDF_BENCH_CACHE" not in os.environ or os.environ.get("TSDF_BENCH_TEST_ISOLATE", "1") == "1":
        monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))


def run_cli(*args, env=None, cwd=None):
    """Run ``tsdf-bench`` in a subprocess (fresh plugin discovery), returning CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tsdf_bench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=600)
