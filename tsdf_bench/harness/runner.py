"""The benchmark loop: defenses x models x adaptations x rounds x seeds, one stored row per cell.

For each seed and defense:

1. **Fit** the defense on the fit split, white-box against every configured model and the
   white-box detectors (default: the differentiable ones), then **protect** the collect and
   eval splits.  A universal perturbation is saved under ``perturbations/``; protected images
   are cached under ``cache/`` so that ``--resume`` never refits a finished defense.
2. **Round 0** (every adaptation): the attacker's model forges the eval images.  The cell compares
   ``G(purify(x + W))`` with ``G(purify(x))`` (``purify`` is the adaptation's input transform,
   identity for retraining; the reference goes through the same transform so that only the
   defense is measured) and every configured detector on ``x`` vs ``x + W`` (full-size images).
3. **Retraining round k >= 1** (adaptations with ``retrains = True``; TSDF's threat model):
   the attacker runs its data preparation (attacker detector, crop, resize to the model's input
   size) on the protected collect images; images that defeat detection drop out.  It fine-tunes
   the round-(k-1) model on the crops it got, with the attributes of the kept images, for
   ``[adaptations] steps``; with no crop at all the model stays unchanged (the row says so:
   ``retrain_images = 0``, ``model_unchanged = true``).  It is then measured again on the
   held-out eval images, against the **retrained** model's own clean forgery (``G'(x + W)`` vs
   ``G'(x)``): the question is whether the protection still breaks the attacker's current
   model; comparing with the original ``G(x)`` would count the model's drift as disruption (even
   the ``none`` defense would score).  The drift itself is the column ``retrained_clean_mse``
   (mean squared difference between ``G'(x)`` and ``G(x)``).  ``crop_kept`` (per collected image: the attacker's crop exists and
   overlaps the clean image's crop at IoU >= 0.5) feeds the ``crop_yield`` metric.

Clean forgeries and clean detections are computed once per model / detector and shared across
defenses, and a defense's protected detections and attacker crops once per defense, when
optimisations are on (``[run] optimize``, :mod:`tsdf_bench.speed`); with them off every cell
recomputes them (the papers' straightforward way; same values, see tests/test_speed.py).  A failing cell (any exception in a plugin) is stored with status ``error``, the error
text and the traceback; the other cells go on.  Ctrl-C stops cleanly: finished cells stay stored.
Every random step reseeds torch from (seed, step names), so a resumed run gives the rows of an
uninterrupted one.  A chain of rounds is :meth:`Runner.start_chain` then one
:meth:`Runner.advance` per round; :meth:`Runner.run` loops over them here, and
:mod:`.ray_executor` runs each round as its own Ray task.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .. import speed
from ..config import RunConfig
from ..errors import ConfigError, TsdfBenchError
from .data import RunData, load_run_data, select_attrs, to_size
from .provenance import (derived_seed, device_description, git_state, resolve_device, state_dict_hash,
                         tensors_hash, versions)
from .store import ResultsStore

CROP_IOU_USABLE = 0.5  # a protected-image crop counts as usable at IoU >= 0.5 with the clean crop


class Cell(NamedTuple):
    defense: str
    model: str
    adaptation: str
    round: int
    seed: int

    def key(self) -> dict:
        return self._asdict()


def plan_cells(cfg: RunConfig, retrains: dict[str, bool]) -> list[Cell]:
    """Every cell of a config, in run order (seed, defense, model, adaptation, round)."""
    cells = []
    for seed in cfg.run.seeds:
        for d in cfg.defenses.names:
            for m in cfg.models.names:
                for a in cfg.adaptations.names:
                    rounds = range(cfg.run.rounds + 1) if retrains[a] else range(1)
                    cells.extend(Cell(d, m, a, k, seed) for k in rounds)
    return cells


def _seed(seed: int, *keys) -> None:
    torch.manual_seed(derived_seed(seed, *keys))


@dataclass
class Protected:
    """One fitted defense's output for one seed."""

    collect: torch.Tensor
    eval: torch.Tensor
    perturbation_sha256: str
    timings: dict
    info: dict
    detections: dict = field(default_factory=dict)  # detector -> list[Detections] | Exception
    preps: dict = field(default_factory=dict)  # (size, purify key) -> prep tuple | Exception


@dataclass
class ChainState:
    """Where a chain of rounds stands: the attacker's current model and what the last retraining did."""

    model: object
    hash: str
    base_hash: str  # the round-0 model's
    crop_kept: list | None = None
    retrain_info: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # timings of the last retraining
    failure: tuple | None = None  # (exception, stage): every later round fails with it


class _Failed(Exception):
    """A cached failure re-raised for every cell that depends on it."""


class CellFailure(Exception):
    """A failure as text and traceback, so it can travel between processes (the Ray executor)."""

    def __init__(self, text: str, traceback_text: str = "", stage: str = ""):
        super().__init__(text)
        self.text, self.traceback_text, self.stage = text, traceback_text, stage

    def __reduce__(self):
        return CellFailure, (self.text, self.traceback_text, self.stage)

    @classmethod
    def of(cls, exc: BaseException, stage: str = "") -> "CellFailure":
        if isinstance(exc, CellFailure):
            return exc
        cause = exc.__cause__ if isinstance(exc, _Failed) and exc.__cause__ is not None else exc
        text = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
        return cls(text, "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)), stage)


def _cached(cache: dict, key, compute: Callable[[], object], what: str):
    """``cache[key]``, computed once by ``compute()``.  A failure is cached as well and re-raised as
    :class:`_Failed` ("``what``: error") for every cell that depends on it."""
    if key not in cache:
        try:
            cache[key] = compute()
        except Exception as exc:  # noqa: BLE001 - recorded in every dependent cell
            cache[key] = exc
    got = cache[key]
    if isinstance(got, Exception):
        raise _Failed(f"{what}: {type(got).__name__}: {got}") from got
    return got


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    total: int
    ok: int
    errors: list[dict]
    skipped: int


class Runner:
    """Run the cells of ``cfg`` into ``store`` under ``run_id`` (see the module docstring).

    ``data`` may be given (a :class:`RunData`) to bypass the configured source; ``progress``
    shows tqdm bars; ``log`` receives one-line messages.
    """

    def __init__(self, cfg: RunConfig, registry, store: ResultsStore, run_id: str, run_dir, *,
                 progress: bool = True, data: RunData | None = None, log: Callable[[str], None] | None = None):
        self.cfg, self.registry, self.store, self.run_id = cfg, registry, store, run_id
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.device = resolve_device(cfg.run.device)
        self._data = data
        self._models: dict[str, object] = {}
        self._model_hash: dict[str, str] = {}
        self._discriminators: dict[str, object] = {}  # model -> its trained D (None: G-only checkpoint)
        self._detectors: dict[str, object] = {}
        self._clean_fake: dict = {}
        self._clean_dets: dict = {}
        self._clean_prep: dict = {}
        self.adaptations = {n: create_checked(registry, "adaptation", n, cfg.adaptations.options_for(n))
                            for n in cfg.adaptations.names}
        self.metrics = [create_checked(registry, "metric", n, cfg.metrics.options_for(n)) for n in self.metric_names()]
        self._provenance_base: dict | None = None

    # -- plumbing ------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        return list(self.cfg.metrics.names) or self.registry.names("metric")

    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = load_run_data(self.cfg)
        return self._data

    def provenance_base(self) -> dict:
        if self._provenance_base is None:
            cfg = self.cfg
            used = {"defense": [cfg.defenses.plugin_for(d) for d in cfg.defenses.names], "model": cfg.models.names,
                    "adaptation": cfg.adaptations.names, "metric": self.metric_names(),
                    "detector": list(dict.fromkeys([*cfg.detectors.names, cfg.detectors.attacker]))}
            self._provenance_base = {
                "config_hash": cfg.hash, "run_name": cfg.run.name, "scale": cfg.run.scale,
                "versions": versions(self.registry, used), "device": device_description(self.device),
                **git_state(), "optimize": speed.optimizations_enabled(), "data": self.data.description, "data_hash": self.data.data_hash,
                "data_notes": self.data.notes, "split": self.data.split, "attacker_detector": cfg.detectors.attacker,
                "crop": cfg.detectors.crop, "eps": cfg.defenses.eps,
                "n_fit": int(self.data.fit.images.shape[0]), "n_collect": int(self.data.collect.images.shape[0]),
                "n_eval": int(self.data.eval.images.shape[0]),
            }
        return self._provenance_base

    def _batches(self, n):
        bs = self.cfg.data.batch_size
        return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]

    def _bar(self, iterable=None, **kw):
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=not self.progress, leave=False, dynamic_ncols=True, **kw)

    # -- models and detectors ------------------------------------------------------------
    def model(self, name: str):
        """The round-0 model ``name`` (loaded once; a load failure is cached and re-raised)."""
        def load():
            model = self._load_model(name)
            self._model_hash[name] = state_dict_hash(model)
            return model

        return _cached(self._models, name, load, f"model {name!r} failed to load")

    def _load_model(self, name: str):
        """A model with a checkpoint, or at paper scale, comes from its plugin; a demo/smoke model
        without one is trained on first use by :func:`tsdf_bench.models.zoo.get_model` (cached)."""
        cfg = self.cfg
        options = cfg.models.options_for(name)
        if "checkpoint" in options or cfg.run.scale == "paper" or not cfg.models.train:
            self.log(f"loading model {name} ({cfg.run.scale} scale)")
            model = self.registry.create("model", name, scale=cfg.run.scale, **options)
        else:
            from ..models.zoo import get_model

            train_data = None
            gen = self.data.generator_train
            if gen is not None:  # None: the zoo's embedded training persons (never a protected one)
                train_data = (gen.images, gen.attrs, self.data.attr_names)
            self.log(f"loading model {name} ({cfg.run.scale} scale; trained on first use)")
            model = get_model(name, scale=cfg.run.scale, registry=self.registry, train_data=train_data,
                              progress=self.progress, device=self.device, **options)
            # the attacker trained this model, so it also has its discriminator for retraining
            from ..models.checkpoints import load_discriminator
            from ..models.zoo import model_path

            self._discriminators[name] = load_discriminator(model, model_path(name, cfg.run.scale,
                                                                             options.get("seed", 0)))
        return speed.channels_last(model.to(self.device).eval())

    def detector(self, name: str):
        def load():
            det = self.registry.create("detector", name, **self.cfg.detectors.options_for(name))
            return det.to(self.device).eval() if isinstance(det, torch.nn.Module) else det

        return _cached(self._detectors, name, load, f"detector {name!r} failed to load")

    def _attrs_map(self, attrs: torch.Tensor, models: list) -> dict:
        """``{model.name: its attribute columns}`` (the form defenses accept for several models)."""
        return {m.name: select_attrs(attrs, self.data.attr_names, m.attributes, f"model {m.name!r}").to(self.device)
                for m in models}

    @torch.no_grad()
    def _generate(self, model, images: torch.Tensor, attrs: torch.Tensor, seed_keys) -> torch.Tensor:
        """``model.generate_targets`` in batches at the model's input size, on CPU: ``[N, T, 3, s, s]``."""
        x = to_size(images, model.image_size)
        a = select_attrs(attrs, self.data.attr_names, model.attributes, f"model {model.name!r}")
        _seed(*seed_keys)
        generate = getattr(model, "generate_targets", None) or model.generate_all
        with speed.autocast(self.device):
            outs = [generate(x[s].to(self.device), a[s].to(self.device)).float().cpu()
                    for s in self._batches(x.shape[0])]
        return torch.cat(outs)

    @torch.no_grad()
    def _detect(self, name: str, images: torch.Tensor) -> list:
        det = self.detector(name)
        out = []
        for s in self._batches(images.shape[0]):
            out.extend(det.detect(images[s].to(self.device)))
        return [type(d)(*(t.detach().cpu() if torch.is_tensor(t) else t for t in (d.boxes, d.scores, d.landmarks)))
                for d in out]

    # -- defense fit and protection ------------------------------------------------------
    def protect(self, seed: int, name: str) -> Protected:
        """Fit defense ``name`` and protect the collect and eval splits (cached on disk for resume)."""
        cache = self.run_dir / "cache" / f"protected-{name}-seed{seed}.pt"
        if cache.is_file():
            blob = torch.load(cache, map_location="cpu", weights_only=False)
            return Protected(blob["collect"], blob["eval"], blob["perturbation_sha256"], blob["timings"], blob["info"])
        data, cfg = self.data, self.cfg
        plugin = cfg.defenses.plugin_for(name)
        defense = self.registry.create("defense", plugin, seed=seed, device=str(self.device),
                                       **cfg.defenses.options_for(name))
        models, model_problems = [], []
        for m in cfg.models.names:
            try:
                models.append(self.model(m))
            except _Failed as exc:
                model_problems.append(str(exc))
        detectors = []
        differentiable = {}
        for d in dict.fromkeys([*cfg.detectors.names, cfg.detectors.attacker, *(cfg.detectors.white_box or [])]):
            try:
                differentiable[d] = bool(getattr(self.detector(d), "differentiable", False))
            except _Failed:
                differentiable[d] = False
        for d in cfg.white_box_detectors(differentiable):
            detectors.append(self.detector(d))
        self.log(f"fitting defense {name} (seed {seed}) on {data.fit.images.shape[0]} images")
        t0 = time.perf_counter()
        _seed(seed, "fit", name)
        with speed.autocast(self.device):
            defense.fit(data.fit.images.to(self.device), self._attrs_map(data.fit.attrs, models), models, detectors)
        t1 = time.perf_counter()
        protected = {}
        for split_name in ("collect", "eval"):
            split = getattr(data, split_name)
            parts = []
            for s in self._batches(split.images.shape[0]):
                _seed(seed, "protect", name, split_name, s.start)
                attrs = {k: v[s] for k, v in self._attrs_map(split.attrs, models).items()}
                with speed.autocast(self.device):
                    parts.append(defense.protect(split.images[s].to(self.device), attrs).detach().float().cpu())
            protected[split_name] = torch.cat(parts) if parts else split.images[:0].clone()
        t2 = time.perf_counter()
        if getattr(defense, "universal", False) and getattr(defense, "perturbation", None) is not None:
            from ..defenses.base import tensor_hash

            digest = tensor_hash(defense.perturbation)
            try:
                defense.save(self.run_dir / "perturbations" / f"{name}-seed{seed}.pt", config_hash=cfg.hash)
            except Exception as exc:  # noqa: BLE001 - saving is a convenience, the hash is recorded anyway
                self.log(f"could not save the perturbation of {name}: {exc}")
        else:
            digest = tensors_hash(protected["collect"] - data.collect.images, protected["eval"] - data.eval.images)
        info = {"defense_plugin": plugin, "fit_models": [m.name for m in models],
                "fit_detectors": [getattr(d, "name", "?") for d in detectors],
                "fit_problems": model_problems}
        result = Protected(protected["collect"], protected["eval"], digest,
                           {"fit_s": t1 - t0, "protect_s": t2 - t1}, info)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"collect": result.collect, "eval": result.eval, "perturbation_sha256": digest,
                    "timings": result.timings, "info": info}, tmp)
        tmp.replace(cache)
        return result

    def protected_detections(self, prot: Protected, name: str) -> list:
        if not speed.optimizations_enabled():
            prot.detections.pop(name, None)  # recomputed per call (the straightforward way)
        return _cached(prot.detections, name, lambda: self._detect(name, prot.eval),
                       f"detector {name!r} failed on protected images")

    def clean_detections(self, name: str) -> list:
        if not speed.optimizations_enabled():
            self._clean_dets.pop(name, None)
        return _cached(self._clean_dets, name, lambda: self._detect(name, self.data.eval.images),
                       f"detector {name!r} failed on clean images")

    # -- the attacker's data preparation -------------------------------------------------
    def _prepare(self, images: torch.Tensor, size: int):
        from ..prep import DataPreparation

        prep = DataPreparation(self.detector(self.cfg.detectors.attacker), size, crop=self.cfg.detectors.crop)
        return prep(images)

    def attacker_crops(self, prot: Protected, seed: int, size: int, adaptation) -> tuple:
        """``(crops, attrs of the kept images, crop_kept list, n_kept)`` of the protected collect split."""
        key = (size, _purify_key(adaptation))
        if not speed.optimizations_enabled():
            prot.preps.pop(key, None)
            self._clean_prep.pop(key, None)

        def prepare():
            collected = adaptation.purify(prot.collect)
            res = self._prepare(collected, size)
            if key not in self._clean_prep:
                self._clean_prep[key] = self._prepare(adaptation.purify(self.data.collect.images), size)
            crop_kept = usable_crops(self._clean_prep[key], res, collected.shape[0])
            attrs = self.data.collect.attrs[res.kept.cpu().long()]
            return res.crops.detach().float().cpu(), attrs, crop_kept, int(res.kept.numel())

        return _cached(prot.preps, key, prepare, "the attacker's data preparation failed")

    # -- cells ---------------------------------------------------------------------------
    def clean_reference(self, model_name: str, adaptation_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model-size clean input, original model's forgery of it), after the adaptation's purify."""
        adaptation = self.adaptations[adaptation_name]
        key = (model_name, _purify_key(adaptation, adaptation_name))
        if not speed.optimizations_enabled():
            self._clean_fake.pop(key, None)
        if key not in self._clean_fake:
            model = self.model(model_name)
            clean = adaptation.purify(self.data.eval.images)
            x = to_size(clean, model.image_size)
            fake = self._generate(model, clean, self.data.eval.attrs, (0, "clean", model_name))
            self._clean_fake[key] = (x, fake)
        return self._clean_fake[key]

    def measure(self, cell: Cell, model, prot: Protected, crop_kept, timings: dict) -> dict:
        """Every metric of one cell."""
        from ..metrics import EvalBatch

        adaptation = self.adaptations[cell.adaptation]
        x_clean, fake_clean = self.clean_reference(cell.model, cell.adaptation)
        t0 = time.perf_counter()
        purified = adaptation.purify(prot.eval)
        x_prot = to_size(purified, model.image_size)
        fake_prot = self._generate(model, purified, self.data.eval.attrs, (cell.seed, "forge", *cell))
        t1 = time.perf_counter()
        names = list(self.cfg.detectors.names)
        dets_clean = {d: self.clean_detections(d) for d in names}
        dets_prot = {d: self.protected_detections(prot, d) for d in names}
        t2 = time.perf_counter()
        reference = fake_clean
        if cell.round > 0:
            # The defense is judged against the attacker's *current* model: G'(x + W) vs G'(x).
            # Comparing with the original G(x) would count the model's own drift as disruption
            # (the "none" defense would then score); the drift is reported on its own instead.
            reference = self._generate(model, adaptation.purify(self.data.eval.images), self.data.eval.attrs,
                                       (cell.seed, "own-clean", *cell))
        batch = EvalBatch(clean=x_clean, protected=x_prot, fake_clean=reference, fake_protected=fake_prot,
                          detections_clean=dets_clean, detections_protected=dets_prot,
                          crop_kept=crop_kept if cell.round > 0 else None)
        metrics: dict = {}
        for metric in self.metrics:
            metrics.update(metric.compute(batch))
        if cell.round > 0:
            metrics["retrained_clean_mse"] = float(((reference - fake_clean) ** 2).mean())
        timings.update(generate_s=t1 - t0, detect_s=t2 - t1, metrics_s=time.perf_counter() - t2)
        if cell.seed == self.cfg.run.seeds[0]:
            self._save_sample(cell, prot, fake_clean, fake_prot)
        return metrics

    def _save_sample(self, cell: Cell, prot: Protected, fake_clean, fake_prot):
        """A few images per cell for the figures (first seed only)."""
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        n = min(2, prot.eval.shape[0])
        blob = {"clean": self.data.eval.images[:n].clone(), "protected": prot.eval[:n].clone(),
                "fake_clean": fake_clean[:n, 0].clone(), "fake_protected": fake_prot[:n, 0].clone(), "cell": cell.key()}
        torch.save(blob, folder / f"{cell.defense}__{cell.model}__{cell.adaptation}__r{cell.round}.pt")
        det_path = folder / f"detections__{cell.defense}.pt"
        if not det_path.exists():
            boxes = {}
            for d in self.cfg.detectors.names:
                try:
                    boxes[d] = (self.clean_detections(d)[0], self.protected_detections(prot, d)[0])
                except _Failed:
                    continue
            # written under a private name, then renamed: Ray workers may race for the same file
            tmp = det_path.with_name(f".{det_path.name}.{os.getpid()}")
            torch.save({"clean": self.data.eval.images[:1].clone(), "protected": prot.eval[:1].clone(),
                        "boxes": {d: {"clean": c.boxes.clone(), "clean_scores": c.scores.clone(),
                                      "protected": p.boxes.clone(), "protected_scores": p.scores.clone()}
                                  for d, (c, p) in boxes.items()}}, tmp)
            tmp.replace(det_path)

    def run_chain(self, cells: list[Cell], prot: Protected, bar=None) -> None:
        """Rounds 0..k of one (seed, defense, model, adaptation); writes every cell in ``cells``."""
        wanted = {c.round: c for c in cells}
        state = self.start_chain(min(cells, key=lambda c: c.round))
        for k in range(0, max(wanted) + 1):
            cell = wanted.get(k) or wanted[min(wanted)]._replace(round=k)
            state = self.advance(state, cell, prot, write=k in wanted, bar=bar)

    def start_chain(self, cell: Cell) -> ChainState:
        """The state before round 0 of ``cell``'s chain: its round-0 model (or the failure to load it)."""
        try:
            model = self.model(cell.model)
        except _Failed as exc:
            return ChainState(None, "", "", failure=(exc, ""))
        return ChainState(model, self._model_hash[cell.model], self._model_hash[cell.model])

    def advance(self, state: ChainState, cell: Cell, prot: Protected, *, write: bool = True, bar=None) -> ChainState:
        """Round ``cell.round`` of a chain: retrain (rounds >= 1) from ``state``, then, if ``write``,
        measure and store the cell.  Returns the state the next round starts from.  A round that is
        already stored (``write=False``, after ``--resume``) still retrains, so that later rounds
        start from the same model as in an uninterrupted run (every step is seeded)."""
        k = cell.round
        if state.failure is None and k > 0:
            state = replace(state, shared=dict(state.shared))
            t0 = time.perf_counter()
            try:
                adaptation = self.adaptations[cell.adaptation]
                current = state.model
                crops, attrs, state.crop_kept, n_kept = self.attacker_crops(prot, cell.seed, current.image_size,
                                                                            adaptation)
                t1 = time.perf_counter()
                if crops is None or n_kept == 0:
                    state.retrain_info = {"retrain_images": 0, "model_unchanged": True}
                else:
                    _seed(cell.seed, "adapt", cell.defense, cell.model, cell.adaptation, k)
                    model_attrs = select_attrs(attrs, self.data.attr_names, current.attributes,
                                               f"model {current.name!r}")
                    before = state.hash
                    extra, d_net = {}, None
                    if k == 1:
                        self.model(cell.model)  # (in a fresh worker process: loads the trained D too)
                        d_net = self._discriminators.get(cell.model)
                    if d_net is not None and "discriminator" in inspect.signature(adaptation.adapt).parameters:
                        extra["discriminator"] = d_net.to(self.device)
                    new = adaptation.adapt(current, crops.to(self.device), model_attrs.to(self.device),
                                           steps=self.cfg.adaptations.steps,
                                           seed=derived_seed(cell.seed, "adapt", k) % (2 ** 31),
                                           progress=self.progress, **extra)
                    if state_dict_hash(current) != before:
                        self._models.pop(cell.model, None)  # the cached model is spoilt: reload it
                        raise TsdfBenchError(
                            f"adaptation {cell.adaptation!r} changed the model in place; adapt() must "
                            "return a new model and leave its input untouched")
                    state.model = new.to(self.device).eval()
                    state.hash = state_dict_hash(state.model)
                    state.retrain_info = {"retrain_images": n_kept, "model_unchanged": state.hash == before}
                    info = getattr(adaptation, "last_info", None)
                    if isinstance(info, dict):
                        state.retrain_info["adaptation_info"] = dict(info)
                state.shared.update(prep_s=t1 - t0, adapt_s=time.perf_counter() - t1)
            except Exception as exc:  # noqa: BLE001 - every later round of the chain fails with it
                state.failure = (exc, f"retraining round {k}")
        if not write:
            return state
        if state.failure is not None:
            exc, stage = state.failure
            self._write_error(cell, exc, prot, bar, stage=stage)
            return state
        timings = {**prot.timings, **state.shared}
        try:
            metrics = self.measure(cell, state.model, prot, state.crop_kept, timings)
        except Exception as exc:  # noqa: BLE001
            self._write_error(cell, exc, prot, bar)
            return state
        provenance = {**self.provenance_base(), "seed": cell.seed, "checkpoint_sha256": state.hash,
                      "base_checkpoint_sha256": state.base_hash,
                      "perturbation_sha256": prot.perturbation_sha256, **prot.info,
                      "adaptation_steps": self.cfg.adaptations.steps if k > 0 else 0, **state.retrain_info}
        self.store.write_cell(self.run_id, cell.key(), status="ok", metrics=metrics,
                              provenance=provenance, timings=timings)
        if bar is not None:
            bar.update(1)
        return state

    def _write_error(self, cell: Cell, exc: BaseException, prot: Protected | None = None, bar=None, stage=""):
        failure = CellFailure.of(exc)
        text = f"{stage + ': ' if stage else ''}{failure.text}"
        tb = failure.traceback_text
        provenance = {**self.provenance_base(), "seed": cell.seed, "traceback": tb}
        if prot is not None:
            provenance["perturbation_sha256"] = prot.perturbation_sha256
        self.store.write_cell(self.run_id, cell.key(), status="error", error=text, provenance=provenance)
        self.log(f"cell {cell.defense}/{cell.model}/{cell.adaptation}/round {cell.round}/seed {cell.seed} "
                 f"failed: {text}")
        if bar is not None:
            bar.update(1)

    # -- the loop ------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        return plan_cells(self.cfg, {n: bool(getattr(a, "retrains", False)) for n, a in self.adaptations.items()})

    def run(self) -> RunSummary:
        """Run every unfinished cell; returns counts and the failures.

        The speed switch (:mod:`tsdf_bench.speed`) is ``[run] optimize`` for the whole run
        (``TSDF_BENCH_OPTIMIZE=0`` in the environment turns it off regardless)."""
        with speed.optimizations(self.cfg.run.optimize):
            return self._run()

    def _run(self) -> RunSummary:
        cells = self.cells()
        done = self.store.done(self.run_id)
        todo = [c for c in cells if tuple(c) not in done]
        if todo:
            self.log(f"{len(todo)} of {len(cells)} cells to run; loading data ({self.cfg.data.source})")
            self.provenance_base()  # loads the data: a data problem stops the run here, with its own message
        bar = self._bar(total=len(cells), initial=len(cells) - len(todo), desc="cells")
        try:
            for seed in self.cfg.run.seeds:
                for dname in self.cfg.defenses.names:
                    group = [c for c in todo if c.seed == seed and c.defense == dname]
                    if not group:
                        continue
                    bar.set_description(f"{dname} (seed {seed})")
                    try:
                        prot = self.protect(seed, dname)
                    except Exception as exc:  # noqa: BLE001 - every cell of this defense fails with it
                        for c in group:
                            self._write_error(c, exc, None, bar, stage=f"defense {dname!r} fit/protect")
                        continue
                    for mname in self.cfg.models.names:
                        for aname in self.cfg.adaptations.names:
                            chain = [c for c in group if c.model == mname and c.adaptation == aname]
                            if chain:
                                bar.set_description(f"{dname}/{mname}/{aname} (seed {seed})")
                                self.run_chain(chain, prot, bar)
        finally:
            bar.close()
        return summarize(self, cells, todo)


def summarize(runner: Runner, cells: list[Cell], todo: list[Cell]) -> RunSummary:
    """Counts and failures of a run's cells, read back from its store."""
    rows = {(r["defense"], r["model"], r["adaptation"], r["round"], r["seed"]): r
            for r in runner.store.rows(runner.run_id)}
    errors = [rows[tuple(c)] for c in cells if tuple(c) in rows and rows[tuple(c)]["status"] != "ok"]
    ok = sum(1 for c in cells if tuple(c) in rows and rows[tuple(c)]["status"] == "ok")
    return RunSummary(runner.run_id, runner.run_dir, len(cells), ok, errors, len(cells) - len(todo))


SECTION_OF = {"defense": "defenses", "adaptation": "adaptations", "metric": "metrics", "model": "models",
              "detector": "detectors"}


def create_checked(registry, kind: str, name: str, options: dict, table: str | None = None, **extra):
    """``registry.create`` that turns a misspelt option into a :class:`ConfigError` naming the table
    (``table``, default ``name``), the bad key, the closest valid one and the valid ones (read from
    the plugin's signature)."""
    try:
        return registry.create(kind, name, **extra, **options)
    except TypeError as exc:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if not match:
            raise
        bad = match.group(1)
        valid = _parameters(registry.get(kind, name).factory) - set(extra)
        hint = ""
        if valid:
            close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.4)
            hint = (f" Did you mean {close[0]!r}?" if close else "") + f" Valid options: {', '.join(sorted(valid))}."
        raise ConfigError(f"[{SECTION_OF[kind]}.{table or name}]: {kind} {name!r} has no option {bad!r}.{hint}") from exc


def check_options(cfg: RunConfig, registry) -> None:
    """Create every defense, adaptation and metric once (cheap; models and detectors are not built),
    so a misspelt plugin option fails before any work starts."""
    for name in cfg.defenses.names:
        create_checked(registry, "defense", cfg.defenses.plugin_for(name), cfg.defenses.options_for(name), table=name,
                       seed=0, device="cpu")
    for name in cfg.adaptations.names:
        create_checked(registry, "adaptation", name, cfg.adaptations.options_for(name))
    for name in cfg.metrics.names:
        create_checked(registry, "metric", name, cfg.metrics.options_for(name))


def _parameters(factory) -> set[str]:
    """Keyword parameters of a plugin factory (a class, a function or a ``lazy(...)`` target)."""
    target = getattr(factory, "target", None)
    if target:
        module, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001
            return set()
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _purify_key(adaptation, name: str = "") -> str:
    """Adaptations that keep the base identity ``purify`` share one cache entry."""
    from ..adaptations.base import Adaptation

    if type(adaptation).purify is Adaptation.purify:
        return "identity"
    return name or type(adaptation).__name__


def usable_crops(clean, protected, n: int) -> list[bool]:
    """Per collected image: the attacker got a crop, and it overlaps the clean image's crop at
    IoU >= 0.5 (:func:`tsdf_bench.prep.crop_ious`).  Where the clean image itself yields no crop
    there is no reference, and a crop of the protected image counts as usable."""
    from ..prep import crop_ious

    ious = crop_ious(clean, protected)
    kept = {int(k) for k in protected.kept.tolist()}
    return [(ious[i] >= CROP_IOU_USABLE) if i in ious else (i in kept) for i in range(n)]
