"""Fitting a defense and protecting the collect and eval photos (the runner's first stage)."""
from __future__ import annotations

import hashlib
import json
import time

import torch

from .. import speed
from ..errors import TsdfBenchError
from ..hashing import differences_sha256, tensors_sha256
from ..paths import temp_path
from .data import select_attrs
from .mapped import in_file, new_images, open_images
from .measure import log_phase
from .state import Protected, _cached, _Failed, _seed


def fit_key(plugin: str, options: dict, seed: int, model_hashes: dict, detectors: list, data_hash: str) -> str:
    """sha256 of everything a fitted defense depends on (the protected-image cache's key)."""
    blob = {"plugin": plugin, "options": options, "seed": seed, "models": model_hashes, "detectors": detectors,
            "data": data_hash}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


class ProtectionMixin:
    """:class:`~tsdf_bench.harness.runner.Runner`'s defense stage: fit, protect (cached on disk for
    ``--resume``), and the detections of protected and clean eval photos."""

    def _attrs_map(self, attrs: torch.Tensor, models: list) -> dict:
        """``{model.name: its attribute columns}`` (the form defenses accept for several models)."""
        return {m.name: select_attrs(attrs, self.data.attr_names, m.attributes, f"model {m.name!r}").to(self.device)
                for m in models}

    def protect(self, seed: int, name: str) -> Protected:
        """Fit defense ``name`` and protect the collect and eval splits.

        Cached on disk for ``--resume`` under a key made of everything the fit depends on (the
        defense's plugin and options, the seed, the weights hash of every model, the white-box
        detectors and the data hash): a checkpoint fixed in place, other data or another option is
        refitted, never reused.  The files of finished groups are deleted first
        (:meth:`release_finished_caches`).  A detector that fails to load is named in ``fit_problems``."""
        data, cfg = self.data, self.cfg
        self.release_finished_caches()
        plugin, options = cfg.defenses.plugin_for(name), cfg.defenses.options_for(name)
        models, model_problems = [], []
        for m in cfg.defenses.fit_models_for(name) or cfg.models.names:  # [transfer] variants: one source
            try:
                models.append(self.model(m))
            except _Failed as exc:
                model_problems.append(str(exc))
        detectors = []
        differentiable = {}
        for d in dict.fromkeys([*cfg.detectors.names, cfg.detectors.attacker, *(cfg.detectors.white_box or [])]):
            try:
                differentiable[d] = bool(getattr(self.detector(d), "differentiable", False))
            except _Failed as exc:
                differentiable[d] = False
                model_problems.append(str(exc))
        for d in cfg.white_box_detectors(differentiable):
            detectors.append(self.detector(d))
        key = fit_key(plugin, options, seed, {m.name: self._model_hash.get(m.name, "") for m in models},
                      [getattr(d, "name", "?") for d in detectors], data.data_hash)
        folder, stem = self.run_dir / "cache", f"protected-{name}-seed{seed}-{key[:16]}"
        cache = folder / f"{stem}.pt"
        cached = self._cached_protection(cache) if cache.is_file() else None
        if cached is not None:
            return cached
        defense = self.registry.create("defense", plugin, seed=seed, device=str(self.device), **options)
        defense.optimize = self.optimize  # the run's speed switch (PGD: the batch at once)
        self.log(f"fitting defense {name} (seed {seed}) on {data.fit.images.shape[0]} images")
        t0 = time.perf_counter()
        _seed(seed, "fit", name)
        with speed.autocast(self.device, self.optimize):
            defense.fit(data.fit.images.to(self.device), self._attrs_map(data.fit.attrs, models), models, detectors)
        t1 = time.perf_counter()
        protected = {}
        for split_name in ("collect", "eval"):
            split = getattr(data, split_name)
            # batch by batch into the set (a kept memory-mapped file when large: the --resume cache)
            out = protected[split_name] = new_images(split.images.shape, folder, f"{stem}.{split_name}.npy")
            attrs_of = self._attrs_map(split.attrs, models)
            for s in self._batches(split.images.shape[0]):
                _seed(seed, "protect", name, split_name, s.start)
                with speed.autocast(self.device, self.optimize):
                    part = defense.protect(split.images[s].to(self.device), {k: v[s] for k, v in attrs_of.items()})
                if tuple(part.shape) != tuple(split.images[s].shape):
                    raise TsdfBenchError(f"defense {name!r} (plugin {plugin!r}) returned protected images of shape "
                                         f"{tuple(part.shape)} for a batch of {tuple(split.images[s].shape)}; "
                                         "protect() must return one image of the input's size per input image")
                out[s] = part.detach().float().cpu()
        t2 = time.perf_counter()
        log_phase(self.log, "fit", f"{name}/seed {seed} ({data.fit.images.shape[0]} images)", t1 - t0)
        log_phase(self.log, "protect", f"{name}/seed {seed} ({sum(v.shape[0] for v in protected.values())} images)",
                  t2 - t1)
        if getattr(defense, "universal", False) and getattr(defense, "perturbation", None) is not None:
            digest = tensors_sha256(defense.perturbation)
            try:
                defense.save(self.run_dir / "perturbations" / f"{name}-seed{seed}.pt", config_hash=cfg.hash)
            except Exception as exc:  # noqa: BLE001 - saving is a convenience, the hash is recorded anyway
                self.log(f"could not save the perturbation of {name}: {exc}")
        else:
            digest = differences_sha256((protected["collect"], data.collect.images), (protected["eval"], data.eval.images))
        info = {"defense_plugin": plugin, "fit_key": key, "fit_models": [m.name for m in models],
                "fit_detectors": [getattr(d, "name", "?") for d in detectors],
                "fit_problems": model_problems, **getattr(defense, "info", {})}
        result = Protected(protected["collect"], protected["eval"], digest,
                           {"fit_s": t1 - t0, "protect_s": t2 - t1}, info)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(cache)
        sets = {k: f"{stem}.{k}.npy" if in_file(v.shape, folder) else v for k, v in protected.items()}  # files: by name
        torch.save({**sets, "perturbation_sha256": digest, "timings": result.timings, "info": info}, tmp)
        tmp.replace(cache)
        return result

    def _cached_protection(self, cache) -> Protected | None:
        """The protected photos saved for ``--resume`` (the ``.pt`` is written last: the mapped sets
        it names are complete), or None (and a log line) when a file is missing, unreadable or not
        the shape of this run's splits: the defense is then fitted again, never half reused."""
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=False)
            sets = {k: open_images(cache.parent / blob[k]) if isinstance(blob[k], str) else blob[k]
                    for k in ("collect", "eval")}
            for k, v in sets.items():
                want = tuple(getattr(self.data, k).images.shape)
                if tuple(v.shape) != want:
                    raise ValueError(f"{k} set has shape {tuple(v.shape)}, the run's {k} split {want}")
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            self.log(f"protected-image cache {cache.name} cannot be reused ({type(exc).__name__}: {exc}); "
                     "fitting the defense again")
            cache.unlink(missing_ok=True)
            return None
        return Protected(sets["collect"], sets["eval"], blob["perturbation_sha256"], blob["timings"], blob["info"])

    def release_finished_caches(self) -> int:
        """Delete the protected-image cache files of every (seed, defense) whose planned cells are
        all stored ok (``--resume`` skips them), so the disk holds about one defense and seed at a
        time; a group with a failed cell keeps its file for the retry.  Returns the files deleted.
        Called before each fit; a store that cannot list finished cells (a Ray worker's) skips it."""
        folder = self.run_dir / "cache"
        done_of, cells_of = getattr(self.store, "done", None), getattr(self, "cells", None)
        if done_of is None or cells_of is None or not folder.is_dir():
            return 0
        try:
            done = done_of(self.run_id)
            planned: dict = {}
            for c in cells_of():
                planned.setdefault((c.defense, c.seed), []).append(tuple(c))
        except Exception:  # noqa: BLE001 - cleaning is a convenience
            return 0
        removed = 0
        finished = {f"protected-{d}-seed{s}-" for (d, s), keys in planned.items() if all(k in done for k in keys)}
        for path in folder.glob("protected-*"):  # the .pt and the mapped sets it names
            prefix = path.name[:path.name.rindex("-") + 1]  # protected-NAME-seedS- (the key follows)
            if prefix in finished:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def protected_detections(self, prot: Protected, name: str) -> list:
        if not self.optimize:
            prot.detections.pop(name, None)  # recomputed per call (the straightforward way)
        return _cached(prot.detections, name, lambda: self._detect(name, prot.eval),
                       f"detector {name!r} failed on protected images")

    def clean_detections(self, name: str) -> list:
        if not self.optimize:
            self._clean_dets.pop(name, None)
        return _cached(self._clean_dets, name, lambda: self._detect(name, self.data.eval.images),
                       f"detector {name!r} failed on clean images")
