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
   option (``sr_mask_worst``, with ``attacker_keeps``); ``retrained_clean_mse`` is the drift.

Every rate carries its count and a 95% cluster-bootstrap interval over source photos
(``*_n``, ``*_hits``, ``*_lo``, ``*_hi``, ``*_photos``; :mod:`tsdf_bench.stats`).  Clean forgeries and
detections are shared across defenses when optimisations are on (:mod:`tsdf_bench.speed`).  A
failing cell is stored with status ``error``, the error text and the traceback; the other cells go
on.  Every random step reseeds torch from (seed, step names), so a resumed run gives the rows of
an uninterrupted one.  :mod:`.ray_executor` runs each round of a chain as its own Ray task.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import speed
from ..config import RunConfig
from ..metrics import MASK_THRESHOLD, SUCCESS_THRESHOLD, edit_mask, l2_mask
from ..stats import photo_counts, rate
from .attacker import Attacker, ModelChangedInPlace, _purify_key
from .data import RunData, load_run_data, select_attrs, to_size
from .plan import Cell, check_options, create_checked, plan_cells  # noqa: F401 - re-exported
from .provenance import derived_seed, device_description, git_state, resolve_device, state_dict_hash, tensors_hash, versions
from .store import ResultsStore


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
    usable: list | None = None  # per collected photo: the attacker's crop is the right face
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
        self._model_record: dict[str, dict] = {}  # model -> checkpoint file path, its sha256, random_init
        self._discriminators: dict[str, object] = {}  # model -> its trained D (None: G-only checkpoint)
        self._detectors: dict[str, object] = {}
        self._clean_fake: dict = {}
        self._clean_dets: dict = {}
        self._controls: dict = {}
        self.attacker = Attacker(cfg, lambda: self.data, self.detector, self.device, progress)
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
        """A model with a checkpoint, or at paper scale, comes from its plugin (a paper-scale model
        without a checkpoint is an error unless ``random_init = true``); a demo/smoke model without
        one is trained on first use by :func:`tsdf_bench.models.zoo.get_model` (cached)."""
        from ..models import checkpoints

        cfg = self.cfg
        options, random_init = checkpoints.model_options(name, cfg.run.scale, cfg.models.options_for(name),
                                                         self.registry)
        if "checkpoint" in options or cfg.run.scale == "paper" or not cfg.models.train:
            self.log(f"loading model {name} ({cfg.run.scale} scale)")
            model = self.registry.create("model", name, scale=cfg.run.scale, **options)
            self._model_record[name] = checkpoints.checkpoint_record(options, random_init)
        else:
            from ..models.zoo import get_model, model_path

            reference = options.pop("reference", None)  # HiSD's reference image: set after training
            gen = self.data.generator_train  # None: the zoo's embedded training persons (never a protected one)
            train_data = None if gen is None else (gen.images, gen.attrs, self.data.attr_names)
            self.log(f"loading model {name} ({cfg.run.scale} scale; trained on first use)")
            model = get_model(name, scale=cfg.run.scale, registry=self.registry, train_data=train_data,
                              progress=self.progress, device=self.device, **options)
            if reference is not None:
                model.set_reference(reference)
            path = model_path(name, cfg.run.scale, options.get("seed", 0))
            self._model_record[name] = checkpoints.checkpoint_record({"checkpoint": path})
            # the attacker trained this model, so it also has its discriminator for retraining
            self._discriminators[name] = checkpoints.load_discriminator(model, path)
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
                "fit_problems": model_problems, **getattr(defense, "info", {})}
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

    # -- measuring --------------------------------------------------------------------------
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

    def forgeable(self, prot: Protected, size: int, adaptation):
        """The protected eval photos as the attacker's pipeline gives them (cached per defense)."""
        key = ("eval", size, _purify_key(adaptation))
        if not speed.optimizations_enabled():
            prot.preps.pop(key, None)
        return _cached(prot.preps, key, lambda: self.attacker.forgeable(prot.eval, size, adaptation),
                       "the attacker's preparation of the eval photos failed")

    def _pair_success(self, fake_prot, reference, x) -> torch.Tensor:
        """Per (image, target): CMUA's masked L2 above the success threshold (the forgery metric's
        ``mask_threshold`` / ``success_threshold`` when configured)."""
        options = self.cfg.metrics.options_for("forgery")
        mask = edit_mask(reference, x, options.get("mask_threshold", MASK_THRESHOLD))
        return l2_mask(fake_prot, reference, mask) > options.get("success_threshold", SUCCESS_THRESHOLD)

    def _rate_columns(self, name: str, success: torch.Tensor, photos) -> dict:
        counts = photo_counts(success.numpy(), photos)
        r = rate(counts)
        return {name: r["rate"], f"{name}_lo": r["lo"], f"{name}_hi": r["hi"], f"{name}_n": r["pairs"],
                f"{name}_hits": r["successes"], f"{name}_photos": counts}

    def measure(self, cell: Cell, state: ChainState, prot: Protected, timings: dict) -> dict:
        """Every metric of one cell.

        Round 0: the original model forges the protected eval photos at its input size.  Round
        k >= 1: the attacker's pipeline prepares them (:meth:`forgeable`) and the retrained model
        forges them, against its own clean forgery of the same crops; the same inputs are scored
        against the original model, the clean-retraining control and the attacker's best option."""
        from ..metrics import EvalBatch

        adaptation, model = self.adaptations[cell.adaptation], state.model
        t0 = time.perf_counter()
        if cell.round == 0:
            x_clean, reference = self.clean_reference(cell.model, cell.adaptation)
            x_prot = to_size(adaptation.purify(prot.eval), model.image_size)
            attrs, photos, extra = self.data.eval.attrs, self.data.eval.photos, {}
        else:
            fg = self.forgeable(prot, model.image_size, adaptation)
            x_clean, x_prot, attrs = fg.clean, fg.protected, self.data.eval.attrs[fg.kept]
            photos = [self.data.eval.photos[i] for i in fg.kept]
            reference = self._generate(model, x_clean, attrs, (cell.seed, "own-clean", *cell)) if fg.kept else None
            extra = {"eval_kept": len(fg.kept), "eval_dropped": fg.n_photos - len(fg.kept)}
        forged = x_prot.shape[0] > 0  # round >= 1: nothing to forge when the pipeline dropped every photo
        fake_prot = self._generate(model, x_prot, attrs, (cell.seed, "forge", *cell)) if forged else None
        reference = reference if forged else None
        t1 = time.perf_counter()
        names = list(self.cfg.detectors.names)
        dets_clean = {d: self.clean_detections(d) for d in names}
        dets_prot = {d: self.protected_detections(prot, d) for d in names}
        t2 = time.perf_counter()
        batch = EvalBatch(clean=x_clean, protected=x_prot, fake_clean=reference, fake_protected=fake_prot,
                          detections_clean=dets_clean, detections_protected=dets_prot,
                          crop_kept=state.usable if cell.round > 0 else None)
        metrics: dict = dict(extra)
        for metric in self.metrics:
            metrics.update(metric.compute(batch))
        if forged:
            success = self._pair_success(fake_prot, reference, x_clean)
            metrics.update(self._rate_columns("sr_mask", success, photos))
            if cell.round > 0:
                metrics.update(self._persistence(cell, state, x_clean, x_prot, reference, attrs, photos, success,
                                                 timings))
        t3 = time.perf_counter()
        timings.update(generate_s=t1 - t0, detect_s=t2 - t1, metrics_s=t3 - t2)
        if cell.seed == self.cfg.run.seeds[0] and forged:
            self._save_sample(cell, prot, reference, fake_prot)
        return metrics

    def _persistence(self, cell, state, x_clean, x_prot, reference, attrs, photos, success, timings) -> dict:
        """The columns that tell what retraining on the protected photos did (see the attacker)."""
        t0 = time.perf_counter()
        base = self.model(cell.model)
        out = {}
        scored = {}
        for role, model in (("orig", base), ("ctrl", self._control(cell).model)):
            ref = self._generate(model, x_clean, attrs, (cell.seed, f"{role}-clean", *cell))
            fake = self._generate(model, x_prot, attrs, (cell.seed, f"{role}-forge", *cell))
            scored[role] = self._pair_success(fake, ref, x_clean)
            out.update(self._rate_columns(f"sr_mask_{role}", scored[role], photos))
            l2 = l2_mask(fake, ref, edit_mask(ref, x_clean))
            out[f"l2_mask_{role}"] = float(torch.nan_to_num(l2).mean()) if l2.numel() else None
            if role == "orig":
                out["retrained_clean_mse"] = float(((reference - ref) ** 2).mean()) if ref.numel() else None
        own = float(success.float().mean()) if success.numel() else None
        out["adaptation_gain"] = out["sr_mask_ctrl"] - own if own is not None and out["sr_mask_ctrl"] is not None else None
        # The attacker keeps its retrained model unless retraining broke it (its clean forgeries
        # drift from the original's by more than the success threshold), and uses whichever
        # acceptable model the protection disrupts less.
        keeps_retrained = (out["retrained_clean_mse"] or 0.0) <= SUCCESS_THRESHOLD
        options = {"original": scored["orig"], **({"retrained": success} if keeps_retrained else {})}
        best = min(options, key=lambda k: float(options[k].float().mean()) if options[k].numel() else 0.0)
        worst = self._rate_columns("sr_mask_worst", options[best], photos)
        out.update({k: v for k, v in worst.items()}, attacker_keeps=best)
        timings["control_measure_s"] = time.perf_counter() - t0
        return out

    def _control(self, cell: Cell):
        base = self.model(cell.model)
        return _cached(self._controls, (cell.model, cell.adaptation, cell.seed, cell.round),
                       lambda: self.attacker.control(cell.model, cell.adaptation, self.adaptations[cell.adaptation],
                                                     cell.seed, cell.round, base,
                                                     self._discriminators.get(cell.model)),
                       "the clean-retraining control failed")

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
                collection = _cached(prot.preps, ("collect", state.model.image_size, _purify_key(adaptation)),
                                     lambda: self.attacker.collection(prot.collect, state.model.image_size, adaptation),
                                     "the attacker's data preparation failed")
                t1 = time.perf_counter()
                d_net = None
                if k == 1:
                    self.model(cell.model)  # (in a fresh worker process: loads the trained D too)
                    d_net = self._discriminators.get(cell.model)
                done = self.attacker.retrain(state.model, collection, adaptation, seed=cell.seed, k=k,
                                             discriminator=d_net)
                state.model, state.hash, state.usable = done.model, done.hash, collection.usable
                state.retrain_info = done.info
                state.shared.update(prep_s=t1 - t0, adapt_s=done.seconds)
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
        provenance = {**self.provenance_base(), **self.defense_provenance(cell.defense), "seed": cell.seed,
                      "checkpoint_sha256": state.hash, "base_checkpoint_sha256": state.base_hash,
                      **{"checkpoint_file_sha256" if k == "checkpoint_sha256" else k: v
                         for k, v in self._model_record.get(cell.model, {}).items()},
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
        return {"eps": options.get("eps", self.cfg.defenses.eps), "defense_options": options}

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
