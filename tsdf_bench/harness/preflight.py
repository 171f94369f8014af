"""Preflight: check everything a run config names before any fitting (``tsdf-bench run CONFIG --check``).

:func:`preflight` goes through the config in the order a run needs it and records one
:class:`Check` per item:

* **config**: every plugin name is registered; the device exists.
* **data**: the configured source loads.  ``embedded``, ``synthetic`` and ``folder`` are loaded
  as a run loads them (:func:`tsdf_bench.harness.data.load_run_data`); ``celeba`` is checked
  without decoding the whole split: the text files are parsed, the splits are long enough, the
  images the run reads first (``n_train_defense`` train rows, ``n_collect + n_eval`` test rows;
  with ``identity_CelebA.txt`` the run may pick other test rows) exist, and one batch is read.
* **model**: each model is created as the run creates it (a paper-scale model without
  ``checkpoint`` is an error unless ``random_init = true``, :func:`~tsdf_bench.models.checkpoints.model_options`),
  its checkpoint file exists, loads strictly and is hashed (sha256 of the file), its
  ``discriminator_checkpoint`` (when given) loads strictly and is hashed, and one batch of the
  data goes through its protocol targets.  A demo/smoke model that the run trains on
  first use is checked untrained (the row says whether a trained copy is cached).
* **detector**: each detector (measured, attacker, white-box) is created with its options (a
  ``checkpoint`` option is hashed) and detects faces on one batch.
* **defense / adaptation / metric**: each is created with its options (a misspelt option fails).
* **memory / disk**: a simple estimate for the whole grid from tensor sizes (see
  :func:`estimate`), against the memory and disk space available here.

A failed item is a hard error (status ``error``); estimates over what is available are warnings.
With ``fail_fast`` the first hard error raises :class:`PreflightError`; otherwise every item is
checked and :meth:`PreflightReport.raise_for_errors` raises one error listing them all.
:meth:`PreflightReport.table` renders the checks as one table (``tabulate``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import speed
from ..errors import TsdfBenchError

from .estimate import (FLOAT_BYTES, available_disk, available_memory,  # noqa: F401 - re-exported
                       estimate, measuring_plan)


class PreflightError(TsdfBenchError):
    """The preflight found a hard error (the message lists each failed check)."""


@dataclass
class Check:
    kind: str  # config, device, data, model, detector, defense, adaptation, metric, memory, disk
    name: str
    status: str  # ok, warn, error
    detail: str
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self, width: int = 100) -> str:
        from tabulate import tabulate

        rows = [(c.kind, c.name, c.status, c.detail, f"{c.seconds:.2f}") for c in self.checks]
        return tabulate(rows, headers=("check", "name", "status", "detail", "s"), tablefmt="simple",
                        maxcolwidths=[None, None, None, width, None])

    def raise_for_errors(self) -> None:
        if self.errors:
            lines = [f"  {c.kind} {c.name}: {c.detail}" for c in self.errors]
            raise PreflightError(f"preflight found {len(self.errors)} error(s):\n" + "\n".join(lines))


class _Recorder:
    def __init__(self, report: PreflightReport, fail_fast: bool, log: Callable[[str], None]):
        self.report, self.fail_fast, self.log = report, fail_fast, log

    def add(self, kind, name, status, detail, seconds=0.0, **info) -> Check:
        check = Check(kind, name, status, detail, round(seconds, 3), info)
        self.report.checks.append(check)
        self.log(f"preflight {kind} {name}: {status} ({detail})")
        if status == "error" and self.fail_fast:
            raise PreflightError(f"preflight: {kind} {name}: {detail}")
        return check

    def run(self, kind, name, fn):
        """``fn() -> (detail, info, status)``; an exception is this item's error."""
        t0 = time.perf_counter()
        try:
            detail, info, status = fn()
        except PreflightError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported as this item's error
            self.add(kind, name, "error", _one_line(exc), time.perf_counter() - t0)
            return None
        return self.add(kind, name, status, detail, time.perf_counter() - t0, **info)


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, TsdfBenchError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:600]


def _gb(n: float) -> str:
    """Bytes as GB (MB / kB below one GB)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _file_info(path) -> dict:
    from ..hashing import file_sha256

    path = Path(path).expanduser()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# -- data ------------------------------------------------------------------------------------
@dataclass
class _Batch:
    images: torch.Tensor
    attrs: torch.Tensor
    attr_names: tuple
    synthetic: bool = False


def _synthetic_batch(cfg) -> _Batch:
    from .data import SYNTHETIC_ATTRIBUTES, synthetic

    images, attrs = synthetic(max(1, min(cfg.data.batch_size, 4)), cfg.data.image_size, seed=0)
    return _Batch(images, attrs, tuple(SYNTHETIC_ATTRIBUTES), synthetic=True)


def _check_celeba(cfg):
    from ..data._common import ATTGAN_ATTRS
    from ..data.celeba import CelebA

    d = cfg.data
    attributes = list(d.attributes) or list(ATTGAN_ATTRS)
    kw = dict(protocol=d.protocol, image_size=d.image_size, attrs=attributes, check_files=d.check_files)
    train, test = CelebA(d.path, split="train", **kw), CelebA(d.path, split="test", **kw)
    problems = []
    if len(train) < d.n_train_defense:
        problems.append(f"the train split has {len(train)} images, n_train_defense = {d.n_train_defense}")
    if len(test) < d.n_collect + d.n_eval:
        problems.append(f"the test split has {len(test)} images, n_collect + n_eval = {d.n_collect + d.n_eval}")
    if problems:
        raise TsdfBenchError(f"CelebA at {d.path}: " + "; ".join(problems) + "; lower those numbers")
    train.require(range(d.n_train_defense))
    test.require(range(d.n_collect + d.n_eval))
    batch = train.faceset(n=min(d.batch_size, d.n_train_defense))
    identities = (Path(d.path) / "identity_CelebA.txt").is_file()
    detail = (f"CelebA {d.protocol}: {len(train)} train / {len(test)} test rows (check_files = {d.check_files!r}); "
              f"{d.n_train_defense} fit + {d.n_collect + d.n_eval} test images present; one batch of "
              f"{len(batch)} read" + ("; identity_CelebA.txt: the run picks test rows by person" if identities else ""))
    n = {"fit": d.n_train_defense, "collect": d.n_collect, "eval": d.n_eval}
    return detail, _Batch(batch.images, batch.attrs, tuple(batch.attr_names)), n


def _check_data(cfg):
    if cfg.data.source == "celeba":
        return _check_celeba(cfg)
    from .data import load_run_data

    data = load_run_data(cfg)
    n = {"fit": int(data.fit.images.shape[0]), "collect": int(data.collect.images.shape[0]),
         "eval": int(data.eval.images.shape[0])}
    k = max(1, min(cfg.data.batch_size, n["fit"]))
    detail = (f"{data.description}: fit {n['fit']}, collect {n['collect']}, eval {n['eval']} images"
              + (f"; {'; '.join(data.notes)}" if data.notes else ""))
    return detail, _Batch(data.fit.images[:k], data.fit.attrs[:k], tuple(data.attr_names)), n


# -- models ----------------------------------------------------------------------------------
def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def _discriminator_bytes(model) -> int:
    try:
        with torch.device("meta"):
            return sum(p.numel() * FLOAT_BYTES for p in model.make_discriminator().parameters())
    except Exception:  # noqa: BLE001 - an estimate: a model without a discriminator counts 0
        return 0


def _check_model(cfg, registry, name, batch: _Batch, device):
    from ..models import checkpoints
    from .data import select_attrs, to_size

    scale = cfg.run.scale
    options, random_init = checkpoints.model_options(name, scale, cfg.models.options_for(name), registry)
    info, notes = {"random_init": random_init}, []
    ckpt = options.get("checkpoint")
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise TsdfBenchError(f"checkpoint {path} does not exist ([models.{name}] checkpoint)")
        info["checkpoint"] = _file_info(path)
        model = registry.create("model", name, scale=scale, **options)
        notes.append(f"checkpoint {path.name} loaded strictly, sha256 {info['checkpoint']['sha256'][:12]}")
    elif scale != "paper" and cfg.models.train:
        from ..models.shipped import shipped_path
        from ..models.zoo import ZOO_OPTIONS, model_path

        seed = int(options.get("seed", 0))
        plugin_options = {k: v for k, v in options.items() if k not in ZOO_OPTIONS}
        model = registry.create("model", name, scale=scale, **plugin_options)
        ship = shipped_path(model, seed) if options.get("shipped", True) and "steps" not in options else None
        cached = model_path(name, scale, seed).is_file()
        if ship is not None:
            info["shipped"] = _file_info(ship)
            notes.append(f"shipped demo weights {ship.name}, sha256 {info['shipped']['sha256'][:12]}")
        else:
            notes.append("trained on first use" + (" (a trained copy is cached)" if cached else
                                                   " (not cached: the run trains it first)"))
        info["needs_training"] = ship is None and not cached
    else:
        model = registry.create("model", name, scale=scale, **options)
        notes.append("random initial weights (random_init = true)" if random_init else "the plugin's model as created")
    d_path = checkpoints.discriminator_path(cfg.models.options_for(name))
    if d_path:  # the official D the retraining attacker starts from: loaded strictly and hashed
        info["discriminator"] = _file_info(d_path)
        d = checkpoints.load_official_discriminator(model, d_path)
        notes.append(f"discriminator {Path(d_path).name} loaded strictly ({sum(p.numel() for p in d.parameters()) / 1e6:.2f}M "
                     f"parameters), sha256 {info['discriminator']['sha256'][:12]}")
        del d
    elif cfg.run.rounds:
        notes.append("retraining starts from a fresh D (no discriminator_checkpoint)" if ckpt or scale == "paper"
                     else "retraining starts from the D trained with the model")
    source = getattr(model, "reference_source", None)
    if source:
        info["reference"] = source
        notes.append(f"reference {Path(source['path']).name} sha256 {source['sha256'][:12]}")
    model = model.to(device).eval()
    model.optimize = speed.resolve(cfg.run.optimize)  # the run's generate_targets path
    x = to_size(batch.images, model.image_size).to(device)
    a = select_attrs(batch.attrs, batch.attr_names, model.attributes, f"model {name!r}").to(device)
    generate = getattr(model, "generate_targets", None) or model.generate_all
    with torch.no_grad():
        out = generate(x, a)
    if not torch.isfinite(out).all():
        raise TsdfBenchError(f"model {name!r} produced non-finite outputs on one batch")
    info.update(targets=int(out.shape[1]), image_size=int(model.image_size), g_bytes=_param_bytes(model),
                d_bytes=_discriminator_bytes(model))
    n_params = sum(p.numel() for p in model.parameters())
    notes.append(f"{n_params / 1e6:.2f}M parameters; one batch {tuple(x.shape)} -> {tuple(out.shape)}"
                 + (" (synthetic batch: the data check failed)" if batch.synthetic else ""))
    del model
    return "; ".join(notes), info, "ok"


def _meta_sizes(cfg, registry, name) -> dict | None:
    """A model's estimate inputs (targets, input size, G and D bytes) from its architecture alone:
    built on the meta device without checkpoint or reference (for a model whose check failed)."""
    options = {k: v for k, v in cfg.models.options_for(name).items()
               if k not in ("checkpoint", "reference", "random_init", "seed", "steps")}
    try:
        with torch.device("meta"):
            model = registry.create("model", name, scale=cfg.run.scale, **options)
            targets = len(model.conditions(torch.zeros(1, len(model.attributes), device="cpu")))
        return {"targets": targets, "image_size": int(model.image_size), "g_bytes": _param_bytes(model),
                "d_bytes": _discriminator_bytes(model)}
    except Exception:  # noqa: BLE001 - then the estimate says it is partial
        return None


def _check_detector(cfg, registry, name, batch: _Batch, device):
    options = cfg.detectors.options_for(name)
    info = {}
    if options.get("checkpoint"):
        path = Path(options["checkpoint"]).expanduser()
        if not path.is_file():
            raise TsdfBenchError(f"checkpoint {path} does not exist ([detectors.{name}] checkpoint)")
        info["checkpoint"] = _file_info(path)
    det = registry.create("detector", name, **options)
    if isinstance(det, torch.nn.Module):
        det = det.to(device).eval()
    with torch.no_grad():
        found = det.detect(batch.images.to(device))
    faces = [len(f) for f in found]
    detail = (f"{sum(1 for f in faces if f)}/{len(faces)} images of one batch with a face"
              + (f"; checkpoint sha256 {info['checkpoint']['sha256'][:12]}" if info else "")
              + (" (synthetic batch: the data check failed)" if batch.synthetic else ""))
    return detail, info, "ok"


def preflight(cfg, registry, *, output=None, fail_fast: bool = False,
              log: Callable[[str], None] | None = None) -> PreflightReport:
    """Check everything ``cfg`` names (see the module docstring); returns the report.

    ``output``: the run's output folder (default ``[run] output``), for the disk estimate.
    """
    from ..config import check_names
    from .provenance import resolve_device

    report = PreflightReport()
    rec = _Recorder(report, fail_fast, log or (lambda msg: None))
    if rec.run("config", cfg.source or "<config>",
               lambda: (check_names(cfg, registry) or f"plugin names registered; scale {cfg.run.scale!r}", {}, "ok")) is None:
        return report  # unknown names: nothing else can be created
    device_check = rec.run("device", cfg.run.device, lambda: (str(resolve_device(cfg.run.device)), {}, "ok"))
    device = torch.device(device_check.detail) if device_check else torch.device("cpu")

    state = {}

    def data():
        detail, batch, n = _check_data(cfg)
        state["batch"], state["n"] = batch, n
        return detail, {"n": n}, "ok"

    rec.run("data", cfg.data.source, data)
    batch = state.get("batch") or _synthetic_batch(cfg)
    n = state.get("n") or {"fit": cfg.data.n_train_defense, "collect": cfg.data.n_collect, "eval": cfg.data.n_eval}

    models, unsized = {}, []
    for name in cfg.models.names:
        check = rec.run("model", name, lambda name=name: _check_model(cfg, registry, name, batch, device))
        if check is not None:
            models[name] = check.info
        else:  # the estimate still counts it, from its architecture (built on the meta device)
            sizes = _meta_sizes(cfg, registry, name)
            if sizes is not None:
                models[name] = sizes
            else:
                unsized.append(name)
    detectors = list(dict.fromkeys([*cfg.detectors.names, cfg.detectors.attacker, *(cfg.detectors.white_box or [])]))
    for name in detectors:
        (_soft if cfg.detectors.allow_missing_detectors else _Recorder.run)(rec, "detector", name,
                                                   lambda name=name: _check_detector(cfg, registry, name, batch, device))
    for name in cfg.defenses.names:
        plugin = cfg.defenses.plugin_for(name)
        rec.run("defense", name, lambda name=name, plugin=plugin: (
            _create(registry, "defense", plugin, cfg.defenses.options_for(name), seed=0, device="cpu")
            + (f" (plugin {plugin!r})" if plugin != name else ""), {}, "ok"))
    for name in cfg.adaptations.names:
        rec.run("adaptation", name, lambda name=name: (
            _create(registry, "adaptation", cfg.adaptations.plugin_for(name), cfg.adaptations.options_for(name)), {}, "ok"))
    for name in cfg.metrics.names:
        rec.run("metric", name, lambda name=name: (_create(registry, "metric", name, cfg.metrics.options_for(name)),
                                                    {}, "ok"))

    est = estimate(cfg, models, n, measuring_plan(cfg, registry))
    report.estimate = est
    partial = f" (without {', '.join(unsized)}: could not be built)" if unsized else ""
    whole = est["plan"]["whole_metrics"]
    if whole:  # their memory grows with n_eval
        partial += f" (metrics holding whole tensors: {', '.join(whole)})"
    ram = available_memory()
    rec.add("memory", "peak RAM", "warn" if ram is not None and est["ram_bytes"] > ram else "ok",
            f"~{_gb(est['ram_bytes'])} planned{partial} ("
            + ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in est["ram_parts"].items() if v)
            + f"); available now {_gb(ram) if ram is not None else 'unknown'}", bytes=est["ram_bytes"])
    out = output or cfg.run.output
    free = available_disk(out)
    rec.add("disk", str(out), "warn" if est["disk_bytes"] > free else "ok",
            f"~{_gb(est['disk_bytes'])} planned{partial} ("
            + ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in est["disk_parts"].items() if v)
            + f"; {_gb(est['protected_cache_worst'])} if every defense and seed kept a failed cell); free {_gb(free)}",
            bytes=est["disk_bytes"])
    return report


def _soft(rec: _Recorder, kind, name, fn):
    """Like ``rec.run`` but a failure is a warning (``allow_missing_detectors``)."""
    t0 = time.perf_counter()
    try:
        detail, info, status = fn()
    except Exception as exc:  # noqa: BLE001
        return rec.add(kind, name, "warn", f"{_one_line(exc)} (allow_missing_detectors: its columns are marked)",
                       time.perf_counter() - t0)
    return rec.add(kind, name, status, detail, time.perf_counter() - t0, **info)


def _create(registry, kind, name, options, **extra) -> str:
    try:  # the runner's creation: a misspelt option names the table and the closest valid option
        from .plan import create_checked
    except ImportError:
        create_checked = None
    if create_checked is not None:
        create_checked(registry, kind, name, options, **extra)
    else:
        registry.create(kind, name, **extra, **options)
    return "created with its options" if options else "created"
