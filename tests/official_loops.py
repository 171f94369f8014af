"""Reference loops in the structure of the papers' official code (not a test module).

Written from the description in issue 14 (CMUA-Watermark's ``attacks.py`` /
``universal_attack.py``, TSDF's ``train.py``), not copied: the same arithmetic as
:class:`~tsdf_bench_plugins.defenses.cmua.CMUA` and TSDF's stage 1, run the way that code runs it:

- per image batch, per model, **per target**: the clean forgery recomputed for that target
  (CMUA: once per call, as ``universal_perturb_*`` receives it; TSDF: at the end-to-end step,
  and the clean features at every feature step);
- the generators' weights **require grad**: every step is ``model.zero_grad(); loss.backward()``
  and reads ``X.grad``, so the weight gradients are computed and thrown away;
- CMUA's evaluation per image, per model, per target: the clean and the protected forgery
  (forward only), then L2_mask against the clean forgery's edit mask.

The random draws come from the same seeded :class:`torch.Generator` as the defenses' (the official
code draws from NumPy's global state), so the same seed gives the same starts and the two
perturbations can be compared bit for bit (``tests/test_defenses_cmua.py``,
``tests/test_defenses_tsdf.py``, ``benchmarks/test_bench_protocols.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tsdf_bench.defenses.attack_utils import (attrs_for, batches, input_diversity, normalized, resized_features,
                                              slice_attrs, uniform_like)
from tsdf_bench.metrics import edit_mask, l2_mask
from tsdf_bench_plugins.defenses.tsdf import enhanced_copy

HISD_OFFSET = 0.002  # the official HiSD call ascends MSE(G(X), G(x) + 0.002), from X_nat + up


def _trainable(models):
    """The official models are plain modules loaded from checkpoints: their weights require grad."""
    for m in models:
        m.requires_grad_(True)


def _drop_grads(models):
    for m in models:
        m.zero_grad(set_to_none=True)


def official_cmua_fit(models, x, attrs, *, eps=0.05, step=0.01, iterations=10, ema=0.5, batch_size=64,
                      seed=0, max_targets=None, factors=None) -> torch.Tensor:
    """CMUA-Watermark's universal perturbation ``[1, 3, H, W]``: for each batch of ``x``, the
    models in the given order (the official order is StarGAN, AttentionGAN, HiSD, AttGAN), each
    target in turn: ``universal_perturb`` from ``X_nat + U(-eps, eps)`` (HiSD: from ``X_nat +
    up``, target + 0.002), ``iterations`` signed steps, each folded into ``up`` by the EMA."""
    _trainable(models)
    factors = factors or {}
    gen = torch.Generator().manual_seed(seed)
    up = None
    for sl in batches(x.shape[0], batch_size):
        x_nat = x[sl]
        ab = slice_attrs(attrs, sl)
        for m in models:
            factor = float(factors.get(m.name, 1.0))
            hisd = m.name == "hisd"
            c_trg_list = m.conditions(attrs_for(m, ab, x_nat.shape[0], x_nat.device))[:max_targets]
            for c_trg in c_trg_list:
                with torch.no_grad():  # the clean forgery, recomputed for every target
                    gen_noattack = m.generate(m.to_input_size(x_nat), c_trg)
                    if hisd:
                        gen_noattack = gen_noattack + HISD_OFFSET
                # universal_perturb_<model>(X_nat, gen_noattack, c_trg, model)
                if hisd:
                    X = x_nat.clone() if up is None else x_nat + up
                else:
                    X = x_nat.clone() + uniform_like(x_nat.shape, eps, gen, x_nat.device)
                for _ in range(iterations):
                    X.requires_grad = True
                    output = m.generate(m.to_input_size(X), c_trg)
                    m.zero_grad()
                    loss = F.mse_loss(output, gen_noattack)
                    loss.backward()  # weight gradients included
                    X_adv = X + step * X.grad.sign()
                    eta = torch.mean(torch.clamp(factor * (X_adv - x_nat), min=-eps, max=eps).detach_(), dim=0)
                    up = eta if up is None else up * ema + eta * (1 - ema)
                    X = torch.clamp(x_nat + up, min=-1, max=1).detach_()
    _drop_grads(models)
    return up.detach().unsqueeze(0)


@torch.no_grad()
def official_cmua_eval(models, x, attrs, up, max_targets=None) -> dict:
    """Per model, L2_mask ``[N, T]`` of ``clamp(x + up, -1, 1)`` the official way: per image, per
    target, the clean forgery recomputed beside the protected one."""
    out = {}
    for m in models:
        rows = []
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            x_adv = torch.clamp(xi + up, -1, 1)
            ai = attrs_for(m, slice_attrs(attrs, slice(i, i + 1)), 1, xi.device)
            values = []
            for c_trg in m.conditions(ai)[:max_targets]:
                gen_noattack = m.generate(m.to_input_size(xi), c_trg)
                gen = m.generate(m.to_input_size(x_adv), c_trg)
                values.append(l2_mask(gen, gen_noattack, edit_mask(gen_noattack, m.to_input_size(xi)))[0, 0])
            rows.append(torch.stack(values))
        out[m.name] = torch.stack(rows)
    return out


def official_tsdf_stage1(defense, models, x, attrs) -> torch.Tensor:
    """TSDF's stage 1 (interruption) with the options of ``defense`` (a TSDF instance; its
    ``max_targets`` picks the first targets, ``targets`` is not supported), in the release's
    structure: per batch, ``feature_steps`` feature steps with the clean features recomputed at
    every step, then one end-to-end step with per model, per target the clean forgery recomputed;
    every step is ``loss.backward()`` with the generators' weights requiring grad."""
    d = defense
    if d.targets:
        raise ValueError("official_tsdf_stage1: per-model target lists are not supported")
    _trainable(models)
    fs = d.feature_size
    x = x[: d.max_images]
    attrs = slice_attrs(attrs, slice(0, x.shape[0]))
    gen = torch.Generator().manual_seed(d.seed)
    W = uniform_like((1, 3, *x.shape[-2:]), d.eps, gen, x.device)
    mom = torch.zeros_like(W)
    ema, weights = None, torch.full((len(models),), 1.0 / len(models), device=x.device)

    def features(z):
        return torch.cat([resized_features(m, z, fs).sum(1, keepdim=True) for m in models], dim=1)

    def zero_grad():
        for m in models:
            m.zero_grad()

    for _ in range(d.passes):
        for sl in batches(x.shape[0], d.batch_size):
            xb = x[sl]
            ab = slice_attrs(attrs, sl)
            for _ in range(d.feature_steps):
                with torch.no_grad():  # recomputed at every step
                    clean = features(xb)
                W.requires_grad_(True)
                adv = features(input_diversity((xb + W).clamp(-1, 1), gen, d.diversity_prob, d.diversity_ratio))
                loss = -F.mse_loss(adv, clean) + d.enh_weight * F.mse_loss(
                    adv, enhanced_copy(clean, adv, d.enh_temperature, d.enh_alpha).detach())
                zero_grad()
                loss.backward()
                W = (W.detach() - d.step * W.grad.sign()).clamp(-d.eps, d.eps)
            W.requires_grad_(True)
            losses = []
            for m in models:
                adv_in = input_diversity((xb + W).clamp(-1, 1), gen, d.diversity_prob, d.diversity_ratio)
                a = attrs_for(m, ab, xb.shape[0], xb.device)
                fakes, cleans = [], []
                for c in m.conditions(a)[: d.max_targets]:
                    with torch.no_grad():  # the clean forgery, recomputed per target
                        cleans.append(m.generate(m.to_input_size(xb), c))
                    fakes.append(m.generate(m.to_input_size(adv_in), c))
                with torch.no_grad():
                    clean_feat = resized_features(m, xb, fs)
                out_loss = -F.mse_loss(torch.stack(fakes, dim=1), torch.stack(cleans, dim=1))
                feat_loss = -F.mse_loss(resized_features(m, adv_in, fs), clean_feat)
                losses.append(d.output_weight * out_loss + (1 - d.output_weight) * feat_loss)
            stacked = torch.stack(losses)
            total = (weights * stacked).sum()
            zero_grad()
            total.backward()
            mom = normalized(W.grad) + d.momentum * mom
            W = (W.detach() - d.step * mom.sign()).clamp(-d.eps, d.eps)
            current = stacked.detach().float()
            ema = current if ema is None else d.ema * ema + (1 - d.ema) * current
            weights = torch.softmax(ema / d.weight_temperature, dim=0)
    _drop_grads(models)
    return W.detach()
