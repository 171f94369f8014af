"""The benchmark loop: defenses x models x adaptations x rounds x seeds, one stored row per cell.

For each seed and defense:

1. **Fit** the defense on the fit split (white-box against every configured model and the
   white-box detectors), then **protect** the collect and eval splits (:mod:`.data` keeps the
   roles disjoint).  Protected images are cached under ``cache/`` so ``--resume`` never refits.
2. **Round 0** (every adaptation): the original model forges the protected eval photos at its
   input size; ``G(purify(x + W))`` is compared with ``G(purify(x))`` (the adaptation's input
   transform on both, so only the defense is measured), and every configured detector runs on
   ``x`` vs ``x + W``.
3. **Round k >= 1** (adaptations with ``retrains = True``): :mod:`.attacker` collects, prepares
   and retrains (``g_steps`` generator updates), then forges the eval photos through its own
   pipeline.  Each row then holds the defense measured against the retrained model (its own
   clean forgery: ``sr_mask``), the original model (``sr_mask_orig``), the clean-retraining control
   (``sr_mask_ctrl``, ``adaptation_gain = sr_mask_ctrl - sr_mask``) and the attacker's best
   option (``sr_mask_worst``, with ``attacker_keeps``); the ``retrained_clean_mse`` metric is the drift.

Every rate carries its count and a 95% cluster-bootstrap interval over source photos
(``*_n``, ``*_hits``, ``*_lo``, ``*_hi``, ``*_photos``; :mod:`tsdf_bench.stats`).  Clean forgeries and
detections are shared across defenses when optimisations are on (:mod:`tsdf_bench.speed`).  A
failing cell is stored with status ``error``, the error text and the traceback; the other cells go
on.  Every random step reseeds torch from (seed, step names), so a resumed run gives the rows of
an uninterrupted one.  :mod:`.ray_executor` runs each round of a chain as its own Ray task.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .. import speed
from ..config import RunConfig
from ..hashing import state_sha256
from .attacker import Attacker, ModelChangedInPlace
from .data import RunData, load_run_data
from .measure import MeasureMixin, log_phase
from .plan import Cell, create_checked, default_metrics, groups, plan_cells
from .protection import ProtectionMixin
from .provenance import device_description, git_state, resolve_device, versions
from .state import ChainState, CellFailure, Protected, RunSummary, _cached, _Failed, summarize
from .store import ResultsStore


class Runner(ProtectionMixin, MeasureMixin):
    """Run the cells of ``cfg`` into ``store`` under ``run_id`` (see the module docstring).

    ``data`` may be given (a :class:`RunData`) to bypass the configured source; ``progress``
    shows tqdm bars; ``log`` receives one-line messages.
    """

    def __init__(self, cfg: RunConfig, registry, store: ResultsStore, run_id: str, run_dir, *,
                 progress: bool = True, data: RunData | None = None, log: Callable[[str], None] | None = None,
                 git: dict | None = None):
        self.cfg, self.registry, self.store, self.run_id = cfg, registry, store, run_id
        # the code's commit when the run started (workers get the parent's: a commit made while
        # the run goes on must not appear in its rows)
        self.git = dict(git) if git is not None else git_state()
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.device = resolve_device(cfg.run.device)
        # the speed switch, decided once ([run] optimize, TSDF_BENCH_OPTIMIZE) and passed on explicitly
        self.optimize = speed.resolve(cfg.run.optimize)
        self._data = data
        self._models: dict[str, object] = {}
        self._model_hash: dict[str, str] = {}
        self._model_record: dict[str, dict] = {}  # model -> checkpoint file path, its sha256, random_init
        self._discriminators: dict[str, object] = {}  # model -> its trained D (None: G-only checkpoint)
        self._detectors: dict[str, object] = {}
        self._clean_fake: dict = {}
        self._clean_dets: dict = {}
        self.attacker = Attacker(cfg, lambda: self.data, self.detector, self.device, progress,
                                 controls_dir=self.run_dir / "cache" / "controls" if cfg.run.workers > 1 else None,
                                 folder=self.run_dir / "cache")
        self.adaptations = {}
        for n in cfg.adaptations.names:
            self.adaptations[n] = create_checked(registry, "adaptation", cfg.adaptations.plugin_for(n),
                                                 cfg.adaptations.options_for(n), table=n)
            self.adaptations[n].config_name = n  # variants of one plugin keep their caches apart
        self.metrics = [create_checked(registry, "metric", n, cfg.metrics.options_for(n)) for n in self.metric_names()]
        self._provenance_base: dict | None = None

    # -- plumbing ------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        return list(self.cfg.metrics.names) or default_metrics(self.registry)

    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = load_run_data(self.cfg, folder=self.run_dir / "cache")
        return self._data

    def provenance_base(self) -> dict:
        if self._provenance_base is None:
            cfg = self.cfg
            used = {"defense": [cfg.defenses.plugin_for(d) for d in cfg.defenses.names], "model": cfg.models.names,
                    "adaptation": [cfg.adaptations.plugin_for(a) for a in cfg.adaptations.names], "metric": self.metric_names(),
                    "detector": list(dict.fromkeys([*cfg.detectors.names, cfg.detectors.attacker]))}
            self._provenance_base = {
                "config_hash": cfg.hash, "run_name": cfg.run.name, "scale": cfg.run.scale,
                "versions": versions(self.registry, used), "device": device_description(self.device),
                **self.git, "optimize": self.optimize, "torch_threads": torch.get_num_threads(), "data": self.data.description, "data_hash": self.data.data_hash,
                "data_notes": self.data.notes, "split": self.data.split, "metrics": self.metric_names(), "attacker_detector": cfg.detectors.attacker,
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
            self._model_hash[name] = state_sha256(model.state_dict())
            return model

        return _cached(self._models, name, load, f"model {name!r} failed to load")

    def _load_model(self, name: str):
        """A model with a checkpoint, or at paper scale, comes from its plugin (a paper-scale model
        without a checkpoint is an error unless ``random_init = true``); a demo/smoke model without
        one comes from :func:`tsdf_bench.models.zoo.get_model` (shipped with the package, cached, or
        trained on first use)."""
        from ..models import checkpoints

        cfg = self.cfg
        options, random_init = checkpoints.model_options(name, cfg.run.scale, cfg.models.options_for(name),
                                                         self.registry)
        retraining = [a for a in self.adaptations.values() if getattr(a, "retrains", False)]
        warmup = getattr(retraining[0], "warmup_d_steps", None) if retraining else None
        fresh = f"fresh, warm-up {int(warmup) if warmup is not None else cfg.adaptations.g_steps // 4} D steps"
        if "checkpoint" in options or cfg.run.scale == "paper" or not cfg.models.train:
            self.log(f"loading model {name} ({cfg.run.scale} scale)")
            model = self.registry.create("model", name, scale=cfg.run.scale, **options)
            self._model_record[name] = _file_record(checkpoints.checkpoint_record(options, random_init))
            d_path = checkpoints.discriminator_path(cfg.models.options_for(name))
            if d_path:  # the retraining attacker starts from the official D (no fresh-D warm-up)
                self._discriminators[name] = checkpoints.load_official_discriminator(model, d_path)
                self._model_record[name]["discriminator"] = checkpoints.discriminator_record("official", d_path)
                self.log(f"model {name}: discriminator from {d_path}")
            else:
                self._model_record[name]["discriminator"] = fresh
        else:
            from ..models.zoo import get_model

            reference = options.pop("reference", None)  # HiSD's reference image: set after training
            gen = self.data.generator_train  # None: the zoo's embedded training persons (never a protected one)
            train_data = None if gen is None else (gen.images, gen.attrs, self.data.attr_names)
            self.log(f"loading model {name} ({cfg.run.scale} scale: shipped, cached or trained on first use)")
            model = get_model(name, scale=cfg.run.scale, registry=self.registry, train_data=train_data,
                              progress=self.progress, device=self.device, **options)
            if reference is not None:
                model.set_reference(reference)
            path = model.weights_file  # shipped with the package, cached, or just trained
            self._model_record[name] = _file_record(checkpoints.checkpoint_record({"checkpoint": path}))
            self._model_record[name]["weights_source"] = model.weights_source
            self.log(f"model {name}: {model.weights_source} weights {path}")
            # the attacker trained this model, so it also has its discriminator for retraining
            self._discriminators[name] = checkpoints.load_discriminator(model, path)
            self._model_record[name]["discriminator"] = (checkpoints.discriminator_record("demo")
                                                         if self._discriminators[name] is not None else fresh)
        model.optimize = self.optimize  # the run's switch, for generate_targets and the defenses
        return speed.channels_last(model.to(self.device).eval(), self.optimize)

    def detector(self, name: str):
        def load():
            det = self.registry.create("detector", name, **self.cfg.detectors.options_for(name))
            return det.to(self.device).eval() if isinstance(det, torch.nn.Module) else det

        return _cached(self._detectors, name, load, f"detector {name!r} failed to load")

    @torch.no_grad()
    def _detect(self, name: str, images: torch.Tensor) -> list:
        det = self.detector(name)
        out = []
        for s in self._batches(images.shape[0]):
            out.extend(det.detect(images[s].to(self.device)))
        return [type(d)(*(t.detach().cpu() if torch.is_tensor(t) else t for t in (d.boxes, d.scores, d.landmarks)))
                for d in out]

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
        """Round ``cell.round`` of a chain: the attacker collects, prepares and retrains (rounds
        >= 1) from ``state``, then, if ``write``, the cell is measured and stored.  Returns the state
        the next round starts from.  A round already stored (``write=False``, after ``--resume``)
        still retrains, so later rounds start from the same model (every step is seeded)."""
        k = cell.round
        if state.failure is None and k > 0:
            state = replace(state, shared=dict(state.shared))
            try:
                adaptation = self.adaptations[cell.adaptation]
                t0 = time.perf_counter()
                collection = _cached(prot.preps, ("collect", state.model.image_size, *self.attacker.prep_key(adaptation)),
                                     lambda: self.attacker.collection(prot.collect, state.model.image_size, adaptation),
                                     "the attacker's data preparation failed")
                t1 = time.perf_counter()
                d_net = None
                if k == 1:
                    self.model(cell.model)  # (in a fresh worker process: loads the trained D too)
                    d_net = self._discriminators.get(cell.model)
                done = self._control_if_same(state, cell, collection, adaptation) or self.attacker.retrain(
                    state.model, collection, adaptation, seed=cell.seed, k=k, discriminator=d_net)
                state.model, state.hash, state.usable = done.model, done.hash, collection.usable
                state.retrain_info = done.info
                state.shared.update(prep_s=t1 - t0, adapt_s=done.seconds)
                label = cell.label
                log_phase(self.log, "prep", label, t1 - t0)
                log_phase(self.log, "retrain", f"{label} ({done.info.get('retrain_images', 0)} crops)", done.seconds)
            except Exception as exc:  # noqa: BLE001 - every later round of the chain fails with it
                if isinstance(exc, ModelChangedInPlace):
                    self._models.pop(cell.model, None)  # the cached model is spoilt: reload it
                state.failure = (exc, f"retraining round {k}")
        if not write:
            return state
        if state.failure is not None:
            exc, stage = state.failure
            self._write_error(cell, exc, prot, bar, stage=stage)
            return state
        timings = {**prot.timings, **state.shared}
        try:
            metrics = self.measure(cell, state, prot, timings)
        except Exception as exc:  # noqa: BLE001
            self._write_error(cell, exc, prot, bar)
            return state
        budget = {"g_steps": 0, "d_steps": 0} if k == 0 else {}
        provenance = {**self.provenance_base(), **self.defense_provenance(cell.defense),
                      **self.adaptation_provenance(cell.adaptation), "seed": cell.seed,
                      "checkpoint_sha256": state.hash, "base_checkpoint_sha256": state.base_hash,
                      **self._model_record.get(cell.model, {}),
                      "perturbation_sha256": prot.perturbation_sha256, **prot.info, **budget, **state.retrain_info}
        if k > 0:
            control = self._control(cell)
            provenance.update(control_checkpoint_sha256=control.hash, control_retrain_images=control.info.get(
                "retrain_images"))
        self.store.write_cell(self.run_id, cell.key(), status="ok", metrics=metrics,
                              provenance=provenance, timings=timings)
        if bar is not None:
            bar.update(1)
        return state

    def defense_provenance(self, name: str) -> dict:
        """The defense's own resolved options (its table's ``eps`` included, not the global one)."""
        options = self.cfg.defenses.options_for(name)
        return {"eps": options.get("eps", self.cfg.defenses.eps), "defense_options": options,
                "transfer_of": self.cfg.defenses.options.get(name, {}).get("transfer_of")}

    def adaptation_provenance(self, name: str) -> dict:
        """The adaptation's plugin, options and the attacker's pipeline ("detect" or "aligned")."""
        from ..adaptations.base import Adaptation

        adaptation = self.adaptations[name]
        return {"adaptation_plugin": self.cfg.adaptations.plugin_for(name),
                "adaptation_options": self.cfg.adaptations.options_for(name),
                "pipeline": getattr(adaptation, "pipeline", "detect"),
                "purifies": type(adaptation).purify is not Adaptation.purify,
                "compare_to": self.cfg.adaptations.compare_to(name),
                "attacker_detector": self.attacker.detector_name(adaptation)}

    def _write_error(self, cell: Cell, exc: BaseException, prot: Protected | None = None, bar=None, stage=""):
        failure = CellFailure.of(exc)
        text = f"{stage + ': ' if stage else ''}{failure.text}"
        tb = failure.traceback_text
        provenance = {**self.provenance_base(), "seed": cell.seed, "traceback": tb}
        if prot is not None:
            provenance["perturbation_sha256"] = prot.perturbation_sha256
        self.store.write_cell(self.run_id, cell.key(), status="error", error=text, provenance=provenance)
        self.log(f"cell {cell.label} failed: {text}")
        if bar is not None:
            bar.update(1)

    # -- the loop ------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        return plan_cells(self.cfg, {n: bool(getattr(a, "retrains", False)) for n, a in self.adaptations.items()})

    def run(self) -> RunSummary:
        """Run every unfinished cell; returns counts and the failures."""
        cells = self.cells()
        done = self.store.done(self.run_id)
        todo = [c for c in cells if tuple(c) not in done]
        if todo:
            self.log(f"{len(todo)} of {len(cells)} cells to run; loading data ({self.cfg.data.source})")
            self.provenance_base()  # loads the data: a data problem stops the run here, with its own message
        if todo and self.cfg.run.workers > 1:
            from .pool import run_in_pool

            return run_in_pool(self, cells, todo)
        bar = self._bar(total=len(cells), initial=len(cells) - len(todo), desc="cells")
        try:
            for seed, dname, group in groups(self.cfg, todo):
                self.run_group(seed, dname, group, bar)
        finally:
            bar.close()
            self.release_clean_cache()  # the clean forgeries kept on disk go with the run
        return summarize(self, cells, todo)

    def run_group(self, seed: int, dname: str, group: list[Cell], bar=None) -> None:
        """Fit and apply defense ``dname`` for ``seed``, then run every chain of ``group`` (its cells)."""
        if bar is not None:
            bar.set_description(f"{dname} (seed {seed})")
        try:
            prot = self.protect(seed, dname)
        except Exception as exc:  # noqa: BLE001 - every cell of this defense fails with it
            for c in group:
                self._write_error(c, exc, None, bar, stage=f"defense {dname!r} fit/protect")
            return
        for mname in self.cfg.models.names:
            for aname in self.cfg.adaptations.names:
                chain = [c for c in group if c.model == mname and c.adaptation == aname]
                if chain:
                    if bar is not None:
                        bar.set_description(f"{dname}/{mname}/{aname} (seed {seed})")
                    self.run_chain(chain, prot, bar)


def _file_record(record: dict) -> dict:
    """A checkpoint record as rows carry it: the file's sha256 as ``checkpoint_file_sha256``
    (``checkpoint_sha256`` is the weights of the model measured in a round)."""
    return {("checkpoint_file_sha256" if k == "checkpoint_sha256" else k): v for k, v in record.items()}
