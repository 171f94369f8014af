"""The preflight's memory and disk plan for a whole grid, from tensor sizes (see :func:`estimate`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .streaming import max_measure_rows

FLOAT_BYTES = 4  # every image tensor of a run is float32
# The measuring stage's memory per photo of a measuring batch, in units of that photo's forgeries
# (T x 3 x s x s float32): the batch's forgeries of every stream (retrained, original and control
# models, clean and protected), the forgery metric's float64 [0, 1] copies for PSNR and SSIM and
# the masks' temporaries.  Measured by benchmarks/memory_run.py at 256 px (5 targets, 32 eval
# photos): the measuring path's peak grew by 50 MB per photo of the batch size from 2 to 16
# (331, 491, 683, 1028 MB), 12.7 units.
MEASURE_BATCH_COPIES = 13
# Per (photo, target) pair, the values a cell keeps until its end (masked L2, MSE, PSNR, SSIM,
# hits and drift of every role, and the summaries' Python lists), bytes: an upper bound.
PAIR_BYTES = 256
# A metric that does not stream but reads images gets the cell's batches concatenated: the
# batches' forgeries and the whole tensors made of them, in units of one model's eval forgeries
# (plus the inputs, and the metric's own temporaries, which are not counted).
WHOLE_METRIC_COPIES = 4


def measuring_plan(cfg, registry=None) -> dict:
    """What the measuring stage's memory depends on beyond tensor sizes, from the plugins the config
    names: ``whole_metrics`` (metrics that do not stream and read image tensors; one that cannot be
    created counts as one) and ``purifying`` (adaptations that transform the images, so their
    inputs are copies).  ``registry``: default the installed plugins."""
    from ..adaptations.base import Adaptation
    from ..metric_streaming import needs_images

    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    names = list(cfg.metrics.names)
    if not names:
        from .plan import default_metrics

        names = default_metrics(registry)
    whole, purifying = [], []
    for name in names:
        try:
            metric = registry.create("metric", name, **cfg.metrics.options_for(name))
        except Exception:  # noqa: BLE001 - the preflight reports it; counted as the worst case
            whole.append(name)
            continue
        if needs_images(metric):
            whole.append(name)
    for name in cfg.adaptations.names:
        try:
            adaptation = registry.create("adaptation", cfg.adaptations.plugin_for(name),
                                         **cfg.adaptations.options_for(name))
        except Exception:  # noqa: BLE001 - as above
            purifying.append(name)
            continue
        if type(adaptation).purify is not Adaptation.purify:
            purifying.append(name)
    return {"whole_metrics": whole, "purifying": purifying}


def _clean_cache_peaks(entries: list) -> tuple[int, int]:
    """The clean-forgery cache's largest memory and disk use while each model's entries are made,
    the models in order (twice: the next defense starts over), under
    :class:`~tsdf_bench.harness.measure.MeasureMixin`'s rule: an entry within the budget
    (:attr:`~tsdf_bench.harness.measure.MeasureMixin.clean_cache_bytes`) is kept in memory, the
    oldest others dropped first while the entries in memory would exceed it; a larger one goes to
    disk, and the disk keeps the current model's entries only.  ``entries``: ``(model, bytes)``
    in the order the run makes them."""
    from .measure import MeasureMixin

    budget = MeasureMixin.clean_cache_bytes
    if budget is None:
        return sum(size for _, size in entries), 0
    ram, disk, ram_peak, disk_peak = {}, {}, 0, 0  # (model, index) -> bytes, oldest first
    for key in [(m, i) for i, (m, _) in enumerate(entries)] * 2:
        size = entries[key[1]][1]
        if key in ram or key in disk:
            continue
        disk = {k: v for k, v in disk.items() if k[0] == key[0]}  # other models' files go first
        if size <= budget:
            while ram and sum(ram.values()) + size > budget:
                ram.pop(next(iter(ram)))
            ram[key] = size
        else:
            disk[key] = size
        ram_peak, disk_peak = max(ram_peak, sum(ram.values())), max(disk_peak, sum(disk.values()))
    return ram_peak, disk_peak


def estimate(cfg, models: dict, n: dict, plan: dict | None = None) -> dict:
    """Memory and disk for the whole grid, in bytes, from tensor sizes (float32 everywhere).

    ``models``: ``{name: {"targets": T, "image_size": s, "g_bytes", "d_bytes"}}`` (from the model
    checks); ``n``: images per role (``fit``, ``collect``, ``eval``); ``plan``: the plugins'
    :func:`measuring_plan` (default: made from the installed plugins).  With ``img(S) = 3*S*S*4``,
    ``F(m) = n_eval * T_m * img(s_m)`` (one model's forgeries of the eval photos) and ``X(m) =
    n_eval * img(s_m)`` (its inputs), where an input is a copy when the model's size is not the
    data's or an adaptation purifies:

    * data: ``(n_fit + n_collect + n_eval) * img(S_data)``; the collect and eval sets larger than
      :data:`~tsdf_bench.harness.mapped.MAP_ABOVE_BYTES` (256 MiB) are memory-mapped files
      (:mod:`~tsdf_bench.harness.mapped`): counted as disk (``mapped_sets``), not RAM;
    * generators: the sum of their parameter bytes;
    * clean forgeries: the cache's largest memory, simulated over its entries (one per model and
      purification, ``F(m)`` plus ``X(m)`` when a copy) in the run's order: an entry within the
      budget (:attr:`~tsdf_bench.harness.measure.MeasureMixin.clean_cache_bytes`, 1 GB) is kept in
      memory (the oldest others dropped to stay within it), a larger one on disk (the disk term);
    * measurement: for the cell being measured, batch by batch of eval photos
      (:mod:`~tsdf_bench.harness.streaming`): ``MEASURE_BATCH_COPIES`` (13) times the forgeries of
      the largest batch (``max_measure_rows(batch_size)`` photos: ``batch_size + 1`` where a last
      single photo joins the batch before), measured by ``benchmarks/memory_run.py``; the per-pair
      values it keeps (``n_eval * T * PAIR_BYTES``); the round's model-size inputs when they are
      copies (``2 X``: the purified and the resized protected photos); and for metrics that do not
      stream but read images (``plan["whole_metrics"]``) ``WHOLE_METRIC_COPIES * F + 2 X`` (plus
      their own temporaries, not counted).  The largest over the models.  The streamed terms do not
      grow with ``n_eval``; the pairs' values and the inputs grow per photo, not per pair;
    * protected images: ``(n_collect + n_eval) * img(S_data)`` (one defense and seed at a time);
      a set over the mapping threshold is its memory-mapped cache file (disk, ``protected_cache``);
    * crops: per distinct model input size, the attacker's crops of the collected photos (protected
      and clean) and of the eval photos (protected and clean): ``2 * (n_collect + n_eval) * img(s)``,
      each of the four sets over the threshold a mapped file (disk, ``mapped_sets``); the
      preparation's batch (``PREP_BATCH`` photos and their crops) in RAM;
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
      the clean forgeries kept on disk (the current model's entries over the budget; deleted when
      the run ends), a universal perturbation per seed and defense (``img(S_data)``) and the
      models the run trains first (``G + D`` bytes each).
    """
    from .attacker import PREP_BATCH
    from .mapped import mapped

    plan = measuring_plan(cfg) if plan is None else plan
    img = lambda s: 3 * s * s * FLOAT_BYTES  # noqa: E731
    s_data = cfg.data.image_size
    runs = len(cfg.run.seeds) * len(cfg.defenses.names)
    purifying = set(plan.get("purifying", ()))
    keys = [name in purifying for name in cfg.adaptations.names]  # per adaptation: its own entry
    entry_kinds = ([False] if not keys or not all(keys) else []) + [True] * sum(keys)  # identity, purified
    sizes = {m["image_size"] for m in models.values()}
    # the sets that grow with the photos, each in RAM or (over the threshold) a memory-mapped file
    in_ram = lambda nbytes: 0 if mapped(nbytes) else nbytes  # noqa: E731
    sets = {"data": [n["collect"] * img(s_data), n["eval"] * img(s_data)],
            "protected": [n["collect"] * img(s_data), n["eval"] * img(s_data)],
            "crops": [k * img(s) for s in sizes for k in (n["collect"], n["collect"], n["eval"], n["eval"])]}
    rows = max_measure_rows(cfg.data.batch_size)
    entries, measurement = [], 0
    for name, m in models.items():
        f = n["eval"] * m["targets"] * img(m["image_size"])
        x = n["eval"] * img(m["image_size"])
        resized = m["image_size"] != s_data
        entries += [(name, f + (x if resized or purified else 0)) for purified in entry_kinds]
        cell = (MEASURE_BATCH_COPIES * min(rows, max(n["eval"], 1)) * m["targets"] * img(m["image_size"])
                + n["eval"] * m["targets"] * PAIR_BYTES + (2 * x if resized or purifying else 0)
                + ((WHOLE_METRIC_COPIES * f + 2 * x) if plan.get("whole_metrics") else 0))
        measurement = max(measurement, cell)
    clean_ram, clean_disk = _clean_cache_peaks(entries)
    rounds = int(cfg.run.rounds)
    retraining_adaptations = max(1, len(getattr(cfg.adaptations, "names", []) or []))
    parts = {
        "data": n["fit"] * img(s_data) + sum(map(in_ram, sets["data"])),
        "generators": sum(m["g_bytes"] for m in models.values()),
        "clean_forgeries": clean_ram,
        "measurement": measurement,
        "protected": sum(in_ram(b) for b in sets["protected"]),
        "crops": sum(in_ram(b) for b in sets["crops"]) + PREP_BATCH * (img(s_data) + max(map(img, sizes), default=0)),
        "retraining": max((5 * m["g_bytes"] + 4 * m["d_bytes"] for m in models.values()), default=0),
        "controls": rounds * retraining_adaptations * sum(m["g_bytes"] + m["d_bytes"] for m in models.values()),
    }
    if rounds == 0:
        parts["crops"] = parts["retraining"] = parts["controls"] = 0
    disk = {
        "protected_cache": (n["collect"] + n["eval"]) * img(s_data),
        "mapped_sets": sum(b - in_ram(b) for b in sets["data"] + (sets["crops"] if rounds else [])),
        "clean_forgeries": clean_disk,
        "perturbations": runs * img(s_data),
        "trained_models": sum(m["g_bytes"] + m["d_bytes"] for m in models.values() if m.get("needs_training")),
    }
    return {"ram_parts": parts, "ram_bytes": sum(parts.values()), "disk_parts": disk, "disk_bytes": sum(disk.values()),
            "protected_cache_worst": runs * (n["collect"] + n["eval"]) * img(s_data), "plan": plan}


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
