"""A whole grid end to end, three ways in one run: the local executor with the optimisations off
(the papers' straightforward loops), the local executor with them on, and the Ray executor with
them on (one task per cell over a local Ray instance, one torch thread per worker).

The grid is ``configs/smoke.toml`` (seconds) unless ``TSDF_BENCH_GRID=demo-reduced`` (the demo
config cut to StarGAN + AttGAN, CMUA/PGD/noise/none, MTCNN + RetinaFace: 16 cells, a few minutes
per variant) or ``TSDF_BENCH_GRID=demo`` (the whole demo, about 7 minutes per variant once its
models are trained).  Models are trained into the benchmark's cache before any timing.  The local
runs use every core for torch (``torch.set_num_threads(os.cpu_count())``, the default of a CLI
run); Ray runs ``os.cpu_count()`` single-threaded workers.

``extra_info``: each variant's seconds; ``speedup`` (off / on, local), ``ray_speedup`` (local on /
Ray on), ``total_speedup`` (local off / Ray on); ``max_rel_diff_on_off`` and
``max_rel_diff_ray`` -- the largest relative difference of any numeric metric between the rows
(the tolerance the rows agree within).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from tsdf_bench.config import _unresolve, from_dict, load_config
from tsdf_bench.harness import run_config

GRIDS = {
    "smoke": ("configs/smoke.toml", {}),
    "demo-reduced": ("configs/demo.toml", {"models__names": ["stargan", "attgan"],
                                           "defenses__names": ["cmua", "pgd", "noise", "none"],
                                           "detectors__names": ["mtcnn", "retinaface"]}),
    "demo": ("configs/demo.toml", {}),
}
KEYS = ("defense", "model", "adaptation", "round", "seed")


def _metrics(rows) -> dict:
    skip = {"run_id", "git_commit", "git_dirty", "optimize", "checkpoint_sha256", "perturbation_sha256"}
    return {tuple(r[k] for k in KEYS): {k: v for k, v in r.items() if isinstance(v, float) and k not in skip}
            for r in rows}


def max_rel_diff(a_rows, b_rows) -> float:
    a, b = _metrics(a_rows), _metrics(b_rows)
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        for name, va in a[key].items():
            vb = b[key].get(name)
            if vb is None or (math.isnan(va) and math.isnan(vb)):
                continue
            worst = max(worst, abs(va - vb) / max(abs(va), abs(vb), 1e-12))
    return worst


def reduced(cfg, overrides: dict):
    """``cfg`` with some ``section__names`` lists cut down, dropping the option tables they no longer use."""
    data = cfg.to_dict()
    for key, names in overrides.items():
        section = data[key.split("__")[0]]
        section["names"] = names
        section["options"] = {k: v for k, v in (section.get("options") or {}).items() if k in names}
    return from_dict(_unresolve(data), source=cfg.source)


def grid_config(name: str, device: str = "cpu"):
    """The ``GRIDS[name]`` config on ``device``, publishing nothing."""
    path, overrides = GRIDS[name]
    root = Path(__file__).resolve().parents[1]
    return reduced(load_config(root / path), overrides).replace(run__publish="", run__device=device)


def prepare_models(cfg, registry, device=None) -> float:
    """Train (or load) the grid's demo models before any timing; returns the seconds it took."""
    from tsdf_bench.models.zoo import get_model

    t0 = time.perf_counter()
    for name in cfg.models.names:
        get_model(name, scale=cfg.run.scale, registry=registry, progress=False, device=device)
    return time.perf_counter() - t0


def timed_run(cfg, registry, output, optimize: bool = True, **kw):
    """``(seconds, RunOutputs)`` of one run of ``cfg`` with the optimisation switch at ``optimize``."""
    t0 = time.perf_counter()
    out = run_config(cfg.replace(run__optimize=optimize), registry, output=output, progress=False,
                     log=lambda m: None, figures=False, **kw)
    return time.perf_counter() - t0, out


def test_grid_end_to_end(benchmark, registry, tmp_path):
    pytest.importorskip("ray")
    cfg = grid_config(os.environ.get("TSDF_BENCH_GRID", "smoke"))
    prepare_models(cfg, registry)  # train once, outside the timings
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        def run(tag, **kw):
            seconds, out = timed_run(cfg, registry, tmp_path / tag, **kw)
            assert not out.summary.errors, out.summary.errors[:3]
            return seconds, out.rows

        off_s, off_rows = run("off", optimize=False)
        result = {}

        def on():
            result["on"] = run("on")

        benchmark.pedantic(on, rounds=1, iterations=1)
        on_s, on_rows = result["on"]
        ray_s, ray_rows = run("ray", executor="ray")
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(
        grid=os.environ.get("TSDF_BENCH_GRID", "smoke"), cells=len(on_rows), cpus=os.cpu_count(),
        off_s=round(off_s, 2), on_s=round(on_s, 2), ray_s=round(ray_s, 2), speedup=round(off_s / on_s, 3),
        ray_speedup=round(on_s / ray_s, 3), total_speedup=round(off_s / ray_s, 3),
        max_rel_diff_on_off=max_rel_diff(on_rows, off_rows), max_rel_diff_ray=max_rel_diff(on_rows, ray_rows))
