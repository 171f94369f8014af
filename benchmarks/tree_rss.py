"""Run a command and report its wall time and the peak of the summed RSS of its process tree.

``python benchmarks/tree_rss.py -- tsdf-bench run configs/demo.toml`` prints one JSON line at the
end: ``{"wall_s", "peak_tree_rss_mib", "peak_tree_pss_mib", "peak_processes", "process_peaks_mib",
"rc"}`` (``process_peaks_mib``: each process's own RSS peak, largest first).  With ``[run] workers = N`` a
run is N + 1 processes, so ``getrusage``'s maxrss (one process) would understate the footprint:
this samples ``/proc/<pid>/status`` of the command and all its descendants every 0.2 s (a peak
shorter than that can be missed).  Linux only.

Summed RSS counts the pages of shared libraries once per process that maps them (torch's CUDA
build alone maps ~440 MiB of library pages in every process), so it overstates what N + 1
processes use together.  ``peak_tree_pss_mib`` is the peak of the summed PSS (proportional set
size, ``/proc/<pid>/smaps_rollup``: each shared page divided among the processes that map it),
the tree's actual share of physical memory.  Reading it costs ~15 ms per process (and takes the
process's memory-map lock), so it is read at each new RSS peak and every ``PSS_EVERY`` samples
only: reading it every 0.2 s slowed a 2-worker demo run from 8.1 to 9.8 min.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PSS_EVERY = 10  # samples (2 s)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _field_kib(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _rss_kib(pid: int) -> int:
    return _field_kib(f"/proc/{pid}/status", "VmRSS:")


def _pss_kib(pid: int) -> int:
    return _field_kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def tree_rss_kib(root: int) -> dict[int, int]:
    """RSS in KiB of ``root`` and each of its descendants, by pid."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = _rss_kib(pid)
        todo += _children(pid)
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak, peak_pss, peak_n, own, tick = 0, 0, 0, {}, 0
    while proc.poll() is None:
        tree = tree_rss_kib(proc.pid)
        new_peak = sum(tree.values()) > peak
        if new_peak:
            peak, peak_n = sum(tree.values()), len(tree)
        if new_peak or tick % PSS_EVERY == 0:  # ~15 ms per process and read: not every tick
            peak_pss = max(peak_pss, sum(_pss_kib(pid) for pid in tree))
        tick += 1
        for pid, rss in tree.items():
            own[pid] = max(own.get(pid, 0), rss)
        time.sleep(0.2)
    result = {"wall_s": round(time.perf_counter() - start, 1), "peak_tree_rss_mib": round(peak / 1024, 1),
              "peak_tree_pss_mib": round(peak_pss / 1024, 1), "peak_processes": peak_n,
              "process_peaks_mib": sorted((round(v / 1024, 1) for v in own.values()), reverse=True)[:8],
              "rc": proc.returncode}
    print(json.dumps(result), flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
