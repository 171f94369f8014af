"""The preflight's memory and disk plan for a whole grid, from tensor sizes (see :func:`estimate`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

FLOAT_BYTES = 4  # every image tensor of a run is float32
# per-cell measuring memory in units of one model's eval forgeries, with and without the forgery
# metric (measured by benchmarks/test_bench_memory.py at 256 px; see estimate)
MEASURE_COPIES = 11
MEASURE_COPIES_WITHOUT_FORGERY_METRIC = 3


def _clean_cache_peak(sizes: list) -> int:
    """The clean-forgery cache's largest size while each model's forgeries are made, the models in
    order (twice: the next defense starts over), under :class:`~tsdf_bench.harness.measure.MeasureMixin`'s
    budget rule: other models' entries go, oldest first, while the cache is over budget."""
    from .measure import MeasureMixin

    budget = MeasureMixin.clean_cache_bytes
    if budget is None:
        return sum(sizes)
    cache, peak = {}, 0  # model index -> bytes, oldest first
    for i in list(range(len(sizes))) * 2:
        if i in cache:  # still cached: nothing is made
            continue
        while cache and sum(cache.values()) > budget:
            cache.pop(next(iter(cache)))
        peak = max(peak, sum(cache.values()) + sizes[i])
        cache[i] = sizes[i]
        while len(cache) > 1 and sum(cache.values()) > budget:
            cache.pop(next(k for k in cache if k != i))
    return peak


def estimate(cfg, models: dict, n: dict) -> dict:
    """Memory and disk for the whole grid, in bytes, from tensor sizes (float32 everywhere).

    ``models``: ``{name: {"targets": T, "image_size": s, "g_bytes", "d_bytes"}}`` (from the model
    checks); ``n``: images per role (``fit``, ``collect``, ``eval``).  With ``img(S) = 3*S*S*4`` and
    ``F(m) = n_eval * T_m * img(s_m)`` (one model's forgeries of the eval photos):

    * data: ``(n_fit + n_collect + n_eval) * img(S_data)``;
    * generators: the sum of their parameter bytes;
    * clean forgeries: the largest the cache gets under its byte budget
      (:attr:`~tsdf_bench.harness.measure.MeasureMixin.clean_cache_bytes`, 1 GB), simulated over
      the models in the run's order (every model's when they fit in the budget; at paper scale the
      current model's only, plus the previous ones while within budget);
    * measurement: ``MEASURE_COPIES * max F(m)`` for the cell being measured: its reference and
      protected forgeries with their temporaries (about 3 F) and the ``forgery`` metric's float64
      [0, 1] copies of both for PSNR and SSIM (about 8 F more); measured on CPU by
      ``benchmarks/test_bench_memory.py``: the run's RSS grew by 12.2 F per eval image with the
      forgery metric and 4.5 F without it, of which ~1.2 F are the eval photos at 256 px (data,
      protected, model-size and cropped copies) and 1 F the cached clean forgery.  This is the term
      that still grows with n_eval (the metric plugins take whole tensors);
    * protected images: ``(n_collect + n_eval) * img(S_data)`` (one defense and seed at a time);
    * crops: per distinct model input size, the attacker's crops of the collected photos (protected
      and clean) and of the eval photos (protected and clean): ``2 * (n_collect + n_eval) * img(s)``;
    * retraining: ``max over models of 4 * (G + D parameter bytes)`` (copy, gradients, two Adam
      moments) plus the chain's retrained model;
    * controls: one clean-retrained model (G + D) per model, retraining round and retraining
      adaptation of the current seed (they are shared by every defense of the seed; every
      configured adaptation is counted);
    * peak RAM: the sum of the above.  Activations (defense fitting, one batch at a time) are not
      included: allow a few GB more at 256 px.
    * disk: the protected-image cache, ``(n_collect + n_eval) * img(S_data)`` for the defense and
      seed being run (a group whose cells all succeeded loses its file before the next fit; a group
      with a failed cell keeps it for ``--resume``: ``protected_cache_worst`` is every group's),
      plus a universal perturbation per seed and defense (``img(S_data)``) and the models the run
      trains first (``G + D`` bytes each).
    """
    img = lambda s: 3 * s * s * FLOAT_BYTES  # noqa: E731
    s_data = cfg.data.image_size
    runs = len(cfg.run.seeds) * len(cfg.defenses.names)
    sizes_f = [n["eval"] * m["targets"] * img(m["image_size"]) for m in models.values()]
    forgeries = max(sizes_f, default=0)
    sizes = {m["image_size"] for m in models.values()}
    rounds = int(cfg.run.rounds)
    retraining_adaptations = max(1, len(getattr(cfg.adaptations, "names", []) or []))
    parts = {
        "data": (n["fit"] + n["collect"] + n["eval"]) * img(s_data),
        "generators": sum(m["g_bytes"] for m in models.values()),
        "clean_forgeries": _clean_cache_peak(sizes_f),
        "measurement": (MEASURE_COPIES if "forgery" in (list(cfg.metrics.names) or ["forgery"])
                        else MEASURE_COPIES_WITHOUT_FORGERY_METRIC) * forgeries,
        "protected": (n["collect"] + n["eval"]) * img(s_data),
        "crops": sum(2 * (n["collect"] + n["eval"]) * img(s) for s in sizes),
        "retraining": max((5 * m["g_bytes"] + 4 * m["d_bytes"] for m in models.values()), default=0),
        "controls": rounds * retraining_adaptations * sum(m["g_bytes"] + m["d_bytes"] for m in models.values()),
    }
    if rounds == 0:
        parts["crops"] = parts["retraining"] = parts["controls"] = 0
    disk = {
        "protected_cache": (n["collect"] + n["eval"]) * img(s_data),
        "perturbations": runs * img(s_data),
        "trained_models": sum(m["g_bytes"] + m["d_bytes"] for m in models.values() if m.get("needs_training")),
    }
    return {"ram_parts": parts, "ram_bytes": sum(parts.values()), "disk_parts": disk, "disk_bytes": sum(disk.values()),
            "protected_cache_worst": runs * (n["collect"] + n["eval"]) * img(s_data)}


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_disk(folder) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# -- the preflight ---------------------------------------------------------------------------
