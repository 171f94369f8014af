"""Measuring a cell: forgeries of the protected eval photos, every metric plugin, and after
retraining the original model, the clean-retraining control and the attacker's best option."""
from __future__ import annotations

import os
import time

import torch

from .. import speed
from ..metrics import MASK_THRESHOLD, SUCCESS_THRESHOLD, clean_drift, edit_mask, l2_mask
from ..stats import photo_counts, rate_columns
from .attacker import _purify_key, keeps
from .data import to_size
from .plan import Cell
from .state import ChainState, Protected, _cached, _Failed


def log_phase(log, phase: str, label: str, seconds: float) -> None:
    """One log line per finished phase: ``phase <name> <seconds> s: <what>`` (fit, protect, prep,
    retrain, control, forge, detect, measure)."""
    log(f"phase {phase:<7} {seconds:8.2f} s  {label}")


class MeasureMixin:
    """:class:`~tsdf_bench.harness.runner.Runner`'s measuring stage (see :meth:`measure`).

    Memory: the original models' clean forgeries of the eval photos (``n_eval x targets`` images
    per model) are cached within a byte budget, :attr:`clean_cache_bytes` (1 GB): before a model's
    forgeries are made, the other models' are dropped while the cache is over budget, and after,
    the oldest other models' likewise.  So small runs (the demo: ~30 MB) keep every model's for the
    whole run, and at paper scale (AttGAN alone: 11 GB) only the model whose chains run now is held
    (the loop runs every chain of one model before the next; its forgeries are then made once per
    defense and seed): the cache stays below the budget plus one model's forgeries, whatever the
    number of models.  A chain's retraining rounds drop its round-0 forgeries when the cache is
    over budget and no other adaptation shares them.  Recomputing gives the same tensors (the
    generation is seeded), so rows do not depend on the budget.  Clean-retraining controls are
    kept for the current seed only (every defense of a seed shares them; seeds are the outer
    loop)."""

    clean_cache_bytes: int | None = 1 << 30  # None: every model's clean forgeries for the whole run

    def clean_reference(self, model_name: str, adaptation_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model-size clean input, original model's forgery of it), after the adaptation's purify
        (``compare_to = "clean"``: without it, as the Proactive Defense Benchmark compares)."""
        adaptation = self.adaptations[adaptation_name]
        key = (model_name, _purify_key(adaptation, adaptation_name))
        if not self.optimize:
            self._clean_fake.pop(key, None)
        if key not in self._clean_fake:
            self._bound_clean_cache(model_name)
            model = self.model(model_name)
            purified = self.cfg.adaptations.compare_to(adaptation_name) == "purified"
            clean = adaptation.purify(self.data.eval.images) if purified else self.data.eval.images
            x = to_size(clean, model.image_size)
            fake = self._forge(model, clean, self.data.eval.attrs, (0, "clean", model_name))
            self._clean_fake[key] = (x, fake)
            self._bound_clean_cache(model_name)
        return self._clean_fake[key]

    @torch.no_grad()
    def _forge_stream(self, model, images: torch.Tensor, attrs: torch.Tensor, seed_keys):
        """``model.generate_targets`` at the model's input size, seeded once, one batch at a time on
        the CPU: yields ``(slice, [b, T, 3, s, s])``; nothing else may draw random numbers between
        two batches."""
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

    def _forge(self, model, images: torch.Tensor, attrs: torch.Tensor, seed_keys) -> torch.Tensor:
        """Every batch of :meth:`_forge_stream` written into one preallocated ``[N, T, 3, s, s]``
        tensor (no list of batches plus their concatenation: half the transient memory)."""
        out = None
        for sl, part in self._forge_stream(model, images, attrs, seed_keys):
            if out is None:
                out = part.new_empty((images.shape[0], *part.shape[1:]))
            out[sl] = part
        if out is None:
            raise ValueError(f"no images to forge with model {model.name!r}")
        return out

    def _clean_cache_size(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self._clean_fake.values() if isinstance(entry, tuple)
                   for t in entry)

    def _release_clean_reference(self, cell: Cell) -> None:
        """From round 1 on a chain no longer needs its round-0 clean forgeries; over budget, drop them
        unless another adaptation shares them (same model and purification: its round 0 may come
        next).  Chains of the same model and defense run one after another."""
        budget = self.clean_cache_bytes
        if budget is None or self._clean_cache_size() <= budget:
            return
        share = lambda name: _purify_key(self.adaptations[name], name)  # noqa: E731
        mine = share(cell.adaptation)
        if sum(1 for name in self.adaptations if share(name) == mine) <= 1:
            self._clean_fake.pop((cell.model, mine), None)

    def _bound_clean_cache(self, model_name: str) -> None:
        """Drop the other models' clean forgeries, oldest first, while the cache is over
        :attr:`clean_cache_bytes` (called before and after ``model_name``'s are made)."""
        budget = self.clean_cache_bytes
        if budget is None:
            return
        for m in [m for m in dict.fromkeys(k[0] for k in self._clean_fake) if m != model_name]:
            if self._clean_cache_size() <= budget:
                break
            for key in [k for k in self._clean_fake if k[0] == m]:
                del self._clean_fake[key]

    def forgeable(self, prot: Protected, size: int, adaptation):
        """The protected eval photos as the attacker's pipeline gives them (cached per defense)."""
        key = ("eval", size, *self.attacker.prep_key(adaptation))
        if not self.optimize:
            prot.preps.pop(key, None)
        return _cached(prot.preps, key, lambda: self.attacker.forgeable(prot.eval, size, adaptation),
                       "the attacker's preparation of the eval photos failed")

    def _pair_scores(self, fake_prot, reference, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (image, target): CMUA's masked L2 (NaN for an empty mask) and whether it is above
        the success threshold (the forgery metric's ``mask_threshold`` / ``success_threshold`` when
        configured).  Computed a batch of images at a time (each pair's value is its own, so the
        same values; the masks' temporaries stay one batch large)."""
        options = self.cfg.metrics.options_for("forgery")
        threshold = options.get("mask_threshold", MASK_THRESHOLD)
        l2s = []
        for sl in self._batches(x.shape[0]) or [slice(0, 0)]:
            l2s.append(l2_mask(fake_prot[sl], reference[sl], edit_mask(reference[sl], x[sl], threshold)))
        l2 = torch.cat(l2s)
        return l2, l2 > options.get("success_threshold", SUCCESS_THRESHOLD)

    def _pair_success(self, fake_prot, reference, x) -> torch.Tensor:
        """Per (image, target): CMUA's masked L2 above the success threshold (see :meth:`_pair_scores`)."""
        return self._pair_scores(fake_prot, reference, x)[1]

    def _rate_columns(self, name: str, success: torch.Tensor, photos) -> dict:
        return rate_columns(name, photo_counts(success.numpy(), photos))

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
            self._release_clean_reference(cell)
            fg = self.forgeable(prot, model.image_size, adaptation)
            x_clean, x_prot, attrs = fg.clean, fg.protected, self.data.eval.attrs[fg.kept]
            photos = [self.data.eval.photos[i] for i in fg.kept]
            reference = self._forge(model, x_clean, attrs, (cell.seed, "own-clean", *cell)) if fg.kept else None
            extra = {"eval_kept": len(fg.kept), "eval_dropped": fg.n_photos - len(fg.kept)}
        forged = x_prot.shape[0] > 0  # round >= 1: nothing to forge when the pipeline dropped every photo
        fake_prot = self._forge(model, x_prot, attrs, (cell.seed, "forge", *cell)) if forged else None
        reference = reference if forged else None
        # retraining rounds: the original model's forgeries of the same clean inputs (the reference
        # of the retrained_clean_mse metric and of the persistence columns' sr_mask_orig)
        original = (self._forge(self.model(cell.model), x_clean, attrs, (cell.seed, "orig-clean", *cell))
                    if forged and cell.round > 0 else None)
        t1 = time.perf_counter()
        label = cell.label
        log = getattr(self, "log", lambda msg: None)
        log_phase(log, "forge", label, t1 - t0)
        names = list(self.cfg.detectors.names)
        dets_clean = {d: self.clean_detections(d) for d in names}
        dets_prot = {d: self.protected_detections(prot, d) for d in names}
        t2 = time.perf_counter()
        log_phase(log, "detect", label, t2 - t1)
        batch = EvalBatch(clean=x_clean, protected=x_prot, fake_clean=reference, fake_protected=fake_prot,
                          fake_clean_original=original, detections_clean=dets_clean, detections_protected=dets_prot,
                          crop_kept=state.usable if cell.round > 0 else None, eval_photos=self.data.eval.photos,
                          crop_photos=self.data.collect.photos if cell.round > 0 else None)
        metrics: dict = dict(extra)
        for metric in self.metrics:
            metrics.update(metric.compute(batch))
        del batch
        persistence_s = 0.0
        sample = None
        if forged:
            success = self._pair_success(fake_prot, reference, x_clean)
            metrics.update(self._rate_columns("sr_mask", success, photos))
            if cell.seed == self.cfg.run.seeds[0]:
                sample = (reference[:2].clone(), fake_prot[:2].clone())
            fake_prot = None  # scored: not needed by the persistence columns
            if cell.round > 0:
                tp = time.perf_counter()
                made, original = {"orig": original}, None  # _persistence drops it once scored
                metrics.update(self._persistence(cell, state, x_clean, x_prot, reference, attrs, photos, success,
                                                 timings, made))
                persistence_s = time.perf_counter() - tp
        t3 = time.perf_counter()
        # metrics_s: the metric plugins and SR_mask only; generating forgeries (the retrained and
        # the original model's clean ones included) is generate_s, the control's retraining
        # control_s and the original / control models' other forgeries and scores control_measure_s
        timings.update(generate_s=t1 - t0, detect_s=t2 - t1, metrics_s=t3 - t2 - persistence_s)
        log_phase(log, "measure", label, timings["metrics_s"])
        if sample is not None:
            self._save_sample(cell, prot, *sample)
        return metrics

    def _persistence(self, cell, state, x_clean, x_prot, reference, attrs, photos, success, timings,
                     made: dict) -> dict:
        """The columns that tell what retraining on the protected photos did (see the attacker).
        ``made``: clean forgeries already made, by role (``"orig"``: the original model's)."""
        base = self.model(cell.model)
        t_ctrl = time.perf_counter()
        control = self._control(cell)  # retrained here on first use (control_s), else shared
        t0 = time.perf_counter()
        timings["control_s"] = t0 - t_ctrl
        out = {}
        scored = {}
        drift = clean_drift(reference, made["orig"])  # the retrained_clean_mse metric's value
        for role, model in (("orig", base), ("ctrl", control.model)):
            ref = made.pop(role, None)
            if ref is None:
                ref = self._forge(model, x_clean, attrs, (cell.seed, f"{role}-clean", *cell))
            # the protected forgeries scored batch by batch (never held whole)
            scores, l2_parts = [], []
            for sl, fake in self._forge_stream(model, x_prot, attrs, (cell.seed, f"{role}-forge", *cell)):
                l2_part, hits = self._pair_scores(fake, ref[sl], x_clean[sl])
                scores.append(hits)
                l2_parts.append(l2_part)
            del ref
            scored[role] = torch.cat(scores) if scores else torch.zeros(0, 0, dtype=torch.bool)
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
        timings["control_measure_s"] = time.perf_counter() - t0
        return out

    def _control(self, cell: Cell):
        """The clean-retraining control of ``cell``'s round (the attacker's, shared by every defense;
        retrained and logged on first use)."""
        self.attacker.keep_controls_of_seed(cell.seed)
        fresh = not self.attacker.has_control(cell.model, cell.adaptation, cell.seed, cell.round)
        t0 = time.perf_counter()
        control = self.attacker.control(cell.model, cell.adaptation, self.adaptations[cell.adaptation], cell.seed,
                                        cell.round, self.model(cell.model), self._discriminators.get(cell.model))
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
