"""One small paper-path-like run in this process, then its peak RSS as JSON (for
``test_bench_memory.py``, which starts it in a fresh subprocess per measurement).

``python benchmarks/memory_run.py N_EVAL BOUND OUT``: synthetic source at 256 px, three fake
256 px generators (benchmarks/memory_fakes), two defenses, one retraining round with its control,
the real ``forgery`` metric; ``BOUND`` is ``MeasureMixin.clean_cache_bytes`` ("none": every
model's clean forgeries for the whole run, the behaviour before the bound; "0": one model at a
time, as at paper scale, where one model's forgeries exceed the default budget).
"""
import json
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = """
[run]
name = "memory"
scale = "smoke"
seeds = [0]
device = "cpu"
rounds = 1

[data]
source = "synthetic"
image_size = 256
n_train_defense = 4
n_collect = 16
n_eval = {n_eval}
batch_size = 8

[models]
names = ["mem-stargan", "mem-attentiongan", "mem-hisd"]
train = false

[defenses]
names = ["fake-shift", "fake-perimage"]

[detectors]
names = ["fake-det"]
attacker = "fake-det"

[adaptations]
names = ["fake-retrain"]
g_steps = 2

[metrics]
names = ["forgery", "fake-metric"]
"""


def main(n_eval: int, bound: str, out: Path) -> dict:
    from tsdf_bench.config import load_config
    from tsdf_bench.harness import run_config
    from tsdf_bench.harness.measure import MeasureMixin
    from tsdf_bench.plugins import Registry

    torch.set_num_threads(1)
    MeasureMixin.clean_cache_bytes = None if bound == "none" else int(bound)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.toml"
    path.write_text(CONFIG.format(n_eval=n_eval))
    registry = Registry(plugins_dirs=[HERE.parent / "tests" / "harness_fakes", HERE / "memory_fakes"],
                        entry_points=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = run_config(load_config(path), registry, output=out / "runs", progress=False, log=lambda m: None,
                        figures=False)
    seconds = time.perf_counter() - t0
    rows = result.rows
    return {"n_eval": n_eval, "bound": bound, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_run_bytes": base * 1024, "seconds": seconds, "rows": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows)}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))))
