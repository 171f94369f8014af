"""Timing, memory and FLOP helpers shared by the benchmarks and ``cuda_check.py``.

:func:`compare` times an optimised function with pytest-benchmark and its straightforward
counterpart the same way, recording both and their ratio; :func:`peak_memory`,
:func:`flops_of` and :func:`throughput` add memory, FLOPs and the achieved fraction of a GPU's
bf16 peak.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device="cpu", repeat: int = 2, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs (after one warm-up run if ``warmup``)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(benchmark, optimized, straightforward, device="cpu", repeat: int = 2, warmup: bool = True,
            **info) -> None:
    """Benchmark ``optimized`` with pytest-benchmark (``repeat`` rounds), then time
    ``straightforward`` the same way (median wall time of as many rounds, after the same warm-up)
    and record both and their ratio ``speedup`` = straightforward / optimized."""

    def timed():
        optimized()
        sync(device)

    benchmark.pedantic(timed, rounds=repeat, iterations=1, warmup_rounds=1 if warmup else 0)
    fast = benchmark.stats.stats.median
    slow = seconds(straightforward, device, repeat, warmup)
    benchmark.extra_info.update(optimized_s=round(fast, 5), straightforward_s=round(slow, 5),
                                speedup=round(slow / fast, 3), **info)


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 20  # bytes on macOS, KiB on Linux


def peak_memory(fn=None, device="cpu") -> dict:
    """Peak memory of ``fn`` (run once here; ``None``: of what ran since the last CUDA reset).

    On CUDA ``torch.cuda.max_memory_allocated`` (MiB; reset first when ``fn`` is given).  On CPU
    the process's peak resident set (``getrusage`` maxrss, MiB) -- a high-water mark of the whole
    process, so an upper bound -- and how much ``fn`` raised it."""
    if torch.device(device).type == "cuda":
        if fn is not None:
            torch.cuda.reset_peak_memory_stats()
            fn()
        torch.cuda.synchronize()
        return {"peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
    before = _maxrss_mib()
    if fn is not None:
        fn()
    after = _maxrss_mib()
    return {"peak_rss_mib": round(after, 1), "peak_rss_growth_mib": round(after - before, 1)}


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP is counted as "Global"."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flops_of(fn) -> int:
    """FLOPs of one call of ``fn`` (``torch.utils.flop_counter``: matmuls and convolutions, forward
    and backward; elementwise work is not counted, so the fraction of peak is a lower bound).

    Only the total is needed, so the counter's per-module attribution is switched off: its module
    hooks make ``torch.autograd.grad`` fail on graphs where a leaf tensor enters a module (HiSD's).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return int(counter.get_total_flops())


def throughput(flops: int, seconds: float, device) -> dict:
    """Achieved TFLOP/s and, on a GPU whose bf16 peak is known, the fraction of that peak."""
    out = {"flops": flops, "achieved_tflops": round(flops / seconds / 1e12, 4)}
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        out["gpu"] = name
        if peak:
            out["fraction_of_bf16_peak"] = round(flops / seconds / peak, 5)
    return out
