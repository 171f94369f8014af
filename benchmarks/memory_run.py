"""One small paper-path-like run in this process, then its peak RSS as JSON (for
``test_bench_memory.py``, which starts it in a fresh subprocess per measurement).

``python benchmarks/memory_run.py N_EVAL BOUND OUT [METRICS [MODELS]]``: synthetic source at 256 px,
fake 256 px generators (benchmarks/memory_fakes: 1x1 convolutions with the paper models' input size
and targets; default the smallest set, ``mem-stargan`` with StarGAN's 5 targets), one defense, one
retraining round with its control, batches of 8; ``BOUND`` is ``MeasureMixin.clean_cache_bytes``
("none": every entry in memory for the whole run; "0": every model's clean forgeries on disk, as
at paper scale, where one model's exceed the default budget); ``METRICS`` and ``MODELS``
comma-separated lists (default: the paper config's metrics).

``MAP_ABOVE`` in the environment sets :data:`tsdf_bench.harness.mapped.MAP_ABOVE_BYTES` ("0": every
set of photos, protected photos and crops a memory-mapped file, as at paper scale, where each is
over the default 256 MiB; "none": all in memory).

Besides the process's peak (``peak_rss_bytes``, which counts the mapped sets' resident pages) it
reports the peak of its anonymous memory (``peak_anon_bytes``: ``RssAnon`` read every 2 ms by a
thread; the mapped sets' pages are the files', not in it) and the measuring path's own: before each
``MeasureMixin.measure`` call the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``,
Linux) and after it the mark minus the RSS before the call is that cell's growth; the largest
over the cells is ``measure_peak_bytes`` (None where the mark cannot be reset).
"""
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PAPER_METRICS = "forgery,invisibility,detection,crop_yield,retrained_clean_mse"
SMALLEST_MODELS = "mem-stargan"
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
names = {models}
train = false

[defenses]
names = ["fake-shift"]

[detectors]
names = ["fake-det"]
attacker = "fake-det"

[adaptations]
names = ["fake-retrain"]
g_steps = 2

[metrics]
names = {metrics}
"""


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class AnonPeak(threading.Thread):
    """The largest ``RssAnon`` (bytes) seen, read every ``every`` seconds until :meth:`stop`."""

    def __init__(self, every: float = 0.002):
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, (_status_kb("RssAnon") or 0) * 1024)
            time.sleep(self.every)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def main(n_eval: int, bound: str, out: Path, metrics: str = PAPER_METRICS, models: str = SMALLEST_MODELS) -> dict:
    from tsdf_bench.config import load_config
    from tsdf_bench.harness import mapped, run_config
    from tsdf_bench.harness.measure import MeasureMixin

    try:
        from tsdf_bench.harness.streaming import release_freed_memory
    except ImportError:  # a tree from before the streaming (for its figures)
        def release_freed_memory():
            return None
    from tsdf_bench.plugins import Registry

    torch.set_num_threads(1)
    MeasureMixin.clean_cache_bytes = None if bound == "none" else int(bound)
    map_above = os.environ.get("MAP_ABOVE")
    if map_above:
        mapped.MAP_ABOVE_BYTES = None if map_above == "none" else int(map_above)
    cells, marks = [], []  # per cell: growth over the RSS before it; every peak mark read (kB)
    real = MeasureMixin.measure

    def measured(self, *args):
        marks.append(_status_kb("VmHWM"))  # the peak since the last reset, before resetting it
        release_freed_memory()  # the RSS before the call: what is held, not what the C heap kept
        before = _status_kb("VmRSS")
        ok = before is not None and _reset_peak()
        try:
            return real(self, *args)
        finally:
            if ok:
                marks.append(_status_kb("VmHWM"))
                cells.append((marks[-1] - before) * 1024)

    MeasureMixin.measure = measured
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.toml"
    names = [m for m in metrics.split(",") if m]
    model_names = [m for m in models.split(",") if m]
    path.write_text(CONFIG.format(n_eval=n_eval, metrics=json.dumps(names), models=json.dumps(model_names)))
    registry = Registry(plugins_dirs=[HERE.parent / "tests" / "harness_fakes", HERE / "memory_fakes"],
                        entry_points=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anon = AnonPeak()
    anon.start()
    t0 = time.perf_counter()
    result = run_config(load_config(path), registry, output=out / "runs", progress=False, log=lambda m: None,
                        figures=False)
    seconds = time.perf_counter() - t0
    anon_peak = anon.stop()
    rows = result.rows
    # resetting the mark also resets ru_maxrss: the process's peak is the largest mark read
    marks = [m for m in marks + [_status_kb("VmHWM")] if m is not None]
    peak = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *marks])
    return {"n_eval": n_eval, "bound": bound, "metrics": names, "models": model_names,
            "peak_rss_bytes": peak * 1024, "peak_anon_bytes": anon_peak or None, "map_above": map_above,
            "rss_before_run_bytes": base * 1024, "measure_peak_bytes": max(cells) if cells else None,
            "measure_cells": len(cells), "seconds": seconds, "rows": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows)}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), *sys.argv[4:6])))
