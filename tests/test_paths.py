"""Where files go (tsdf_bench.paths): the cache root and atomic-write temporary names."""
import os
import subprocess
import sys
from pathlib import Path

from tsdf_bench.paths import cache_dir, temp_path


def test_cache_dir_is_under_the_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "c"))
    assert cache_dir("models", "demo") == (tmp_path / "c" / "models" / "demo").resolve()
    assert cache_dir("models", "demo").is_dir()


def test_temp_names_differ_between_processes_writing_the_same_file(tmp_path):
    """Two worker processes building the same cache file must not share a temporary name (the
    first pooled demo run lost a worker's models to exactly that race)."""
    target = tmp_path / "data.pt"
    mine = temp_path(target)
    other = subprocess.run([sys.executable, "-c", "import sys; from tsdf_bench.paths import temp_path; "
                            f"print(temp_path(sys.argv[1]))", str(target)], capture_output=True, text=True,
                           env={**os.environ}, check=True).stdout.strip()
    assert mine.parent == Path(other).parent == tmp_path and mine != Path(other)
    assert str(os.getpid()) in mine.name and mine.name.startswith(".") and mine.name.endswith(".tmp")
