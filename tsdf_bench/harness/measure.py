"""Measuring a cell: forgeries of the protected eval photos, every metric plugin, and after
retraining the original model, the clean-retraining control and the attacker's best option.

A cell is measured in batches of eval photos (:func:`~.streaming.measure_slices`): each batch's
forgeries are made (every generation stream seeded as if it ran alone, :class:`~.streaming.Generation`),
given to the metrics (:class:`~tsdf_bench.metric_streaming.MetricPasses`) and scored, and only
per-pair values are kept, so a cell's memory is bounded by the batch size, not by ``n_eval``."""
from __future__ import annotations

import math
import os
import shutil
import time
import weakref
from dataclasses import replace

import torch

from .. import speed
from ..metrics import MASK_THRESHOLD, SUCCESS_THRESHOLD, drift_from_sums, drift_pair_sums, edit_mask, l2_mask
from ..stats import photo_counts, rate_columns
from .attacker import _purify_key, keeps
from .data import to_size
from .plan import Cell
from .state import ChainState, Protected, _cached, _Failed
from .streaming import (CleanForgeries, DiskTensor, Generation, cache_folder, measure_slices,
                        release_freed_memory)


def log_phase(log, phase: str, label: str, seconds: float) -> None:
    """One log line per finished phase: ``phase <name> <seconds> s: <what>`` (fit, protect, prep,
    retrain, control, forge, detect, measure)."""
    log(f"phase {phase:<7} {seconds:8.2f} s  {label}")


class MeasureMixin:
    """:class:`~tsdf_bench.harness.runner.Runner`'s measuring stage (see :meth:`measure`).

    Memory: the original models' clean forgeries of the eval photos (``n_eval x targets`` images
    per model and purification) are cached for the cells of other defenses and seeds.  An entry
    that fits in :attr:`clean_cache_bytes` (1 GB) is kept in memory, the oldest other entries
    dropped while the entries in memory exceed the budget (small runs, the demo: ~30 MB, keep every
    model's for the whole run).  A larger one (at paper scale AttGAN's: 11 GB) is written to disk
    batch by batch as it is made (:class:`~.streaming.DiskTensor` files under
    ``RUN/cache/clean-forgeries-HOST-PID/``) and read back a batch at a time; the disk holds the
    entries of the model whose chains run now (the loop runs every chain of one model before the
    next; another model's are made again for the next defense).  The files go when the run ends
    (:meth:`release_clean_cache`).  Recomputing gives the same tensors (the generation is seeded)
    and a file gives back its bytes, so rows depend on neither.  ``clean_cache_bytes = None``
    keeps every entry in memory for the whole run.  Clean-retraining controls are kept for the
    current seed only (every defense of a seed shares them; seeds are the outer loop)."""

    clean_cache_bytes: int | None = 1 << 30  # None: every entry in memory for the whole run

    def clean_reference(self, model_name: str, adaptation_name: str) -> CleanForgeries:
        """The model-size clean inputs and the original model's forgeries of them (in memory or on
        disk, read by slices of rows), after the adaptation's purify (``compare_to = "clean"``:
        without it, as the Proactive Defense Benchmark compares)."""
        adaptation = self.adaptations[adaptation_name]
        key = (model_name, _purify_key(adaptation, adaptation_name))
        if not self.optimize:
            self._drop_clean(key)
        if key not in self._clean_fake:
            for other in [k for k, e in self._clean_fake.items() if k[0] != model_name and e.disk_bytes]:
                self._drop_clean(other)  # the disk holds the current model's entries only
            model = self.model(model_name)
            purified = self.cfg.adaptations.compare_to(adaptation_name) == "purified"
            clean = adaptation.purify(self.data.eval.images) if purified else self.data.eval.images
            x = to_size(clean, model.image_size)
            del clean
            self._clean_fake[key] = self._make_clean(model, x, x is self.data.eval.images, (0, "clean", model_name))
        return self._clean_fake[key]

    def _make_clean(self, model, x: torch.Tensor, shared: bool, seed_keys) -> CleanForgeries:
        """A cache entry of ``model``'s forgeries of ``x``, made batch by batch into memory (when it
        fits in the budget) or into a file."""
        budget, entry = self.clean_cache_bytes, None
        for sl, part in self._forge_stream(model, x, self.data.eval.attrs, seed_keys):
            if entry is None:
                shape = (x.shape[0], *part.shape[1:])
                size = math.prod(shape) * part.element_size() + (0 if shared else x.numel() * x.element_size())
                if budget is None or size <= budget:
                    self._bound_clean_cache(None if budget is None else budget - size)
                    entry = CleanForgeries(x, part.new_empty(shape), shared)
                else:
                    stem = self._clean_folder() / f"{model.name}-{self._next_clean_file()}"
                    entry = CleanForgeries(x if shared else DiskTensor.of(f"{stem}-inputs.f32", x),
                                           DiskTensor(f"{stem}-fakes.f32", shape, part.dtype), shared)
            if isinstance(entry.fakes, DiskTensor):
                entry.fakes.write(sl.start, part)
            else:
                entry.fakes[sl] = part
        if entry is None:
            raise ValueError(f"no images to forge with model {model.name!r}")
        return entry

    def _next_clean_file(self) -> int:
        self._clean_files = getattr(self, "_clean_files", 0) + 1
        return self._clean_files

    def _clean_folder(self):
        """This process's folder for clean forgeries on disk (removed with the runner, or at exit)."""
        folder = getattr(self, "_clean_dir", None)
        if folder is None:
            folder = self._clean_dir = cache_folder(self.run_dir)
            folder.mkdir(parents=True, exist_ok=True)
            weakref.finalize(self, shutil.rmtree, str(folder), True)
        return folder

    def _drop_clean(self, key) -> None:
        entry = self._clean_fake.pop(key, None)
        if entry is not None:
            entry.release()

    def clean_cache_ram_bytes(self) -> int:
        """The memory the clean-forgery cache holds now (entries on disk hold none)."""
        return sum(e.ram_bytes for e in self._clean_fake.values())

    def _bound_clean_cache(self, room: int | None) -> None:
        """Drop entries in memory, oldest first, until they hold at most ``room`` bytes (None: keep all)."""
        if room is None:
            return
        for key in [k for k, e in self._clean_fake.items() if e.ram_bytes]:
            if self.clean_cache_ram_bytes() <= room:
                break
            self._drop_clean(key)

    def release_clean_cache(self) -> None:
        """Drop every cached clean forgery and delete the files (the end of a run)."""
        for key in list(self._clean_fake):
            self._drop_clean(key)
        folder = getattr(self, "_clean_dir", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            self._clean_dir = None

    @torch.no_grad()
    def _forge_stream(self, model, images: torch.Tensor, attrs: torch.Tensor, seed_keys):
        """``model.generate_targets`` at the model's input size, seeded once, one batch at a time on
        the CPU: yields ``(slice, [b, T, 3, s, s])``; nothing else may draw random numbers between
        two batches (run it through a :class:`~.streaming.Generation` to interleave streams)."""
        from .data import select_attrs
        from .state import _seed

        x = to_size(images, model.image_size)
        a = select_attrs(attrs, self.data.attr_names, model.attributes, f"model {model.name!r}")
        _seed(*seed_keys)
        generate = getattr(model, "generate_targets", None) or model.generate_all
        for sl in self._batches(x.shape[0]):
            with speed.autocast(self.device, self.optimize):
                out = generate(x[sl].to(self.device), a[sl].to(self.device)).float().cpu()
            yield sl, out

    def _stream(self, model, images, attrs, seed_keys) -> Generation:
        return Generation(self._forge_stream(model, images, attrs, seed_keys), self.device)

    def forgeable(self, prot: Protected, size: int, adaptation):
        """The protected eval photos as the attacker's pipeline gives them (cached per defense)."""
        key = ("eval", size, *self.attacker.prep_key(adaptation))
        if not self.optimize:
            prot.preps.pop(key, None)
        return _cached(prot.preps, key, lambda: self.attacker.forgeable(prot.eval, size, adaptation),
                       "the attacker's preparation of the eval photos failed")

    def _pair_scores(self, fake_prot, reference, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (image, target) of one batch: CMUA's masked L2 (NaN for an empty mask) and whether it
        is above the success threshold (the forgery metric's ``mask_threshold`` /
        ``success_threshold`` when configured).  Each pair's value is its own."""
        options = self.cfg.metrics.options_for("forgery")
        l2 = l2_mask(fake_prot, reference, edit_mask(reference, x, options.get("mask_threshold", MASK_THRESHOLD)))
        return l2, l2 > options.get("success_threshold", SUCCESS_THRESHOLD)

    def _rate_columns(self, name: str, success: torch.Tensor, photos) -> dict:
        return rate_columns(name, photo_counts(success.numpy(), photos))

    def measure(self, cell: Cell, state: ChainState, prot: Protected, timings: dict) -> dict:
        """Every metric of one cell, batch by batch of eval photos.

        Round 0: the original model forges the protected eval photos at its input size, against
        its cached clean forgeries (:meth:`clean_reference`).  Round k >= 1: the attacker's
        pipeline prepares them (:meth:`forgeable`) and the retrained model forges them, against its
        own clean forgery of the same crops; the same inputs are scored against the original
        model, the clean-retraining control and the attacker's best option.  Every forgery is made
        one batch at a time, each stream seeded as if made alone, so the rows are those of whole
        tensors; the control is retrained (on first use) before the batches."""
        from ..metric_streaming import MetricPasses
        from ..metrics import EvalBatch

        adaptation, model = self.adaptations[cell.adaptation], state.model
        t0 = time.perf_counter()
        streams: dict[str, Generation] = {}
        if cell.round == 0:
            entry = self.clean_reference(cell.model, cell.adaptation)
            x_clean, reference = entry.inputs, entry.fakes
            x_prot = to_size(adaptation.purify(prot.eval), model.image_size)
            attrs, photos, extra = self.data.eval.attrs, self.data.eval.photos, {}
        else:
            fg = self.forgeable(prot, model.image_size, adaptation)
            x_clean, x_prot, attrs, reference = fg.clean, fg.protected, self.data.eval.attrs[fg.kept], None
            photos = [self.data.eval.photos[i] for i in fg.kept]
            extra = {"eval_kept": len(fg.kept), "eval_dropped": fg.n_photos - len(fg.kept)}
        n = x_prot.shape[0]
        forged = n > 0  # round >= 1: nothing to forge when the pipeline dropped every photo
        persist = forged and cell.round > 0
        if forged:
            streams["forge"] = self._stream(model, x_prot, attrs, (cell.seed, "forge", *cell))
        if persist:
            # the retrained model's own clean forgeries and the original model's of the same inputs
            # (the retrained_clean_mse metric's reference and that of sr_mask_orig)
            streams["ref"] = self._stream(model, x_clean, attrs, (cell.seed, "own-clean", *cell))
            streams["orig-clean"] = self._stream(self.model(cell.model), x_clean, attrs,
                                                 (cell.seed, "orig-clean", *cell))
        setup_s = time.perf_counter() - t0
        if persist:
            t_ctrl = time.perf_counter()
            control = self._control(cell)  # retrained here on first use (control_s), else shared
            timings["control_s"] = time.perf_counter() - t_ctrl
            for role, m in (("orig", self.model(cell.model)), ("ctrl", control.model)):
                if role != "orig":
                    streams[f"{role}-clean"] = self._stream(m, x_clean, attrs, (cell.seed, f"{role}-clean", *cell))
                streams[f"{role}-forge"] = self._stream(m, x_prot, attrs, (cell.seed, f"{role}-forge", *cell))
        label, log = cell.label, getattr(self, "log", lambda msg: None)
        t1 = time.perf_counter()
        dets_clean, dets_prot, missing = {}, {}, {}
        for d in self.cfg.detectors.names:
            try:
                dets_clean[d], dets_prot[d] = self.clean_detections(d), self.protected_detections(prot, d)
            except _Failed as exc:
                if not self.cfg.detectors.allow_missing_detectors:
                    raise
                dets_clean.pop(d, None)
                missing[d] = str(exc)  # its columns are left out of the row, which names it
        detect_s = time.perf_counter() - t1
        cell_lists = dict(detections_clean=dets_clean, detections_protected=dets_prot,
                          crop_kept=state.usable if cell.round > 0 else None, eval_photos=self.data.eval.photos,
                          crop_photos=self.data.collect.photos if cell.round > 0 else None)
        passes = MetricPasses(self.metrics)
        hits, roles = [], {"orig": ([], []), "ctrl": ([], [])}
        drift, samples = [], ([], [])
        want_sample = forged and cell.seed == self.cfg.run.seeds[0]
        metrics_s = control_measure_s = 0.0
        for sl in measure_slices(n, self.cfg.data.batch_size):
            rows = sl.stop - sl.start
            xc = x_clean[sl]
            fake = streams["forge"].take(rows) if forged else None
            ref = (reference[sl] if cell.round == 0 else streams["ref"].take(rows)) if forged else None
            original = streams["orig-clean"].take(rows) if persist else None
            tm = time.perf_counter()
            passes.update(EvalBatch(clean=xc, protected=x_prot[sl], fake_clean=ref, fake_protected=fake,
                                    fake_clean_original=original, **cell_lists))
            if forged:
                hits.append(self._pair_scores(fake, ref, xc)[1])
            metrics_s += time.perf_counter() - tm
            if want_sample and sum(s.shape[0] for s in samples[0]) < 2:
                need = 2 - sum(s.shape[0] for s in samples[0])
                samples[0].append(ref[:need].clone())
                samples[1].append(fake[:need].clone())
            del fake
            if persist:
                tp = time.perf_counter()
                drift.append(drift_pair_sums(ref, original))  # the attacker's keep rule needs the drift
                for role in ("orig", "ctrl"):
                    r = original if role == "orig" else streams["ctrl-clean"].take(rows)
                    l2, hit = self._pair_scores(streams[f"{role}-forge"].take(rows), r, xc)
                    roles[role][0].append(l2)
                    roles[role][1].append(hit)
                control_measure_s += time.perf_counter() - tp
            del ref, original, xc
            release_freed_memory()  # the batch's tensors are gone: so is their memory (glibc's heap)
        if forged:  # whatever runs next sees the random state that whole-tensor forging left
            (streams["ctrl-forge"] if persist else streams["forge"]).restore_rng()
        tm = time.perf_counter()
        metrics: dict = dict(extra, **({"detectors_missing": missing} if missing else {}))
        metrics.update(passes.finish())
        if forged:
            success = torch.cat(hits)
            metrics.update(self._rate_columns("sr_mask", success, photos))
        metrics_s += time.perf_counter() - tm
        if persist:
            tp = time.perf_counter()
            per_pair = math.prod(x_clean.shape[1:])  # values per (image, target) pair: 3 x s x s
            metrics.update(self._persistence(photos, success, roles, drift_from_sums(torch.cat(drift), per_pair)))
            control_measure_s += time.perf_counter() - tp
            timings["control_measure_s"] = control_measure_s  # their streams' batches are made in there
        # generate_s: making the cell's own forgeries (the clean reference on first use, the
        # retrained and the original model's clean ones included); metrics_s: the metric plugins
        # and SR_mask; control_s: the control's retraining; control_measure_s: the original /
        # control models' other forgeries and their scores
        generate_s = setup_s + sum(streams[k].seconds for k in ("forge", "ref", "orig-clean") if k in streams)
        timings.update(generate_s=generate_s, detect_s=detect_s, metrics_s=metrics_s)
        log_phase(log, "forge", label, generate_s)
        log_phase(log, "detect", label, detect_s)
        log_phase(log, "measure", label, metrics_s)
        if samples[0]:
            self._save_sample(cell, prot, torch.cat(samples[0]), torch.cat(samples[1]))
        return metrics

    def _persistence(self, photos, success, roles: dict, drift: float | None) -> dict:
        """The columns that tell what retraining on the protected photos did (see the attacker),
        from the per-pair masked L2 and hits against the original model and the control."""
        out = {}
        scored = {}
        for role, (l2_parts, hit_parts) in roles.items():
            scored[role] = torch.cat(hit_parts) if hit_parts else torch.zeros(0, 0, dtype=torch.bool)
            out.update(self._rate_columns(f"sr_mask_{role}", scored[role], photos))
            l2 = torch.cat(l2_parts) if l2_parts else torch.zeros(0)
            out[f"l2_mask_{role}"] = float(torch.nan_to_num(l2).mean()) if l2.numel() else None
        own = float(success.float().mean()) if success.numel() else None
        out["adaptation_gain"] = out["sr_mask_ctrl"] - own if own is not None and out["sr_mask_ctrl"] is not None else None
        # The attacker keeps its retrained model unless retraining broke it (its clean forgeries
        # drift from the original's by more than the success threshold) or the protection disrupts
        # it more than the original (a tie keeps the retrained model): attacker.keeps.
        sr = lambda t: float(t.double().mean()) if t.numel() else None  # noqa: E731 - both alike
        best = keeps(drift, sr(success), sr(scored["orig"]))
        worst = self._rate_columns("sr_mask_worst", {"original": scored["orig"], "retrained": success}[best], photos)
        out.update({k: v for k, v in worst.items()}, attacker_keeps=best)
        return out

    def _control_if_same(self, state, cell: Cell, collection, adaptation):
        """The control of this round when retraining here would recompute it bit for bit: the
        collection holds exactly the clean crops (the ``none`` defense, or a protection the
        preparation removed) and the chain starts from the control's starting model.  Every
        retraining of a round is seeded alike, so the result would be the same model."""
        clean = self.attacker.clean_collection(state.model.image_size, adaptation)
        if collection.kept != clean.kept or not (torch.equal(collection.crops, clean.crops)
                                                 and torch.equal(collection.attrs, clean.attrs)):
            return None
        start = self._model_hash[cell.model] if cell.round == 1 else self._control(cell._replace(round=cell.round - 1)).hash
        if state.hash != start:
            return None
        control = self._control(cell)
        return replace(control, info={**control.info, "retrain_is_control": True}, seconds=0.0)

    def _control(self, cell: Cell):
        """The clean-retraining control of ``cell``'s round (the attacker's, shared by every defense;
        retrained and logged on first use)."""
        self.attacker.keep_controls_of_seed(cell.seed)
        fresh = not self.attacker.has_control(cell.model, cell.adaptation, cell.seed, cell.round)
        t0 = time.perf_counter()
        control = self.attacker.control(cell.model, cell.adaptation, self.adaptations[cell.adaptation], cell.seed,
                                        cell.round, self.model(cell.model), self._discriminators.get(cell.model),
                                        base_hash=self._model_hash[cell.model])
        if fresh:
            log_phase(getattr(self, "log", lambda msg: None), "control",
                      f"{cell.model}/{cell.adaptation}/round {cell.round}/seed {cell.seed}", time.perf_counter() - t0)
        return control

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
