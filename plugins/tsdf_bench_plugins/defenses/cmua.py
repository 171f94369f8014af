"""CMUA-Watermark: a cross-model universal perturbation built from per-model PGD runs."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from tsdf_bench.defenses.attack_utils import (attrs_for, batches, check_images, model_outputs, options_of,
                                              require, slice_attrs, uniform_like)
from tsdf_bench.defenses.base import UniversalDefense


class CMUA(UniversalDefense):
    """CMUA-Watermark (Huang et al., "CMUA-Watermark: A Cross-Model Universal Adversarial
    Watermark for Combating Deepfakes", AAAI 2022; code ``VDIGPKU/CMUA-Watermark``).

    Learns one perturbation ``[1, 3, S, S]`` on the [-1, 1] scale.  For ``passes`` passes over the
    first ``max_images`` images in batches of ``batch_size``, the models are attacked in turn in
    ``model_order``, each with all of its targets.  One call (one model, one target ``c``):
    start from the unclamped ``X = x + U(-eps, eps)``; ``iterations`` times:
    ``x_adv = X + step * sign(grad MSE(G(X, c), y))`` with ``y = G(x, c)``,
    ``eta = batch-mean(clamp(factor_m * (x_adv - x), -eps, eps))``, ``W = ema * W + (1-ema) * eta``
    (``W = eta`` the first time), ``X = clamp(x + W, -1, 1)``.  A model named in
    ``w_start_models`` (default HiSD, as the code treats it) starts instead from the unclamped
    ``x + W`` (from ``x`` when W does not exist yet) with no random draw, and a model named in
    ``target_offsets`` ascends ``MSE(G(X, c), y + offset)`` (HiSD: ``y + 0.002``, as the code).

    ``model_order`` (default: the code's order StarGAN, AttentionGAN, HiSD, AttGAN): the models
    named in it are attacked in that order, any other model after them in the order given to
    :meth:`fit`; ``model_order=None`` keeps the given order.  The order matters: with the 0.5
    EMA, W is mostly the last model's last iterations.  The order used is recorded as
    ``provenance["model_order"]`` (and in :attr:`info`).

    Defaults (the paper's code): eps 0.05, iterations 10, step 0.01, ema 0.5, batch_size 64,
    max_images 128, passes 1, model_order (stargan, attentiongan, hisd, attgan), w_start_models
    (hisd,), target_offsets {hisd: 0.002}, factors 1.0 for every model (``factors={"stargan":
    2.0}`` overrides one; the paper tuned them by a TPE search whose values are unpublished, and
    the shipped config has all 1.0).  ``joint_targets=True`` attacks all targets of a model in
    one call (sum of MSEs) -- T times cheaper, not the paper's schedule.  Cheap CPU demo
    schedule: ``max_images=16, batch_size=8, iterations=5, joint_targets=True``.

    **Factor search** (optional, ``search_trials > 0``; off by default because it refits the
    perturbation once per trial): Optuna's TPE sampler (seeded with the defense's seed) draws one
    factor per model from ``uniform(*search_range)`` (paper: [0, 10]) per trial, fits with them, and
    scores the perturbation by the mean over models of SR_mask (share of (image, target) pairs with
    L2_mask > 0.05, :mod:`tsdf_bench.metrics`) on the last ``search_images`` (paper: 20) of the
    given images; the best trial's factors are then used, and every trial is in ``provenance``.
    Factors given in ``factors`` are fixed, not searched.

    Departures and why: the search uses Optuna's TPE rather than NNI's (same algorithm family, a
    maintained library); its images are the last ``search_images`` of the fitting images (the
    code scores on test images), and when fewer than ``max_images + search_images`` images are
    given they overlap the fitting images.  Attribute handling is the model plugin's ``conditions`` (the code's
    StarGAN labels are offset by two rows, a defect not reproduced).  The random starts come
    from the defense's seeded generator (the code draws from NumPy's global state).
    """

    name = "cmua"
    OFFICIAL_ORDER = ("stargan", "attentiongan", "hisd", "attgan")

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu", *, iterations: int = 10, step: float = 0.01,
                 ema: float = 0.5, passes: int = 1, batch_size: int = 64, max_images: int | None = 128,
                 factors: dict | None = None, joint_targets: bool = False, max_targets: int | None = None,
                 model_order: Sequence[str] | None = OFFICIAL_ORDER, w_start_models: Sequence[str] = ("hisd",),
                 target_offsets: dict | None = None, search_trials: int = 0, search_range=(0.0, 10.0),
                 search_images: int = 20):
        if target_offsets is None:
            target_offsets = {"hisd": 0.002}
        super().__init__(eps, seed, device)
        self.options = options_of(locals())
        for key, value in self.options.items():
            setattr(self, key, value)
        self.factors = dict(factors or {})
        self.model_order = None if model_order is None else [str(n) for n in model_order]
        self.w_start_models = {str(n) for n in w_start_models}
        self.target_offsets = {str(k): float(v) for k, v in target_offsets.items()}
        self.search_range = tuple(float(v) for v in search_range)
        self.search: dict | None = None

    def ordered(self, models: Sequence) -> list:
        """``models`` in attack order: those named in ``model_order`` first, in its order, then the
        others in their given order (all of them in the given order when ``model_order`` is None)."""
        if self.model_order is None:
            return list(models)
        rank = {name: i for i, name in enumerate(self.model_order)}
        given = {id(m): i for i, m in enumerate(models)}
        return sorted(models, key=lambda m: (rank.get(m.name, len(rank)), given[id(m)]))

    @property
    def info(self) -> dict:
        """What a result row should show about this defense: its options and the order it used."""
        return {**super().info, "model_order": self.provenance.get("model_order"),
                "factors": self.provenance.get("factors")}

    def fit(self, images, attrs, models, detectors=()):
        super().fit(images, attrs, models, detectors)
        require(self.models, "deepfake model", self.name, "pass the models to attack")
        self.models = self.ordered(self.models)
        images = check_images(images, "cmua.fit")
        x = images[: self.max_images]
        unknown = set(self.factors) - {m.name for m in self.models}
        if unknown:
            raise ValueError(f"cmua factors name unknown models {sorted(unknown)}; the models are "
                             f"{[m.name for m in self.models]}")
        start = time.perf_counter()
        factors = {m.name: float(self.factors.get(m.name, 1.0)) for m in self.models}
        if self.search_trials > 0:
            factors = self._search_factors(images, attrs, x)
        self.perturbation = self._fit_with(x, slice_attrs(attrs, slice(0, x.shape[0])), factors)
        self.provenance = {"options": self.options, "images": int(x.shape[0]), "size": list(x.shape[-2:]),
                           "models": [m.name for m in self.models], "model_order": [m.name for m in self.models],
                           "factors": factors, "search": self.search,
                           "fit_seconds": round(time.perf_counter() - start, 3)}
        return self

    def _fit_with(self, x, attrs, factors: dict) -> torch.Tensor:
        """The universal perturbation for the given per-model factors (same seed, same draws)."""
        gen = self.generator()
        self._w = None
        for _ in range(self.passes):
            for sl in batches(x.shape[0], self.batch_size):
                xb = x[sl]
                ab = slice_attrs(attrs, sl)
                for m in self.models:
                    factor, offset = factors[m.name], self.target_offsets.get(m.name, 0.0)
                    w_start = m.name in self.w_start_models
                    if self.joint_targets:
                        with torch.no_grad():
                            y = model_outputs(m, xb, ab, self.max_targets) + offset
                        self._call(xb, lambda z: model_outputs(m, z, ab, self.max_targets), y, factor, gen, w_start)
                        continue
                    conds = m.conditions(attrs_for(m, ab, xb.shape[0], xb.device))[: self.max_targets]
                    for c in conds:
                        with torch.no_grad():
                            y = m.generate(m.to_input_size(xb), c) + offset
                        self._call(xb, lambda z: m.generate(m.to_input_size(z), c), y, factor, gen, w_start)
        return self._w.detach()

    @torch.no_grad()
    def _clean_reference(self, x, attrs) -> list:
        """Per model: the clean forgeries of ``x`` and their edit mask (what :meth:`_score` compares to)."""
        from tsdf_bench.metrics import edit_mask

        out = []
        for m in self.models:
            clean = model_outputs(m, x, attrs, self.max_targets)
            out.append((clean, edit_mask(clean, m.to_input_size(x))))
        return out

    @torch.no_grad()
    def _score(self, w, x, attrs, reference: list | None = None) -> float:
        """Mean over models of SR_mask of ``x + w`` (the search objective); ``reference`` from
        :meth:`_clean_reference` (computed here when not given)."""
        from tsdf_bench.metrics import l2_mask, sr_mask

        reference = reference or self._clean_reference(x, attrs)
        rates = []
        for m, (clean, mask) in zip(self.models, reference):
            protected = model_outputs(m, (x + w).clamp(-1, 1), attrs, self.max_targets)
            rates.append(sr_mask(l2_mask(protected, clean, mask)) or 0.0)
        return sum(rates) / len(rates)

    def _search_factors(self, images, attrs, x) -> dict:
        try:
            import optuna
        except ImportError as exc:
            raise ImportError("cmua search_trials > 0 needs Optuna: pip install 'tsdf-bench[search]' "
                              "(or pip install optuna), or set search_trials = 0 and pass factors") from exc
        n = min(self.search_images, images.shape[0])
        sl = slice(images.shape[0] - n, images.shape[0])
        x_val, a_val = images[sl], slice_attrs(attrs, sl)
        a_fit = slice_attrs(attrs, slice(0, x.shape[0]))
        low, high = self.search_range
        reference = self._clean_reference(x_val, a_val)  # the same for every trial

        def objective(trial):
            factors = {m.name: float(self.factors[m.name]) if m.name in self.factors
                       else trial.suggest_float(m.name, low, high) for m in self.models}
            return self._score(self._fit_with(x, a_fit, factors), x_val, a_val, reference)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=self.seed))
        study.optimize(objective, n_trials=self.search_trials)
        best = {m.name: float(self.factors.get(m.name, study.best_params.get(m.name, 1.0))) for m in self.models}
        self.search = {"sampler": "optuna TPE", "optuna": optuna.__version__, "trials": self.search_trials,
                       "range": list(self.search_range), "images": n, "best_sr_mask": study.best_value,
                       "history": [{"factors": t.params, "sr_mask": t.value} for t in study.trials]}
        return best

    def _call(self, x, forward, y, factor, gen, w_start: bool = False):
        """One model call: ``iterations`` PGD steps, each folded into W by the EMA.

        Starts from the unclamped ``x + U(-eps, eps)``, or with ``w_start`` from the unclamped
        ``x + W`` (``x`` before the first W), as the code does for HiSD."""
        if w_start:
            z = x.clone() if self._w is None else x + self._w
        else:
            z = x + uniform_like(x.shape, self.eps, gen, x.device)
        for _ in range(self.iterations):
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.mse_loss(forward(z), y), z)
            z_adv = z.detach() + self.step * grad.sign()
            eta = (factor * (z_adv - x)).clamp(-self.eps, self.eps).mean(0, keepdim=True)
            self._w = eta if self._w is None else self.ema * self._w + (1 - self.ema) * eta
            z = (x + self._w).clamp(-1, 1)
