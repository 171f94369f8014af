"""Peak RSS of a small paper-path-like run at two sizes of n_eval (issue 13: bounded memory).

Each measurement is a fresh subprocess (``memory_run.py``: synthetic source at 256 px, three fake
256 px generators with 5/5/1 targets, two defenses, one retraining round with its control, the
real ``forgery`` metric) that reports ``getrusage(RUSAGE_SELF).ru_maxrss``.  ``extra_info`` holds
both peaks, the peaks minus the process's RSS before the run (imports), and their ratio against the
ratio of the n_eval values.  The clean-forgery cache's budget is 0 here (one model at a time, as at
paper scale where one model's forgeries exceed the default 1 GB), so the run's
memory no longer grows with models x n_eval; what still grows with n_eval is the per-cell
measurement (one model's forgeries of the eval photos, and the forgery metric's float64 copies
for PSNR/SSIM), see the README's research section.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SIZES = (16, 64)


def _measure(n_eval: int, bound: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "memory_run.py"), str(n_eval), bound, str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.paper_scale
def test_peak_rss_does_not_scale_with_models_times_n_eval(benchmark, tmp_path):
    results = {}

    def both():
        for n in SIZES:
            results[n] = _measure(n, os.environ.get("TSDF_BENCH_CLEAN_CACHE_BYTES", "0"), tmp_path / f"n{n}")

    benchmark.pedantic(both, rounds=1, iterations=1)
    small, large = (results[n] for n in SIZES)
    assert small["ok"] == small["rows"] and large["ok"] == large["rows"]
    run_small = small["peak_rss_bytes"] - small["rss_before_run_bytes"]
    run_large = large["peak_rss_bytes"] - large["rss_before_run_bytes"]
    benchmark.extra_info.update(
        n_eval=list(SIZES), image_px=256, models=["mem-stargan (5 targets)", "mem-attentiongan (5)", "mem-hisd (1)"],
        peak_rss_bytes=[small["peak_rss_bytes"], large["peak_rss_bytes"]],
        run_rss_bytes=[run_small, run_large], seconds=[small["seconds"], large["seconds"]],
        peak_ratio=large["peak_rss_bytes"] / small["peak_rss_bytes"], run_ratio=run_large / run_small,
        n_eval_ratio=SIZES[1] / SIZES[0])
    print(json.dumps(benchmark.extra_info))
