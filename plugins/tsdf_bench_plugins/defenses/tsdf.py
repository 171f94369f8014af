"""TSDF: one universal perturbation that interrupts deepfake models and poisons face detectors."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tsdf_bench.defenses.attack_utils import (batches, check_images, ensemble_features, input_diversity,
                                              model_outputs, normalized, options_of, require, resized_features,
                                              slice_attrs, target_spec, targets_used, uniform_like)
from tsdf_bench.defenses.base import UniversalDefense
from tsdf_bench.defenses.detector_losses import (FixedProjections, attack_view, clean_candidates, differentiable,
                                                  fused_scales, output_loss)


def enhanced_copy(clean: torch.Tensor, adv: torch.Tensor, temperature: float = 0.1, alpha: float = 0.4) -> torch.Tensor:
    """A contrast-enhanced copy of ``adv`` (the target of TSDF's L_enh).

    The standardised difference between adversarial and clean features (local, per element, and
    global, of the means), each gated by a sigmoid of its mean size, is added to ``adv`` with
    weight ``alpha * exp(mean|diff| / temperature)``; the result is re-standardised to ``adv``'s
    mean and std so only the contrast of the difference grows.  Pulling ``adv`` towards this copy
    pushes the features further from the clean ones along the directions they already moved.
    """
    dims = tuple(range(1, adv.dim()))
    cm, cs = clean.mean(dims, keepdim=True), clean.std(dims, keepdim=True) + 1e-7
    am, ast = adv.mean(dims, keepdim=True), adv.std(dims, keepdim=True) + 1e-7
    local = (adv - am) / ast - (clean - cm) / cs
    glob = (am - cm) / cs
    diff = (torch.sigmoid(local.abs().mean(dims, keepdim=True)) * local
            + torch.sigmoid(glob.abs()) * glob)
    scale = torch.exp((diff.abs().mean(dims, keepdim=True) / temperature).clamp(max=20.0))
    enh = adv + alpha * scale * diff
    em, es = enh.mean(dims, keepdim=True), enh.std(dims, keepdim=True) + 1e-7
    return (enh - em) / es * ast + am


def intensity_mask(w0: torch.Tensor, tau: float = 0.040, beta: float = 5.0) -> torch.Tensor:
    """Paper eq. 15: ``M_d = exp(-beta |W0|) * 1[|W0| < tau]`` (poison only where W0 is weak)."""
    return torch.exp(-beta * w0.abs()) * (w0.abs() < tau).to(w0.dtype)


class TSDF(UniversalDefense):
    """Two-Stage Defense Framework (Zheng, Li, Wang, Diao, Guo, "Boosting Active Defense
    Persistence: A Two-Stage Defense Framework Combining Interruption and Poisoning Against
    Deepfake", arXiv 2508.07795, IEEE TIFS 2026; code ``vpsg-research/TSDF``).

    Learns one perturbation ``W [1, 3, S, S]`` (S = the fitting images' size), on the [-1, 1] scale.

    **Stage 1, interruption** (``interruption=True``): from ``U(-eps, eps)``, for ``passes`` passes
    over the first ``max_images`` images in batches of ``batch_size``: ``feature_steps`` feature
    steps, each minimising ``-MSE(feat(x+W), feat(x)) + enh_weight * MSE(feat(x+W), enhanced)``
    where ``feat`` is every model's ``encode`` resized to ``feature_size`` and summed over channels
    (``[B, M, fs, fs]``) and ``enhanced`` is :func:`enhanced_copy` (``enh_temperature``,
    ``enh_alpha``); then one end-to-end step minimising ``sum_m w_m * (output_weight *
    -MSE(G_m(x+W), G_m(x)) + (1-output_weight) * -MSE(E_m(x+W), E_m(x)))`` over the first
    ``max_targets`` targets (None or "all": all; ``targets = {model: [indices]}`` picks targets per
    model, as in FOUND), ``w = softmax(EMA(loss_m) / weight_temperature)`` with EMA
    factor ``ema``, momentum ``momentum`` on the mean-|g|-normalised gradient.  Update
    ``W -= step * sign(g)``, clamp to +-eps.  Input diversity (``diversity_prob``,
    ``diversity_ratio``) on the adversarial input.

    **Stage 2, poisoning** (``poisoning=True``), one *poison call* on a current ``W0`` and a set of
    batches: mask ``M_d = exp(-beta |W0|) * 1[|W0| < tau]`` (eq. 15; all ones when ``mask=False``);
    Adam (``poison_lr``) from 0 with a cosine schedule over ``poison_steps`` steps (one batch per
    step, cycling), gradient-norm clip ``grad_clip``; the result is ``clip(W0 + delta, -eps, eps)``
    (eq. 17).  Loss over the differentiable detectors: eq. 12 on the first ``len(scale_weights)``
    feature scales (each detector's map projected by a fixed seeded 1x1 conv to
    ``projection_channels`` (None: unprojected), resized to ``poison_feature_size`` (at most half
    the image size), concatenated over detectors; target ``-clean + nu * M_d``), plus
    ``poison_output_weight`` times eq. 13
    (:func:`~tsdf_bench.defenses.detector_losses.output_loss`, ``score_loss``).  A multi-stage
    detector (MTCNN) scores the candidate boxes it finds on the *clean* batch, on the clean and
    on the adversarial batch alike, so scores and box targets are compared box by box.

    - ``poison_schedule="release"`` (default, as the release's ``train.py``): a poison call on
      every batch of every stage-1 pass, between the batch's feature steps and its end-to-end
      step, on that batch, with the mask recomputed from the current W; W becomes
      ``clip(W + delta, -eps, eps)`` and stage 1 continues from it (``passes x batches x
      poison_steps`` Adam steps in all).  With ``interruption=False`` the same calls run with no
      stage-1 step in between.  ``"after"``: one poison call of ``poison_steps`` steps over all
      batches after stage 1 (the paper's description of two stages in sequence).
    - ``mask_mode="weight"`` (default): the mask weights and bounds the poison once,
      ``delta = M_d * d`` with ``|d| <= poison_clip`` (eq. 15's intent).  ``"multiply"``: the
      release's ``delta *= M_d`` after every Adam step, which compounds (``M_d`` is 0.82-1 where
      it is not 0) and, as the cosine schedule's steps shrink, decays the poison wherever
      ``|W0| > 0``.
    - After every step ``W0 + delta`` is projected into ``[-eps, eps]``, the eq. 17 clip, so Adam
      never pushes ``delta`` where the clip makes it ineffective.
    - ``score_loss="log"`` (default): ``-log(1 - s)``, from the detector's logit margin when its
      output carries one; ``"square"``: the printed ``s^2`` (see
      :func:`~tsdf_bench.defenses.detector_losses.score_penalty`).

    Defaults (the paper's code): eps 0.05, passes 30, batch_size 8, max_images 128,
    feature_steps 3, step 1e-3, momentum 0.8, feature_size 32, enh_weight 1e-3, enh_temperature
    0.1, enh_alpha 0.4, output_weight 0.7, ema 0.9, weight_temperature 0.1, diversity_prob 0.5,
    diversity_ratio 290/256, max_targets None, tau 0.040, beta 5.0, poison_schedule "release",
    poison_steps 50 (per call), poison_lr 0.02, poison_clip 0.4, grad_clip 1.0, scale_weights
    (5, 3, 4), projection_channels 128, poison_feature_size 64, poison_output_weight 12,
    mask_mode "weight", score_loss "log".  ``nu`` (0.5) is not printed in the paper: chosen.

    Departures from the release, and why (its defects are listed in ``shared/docs/defenses.md``):
    every feature scale contributes to L_feat (the release's indentation keeps only the last);
    gradients flow through every detector, its scores and its boxes (the release preprocesses
    RetinaFace under no_grad and detaches scores and boxes); the 1x1 projections are fixed and
    seeded (the release re-draws them per call); the L_feat target is ``-clean + nu * M_d`` as in
    the paper (the release uses Gaussian noise); the mask is applied once by default (above); the
    output score term is ``-log(1 - s)`` (above); each poison call returns its last ``delta``
    from 0 (the release starts from ``0.001 * N(0, 1) * M_d`` and keeps the step with the lowest
    output loss); the release's extra S3FD-head term is detector-specific and left out; anchors
    are weighted by their clean score and boxes divided by the image size (``output_loss``);
    model features are channel-summed per model and kept apart (``[B, M, fs, fs]``; the release
    sums the concatenation, letting models cancel), and its unprinted "channel attention" part of
    L_enh is left out; all targets of every model are attacked (the release uses one per model);
    the EMA of each model's loss starts at its first value (the release starts at 0).  The clean
    detector outputs of each batch are computed once per fit (speed only).  Measurements of
    these choices: ``docs/findings-defenses.md``.
    """

    name = "tsdf"
    POISON_SCHEDULES = ("release", "after")
    MASK_MODES = ("weight", "multiply")

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu", *, interruption: bool = True,
                 poisoning: bool = True, mask: bool = True, passes: int = 30, batch_size: int = 8,
                 max_images: int | None = 128, feature_steps: int = 3, step: float = 1e-3, momentum: float = 0.8,
                 feature_size: int = 32, enh_weight: float = 1e-3, enh_temperature: float = 0.1,
                 enh_alpha: float = 0.4, output_weight: float = 0.7, ema: float = 0.9,
                 weight_temperature: float = 0.1, diversity_prob: float = 0.5, diversity_ratio: float = 290 / 256,
                 max_targets: int | str | None = None, targets: dict | None = None, tau: float = 0.040,
                 beta: float = 5.0,
                 poison_schedule: str = "release", poison_steps: int = 50, poison_lr: float = 0.02,
                 poison_clip: float = 0.4, grad_clip: float = 1.0, nu: float = 0.5, scale_weights=(5.0, 3.0, 4.0),
                 projection_channels: int | None = 128, poison_feature_size: int = 64,
                 poison_output_weight: float = 12.0, mask_mode: str = "weight", score_loss: str = "log"):
        super().__init__(eps, seed, device)
        self.options = options_of(locals())
        for key, value in self.options.items():
            setattr(self, key, value)
        self.scale_weights = [float(w) for w in scale_weights]
        self.max_targets, self.targets = target_spec(max_targets, targets, self.name)
        if score_loss not in ("log", "square"):
            raise ValueError(f"tsdf: score_loss must be 'log' or 'square', got {score_loss!r}")
        if poison_schedule not in self.POISON_SCHEDULES:
            raise ValueError(f"tsdf: poison_schedule must be one of {self.POISON_SCHEDULES}, got {poison_schedule!r}")
        if mask_mode not in self.MASK_MODES:
            raise ValueError(f"tsdf: mask_mode must be one of {self.MASK_MODES}, got {mask_mode!r}")
        self.poison_mask: torch.Tensor | None = None
        self.history: dict[str, list[float]] = {"interruption": [], "poisoning": []}
        self._cache: dict = {}

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, images, attrs, models, detectors):
        super().fit(images, attrs, models, detectors)
        x = check_images(images, "tsdf.fit")[: self.max_images]
        attrs = slice_attrs(attrs, slice(0, x.shape[0]))
        gen = self.generator()
        start = time.perf_counter()
        self._cache = {}  # per fit: clean detector outputs per batch, the projections
        self._mask_fractions: list[float] = []
        if self.poisoning:
            require(differentiable(self.detectors), "differentiable face detector", self.name,
                    "pass detectors (e.g. retinaface), or set poisoning=False")
        interleaved = self.poisoning and self.poison_schedule == "release"
        if self.interruption:
            require(self.models, "deepfake model", self.name, "pass models, or set interruption=False")
            w = self._interrupt(x, attrs, gen, poison_each_batch=interleaved)
        elif interleaved:  # the release's poison calls, with no stage-1 step between them
            w = torch.zeros(1, 3, *x.shape[-2:], device=x.device)
            for _ in range(self.passes):
                for sl in batches(x.shape[0], self.batch_size):
                    w = (w + self._poison(x, w, [sl])).clamp(-self.eps, self.eps)
        else:
            w = torch.zeros(1, 3, *x.shape[-2:], device=x.device)
        if self.poisoning and self.poison_schedule == "after":
            w = (w + self._poison(x, w)).clamp(-self.eps, self.eps)
        self.perturbation = w.detach()
        self.provenance = {"options": self.options, "images": int(x.shape[0]), "size": list(x.shape[-2:]),
                           "models": [m.name for m in self.models],
                           "targets": targets_used(self.models, attrs, self) if self.interruption else {},
                           "detectors": [d.name for d in differentiable(self.detectors)] if self.poisoning else [],
                           "poison_schedule": self.poison_schedule if self.poisoning else None,
                           "poison_calls": len(self._mask_fractions),
                           "poison_steps_total": len(self.history["poisoning"]),
                           "mask_fraction": None if self.poison_mask is None else float((self.poison_mask > 0).float().mean()),
                           "mask_fraction_mean": (sum(self._mask_fractions) / len(self._mask_fractions)
                                                  if self._mask_fractions else None),
                           "fit_seconds": round(time.perf_counter() - start, 3)}
        return self

    def _interrupt(self, x, attrs, gen, poison_each_batch: bool = False) -> torch.Tensor:
        """Stage 1: feature steps with L_enh, then a dynamically weighted end-to-end step; with
        ``poison_each_batch`` a poison call on the batch between the two (the release)."""
        models, fs = self.models, self.feature_size
        w = uniform_like((1, 3, *x.shape[-2:]), self.eps, gen, x.device)
        mom = torch.zeros_like(w)
        # the EMA of each model's loss and the softmax weights stay on the device: no host sync per step
        ema = None
        weights = torch.full((len(models),), 1.0 / len(models), device=x.device)
        history = []

        def diverse(xb, w):
            return input_diversity((xb + w).clamp(-1, 1), gen, self.diversity_prob, self.diversity_ratio)

        for _ in range(self.passes):
            for sl in batches(x.shape[0], self.batch_size):
                xb = x[sl]
                ab = slice_attrs(attrs, sl)
                with torch.no_grad():  # each encoder runs once on the clean batch
                    clean_feat = [resized_features(m, xb, fs) for m in models]
                    clean_sum = torch.cat([f.sum(1, keepdim=True) for f in clean_feat], dim=1)  # ensemble_features
                    clean_out = [model_outputs(m, xb, ab, self.max_targets, self.targets) for m in models]
                for _ in range(self.feature_steps):
                    w.requires_grad_(True)
                    adv = ensemble_features(models, diverse(xb, w), fs)
                    loss = (-F.mse_loss(adv, clean_sum)
                            + self.enh_weight * F.mse_loss(adv, enhanced_copy(clean_sum, adv, self.enh_temperature,
                                                                               self.enh_alpha).detach()))
                    (grad,) = torch.autograd.grad(loss, w)
                    w = (w.detach() - self.step * grad.sign()).clamp(-self.eps, self.eps)
                if poison_each_batch:
                    w = (w + self._poison(x, w, [sl])).clamp(-self.eps, self.eps)
                w.requires_grad_(True)
                losses = []
                for m, c_out, c_feat in zip(models, clean_out, clean_feat):
                    adv_in = diverse(xb, w)
                    out_loss = -F.mse_loss(model_outputs(m, adv_in, ab, self.max_targets, self.targets), c_out)
                    feat_loss = -F.mse_loss(resized_features(m, adv_in, fs), c_feat)
                    losses.append(self.output_weight * out_loss + (1 - self.output_weight) * feat_loss)
                stacked = torch.stack(losses)
                total = (weights * stacked).sum()
                (grad,) = torch.autograd.grad(total, w)
                mom = normalized(grad) + self.momentum * mom
                w = (w.detach() - self.step * mom.sign()).clamp(-self.eps, self.eps)
                current = stacked.detach().float()
                ema = current if ema is None else self.ema * ema + (1 - self.ema) * current
                weights = torch.softmax(ema / self.weight_temperature, dim=0)
                history.append(total.detach())
        if history:  # one host transfer for the whole loss history
            self.history["interruption"].extend(torch.stack(history).float().cpu().tolist())
        return w.detach()

    def _poison(self, x, w0, slices=None) -> torch.Tensor:
        """One poison call: ``poison_steps`` masked Adam steps on the poison against the
        detectors' features, scores and boxes, cycling over ``slices`` of ``x`` (default: every
        batch), from the current perturbation ``w0``.  Returns the poison ``delta`` (the deployed
        perturbation is ``clip(w0 + delta, -eps, eps)``, and ``w0 + delta`` already lies inside)."""
        dets = differentiable(self.detectors)
        require(dets, "differentiable face detector", self.name,
                "pass detectors (e.g. retinaface), or set poisoning=False")
        w0 = w0.detach()
        mask = intensity_mask(w0, self.tau, self.beta) if self.mask else torch.ones_like(w0)
        self.poison_mask = mask
        if hasattr(self, "_mask_fractions"):
            self._mask_fractions.append(float((mask > 0).float().mean()))
        slices = list(slices) if slices is not None else list(batches(x.shape[0], self.batch_size))
        weighted = self.mask_mode == "weight"
        var = torch.zeros_like(w0, requires_grad=True)  # delta, or d with delta = M_d * d
        opt = torch.optim.Adam([var], lr=self.poison_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.poison_steps, 1))
        n_scales = len(self.scale_weights)
        size = min(self.poison_feature_size, max(1, max(x.shape[-2:]) // 2))
        mask_map = F.interpolate(mask.mean(1, keepdim=True), size=(size, size), mode="bilinear", align_corners=False)
        project = self._cache.setdefault("projections", FixedProjections(self.projection_channels, self.seed))
        # the eq. 17 box for w0 + delta, as bounds on the optimised variable
        low, high = -self.eps - w0, self.eps - w0
        if weighted:
            safe = mask.clamp_min(1e-12)
            low, high = low / safe, high / safe
        history = []
        for step in range(self.poison_steps):
            sl = slices[step % len(slices)]
            xb = x[sl]
            clean, clean_fused, cands = self._clean_detections(x, sl, dets, project, size, n_scales)
            delta = mask * var if weighted else var
            w = (w0 + delta).clamp(-self.eps, self.eps)  # eq. 17 (the identity inside the feasible box)
            adv = [attack_view(d, (xb + w).clamp(-1, 1), c) for d, c in zip(dets, cands)]
            adv_fused = fused_scales(adv, project, size, n_scales)
            l_feat = sum(sw * F.mse_loss(a, -c + self.nu * mask_map)
                         for sw, a, c in zip(self.scale_weights, adv_fused, clean_fused))
            l_out = sum(output_loss(a, c, max(xb.shape[-2:]), self.score_loss)
                        for a, c in zip(adv, clean)) / len(dets)
            loss = l_feat + self.poison_output_weight * l_out
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([var], self.grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                if not weighted:
                    var.mul_(mask)  # the release: once per step, so it compounds
                var.clamp_(-self.poison_clip, self.poison_clip)
                var.copy_(torch.maximum(torch.minimum(var, high), low))
                if weighted:
                    var.mul_((mask > 0).to(var.dtype))
            history.append(loss.detach())
        if history:
            self.history["poisoning"].extend(torch.stack(history).float().cpu().tolist())
        return (mask * var if weighted else var).detach()

    def _clean_detections(self, x, sl, dets, project, size, n_scales):
        """Per batch (cached for the fit): each detector's clean candidates (None for
        single-stage detectors), its clean output at them, and the fused clean features."""
        key = ("clean", sl.start, sl.stop, x.data_ptr(), size)
        if key not in self._cache:
            xb = x[sl]
            with torch.no_grad():
                cands = [clean_candidates(d, xb) for d in dets]
                clean = [attack_view(d, xb, c) for d, c in zip(dets, cands)]
                self._cache[key] = (clean, fused_scales(clean, project, size, n_scales), cands)
        return self._cache[key]
