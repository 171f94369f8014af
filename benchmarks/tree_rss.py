"""Run a command and report its wall time and the peak of the summed RSS of its process tree.

``python benchmarks/tree_rss.py -- tsdf-bench run configs/demo.toml`` prints one JSON line at the
end: ``{"wall_s", "peak_tree_rss_mib", "peak_processes", "process_peaks_mib", "rc"}`` (the last:
each process's own peak, largest first).  With ``[run] workers = N`` a
run is N + 1 processes, so ``getrusage``'s maxrss (one process) would understate the footprint:
this samples ``/proc/<pid>/status`` of the command and all its descendants every 0.2 s (a peak
shorter than that can be missed).  Linux only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


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
    peak, peak_n, own = 0, 0, {}
    while proc.poll() is None:
        tree = tree_rss_kib(proc.pid)
        if sum(tree.values()) > peak:
            peak, peak_n = sum(tree.values()), len(tree)
        for pid, rss in tree.items():
            own[pid] = max(own.get(pid, 0), rss)
        time.sleep(0.2)
    result = {"wall_s": round(time.perf_counter() - start, 1), "peak_tree_rss_mib": round(peak / 1024, 1),
              "peak_processes": peak_n,
              "process_peaks_mib": sorted((round(v / 1024, 1) for v in own.values()), reverse=True)[:8],
              "rc": proc.returncode}
    print(json.dumps(result), flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
