"""One GAN training loop for every deepfake model: demo training from scratch and attacker fine-tuning.

The loop knows nothing about a particular generator: each model supplies its real objective
through :meth:`DeepfakeModel.losses` (``part="d"`` or ``"g"``) and a fresh discriminator through
:meth:`DeepfakeModel.make_discriminator`.  Optimisation follows the official StarGAN/AttGAN
solvers: one *step* is one iteration; the discriminator is updated every step and the
generator every ``n_critic``-th step (StarGAN, Choi et al., CVPR 2018; AttGAN, He et al.,
TIP 2019), with Adam.

Per-model defaults come from an optional ``train_defaults`` dict on the model
(keys ``lr_g``, ``lr_d``, ``betas``, ``n_critic``); explicit arguments override them.  A model
whose generator has parts that must not be trained may define ``generator_parameters()``
(default: ``model.parameters()``).

Attacker fine-tuning of an official G-only checkpoint: pass no ``discriminator`` and
``warmup_d_steps > 0``; a fresh D is then trained alone (G frozen) before the joint steps,
as TSDF does for HiSD.

Demo-scale recipes may add two cheap conveniences (departures from the official solvers,
used to make CPU demo training converge in about a minute):

* ``recon_warmup_steps``: before anything else, G alone is trained as a conditional auto-encoder
  with the model's own reconstruction term (``model.reconstruction_loss(x, attrs)``, e.g.
  ``|G(x, c_org) - x|_1``), without D or gradient penalty, so the joint phase starts from a
  generator that already reproduces faces instead of from noise.
* ``reg_every``: "lazy regularisation" (Karras et al., StyleGAN2, CVPR 2020): the model's
  gradient penalty (the expensive double backward) is computed only every ``reg_every``-th D
  step, multiplied by ``reg_every`` to keep its average weight; models opt in by accepting a
  ``reg_scale`` keyword in ``losses`` (0 = skip the penalty this step).

A model may provide ``optimizer_param_groups(lr)`` (Adam parameter groups, e.g. HiSD's mappers at
lr/100; used instead of ``generator_parameters()``) and ``grad_clip_norm`` (G's and D's gradient
norms are clipped to it, as HiSD's official trainer does).

Resumable: with ``checkpoint_dir`` the full state (G, D, both optimisers, step, RNG states,
history) is written atomically to ``checkpoint_dir/train_state.pt`` every ``checkpoint_every``
steps, at the end and on Ctrl-C; a later call with ``resume=True`` continues from it and gives
the same result as an uninterrupted run (CPU, same seed).

Devices: training runs where the model's parameters are (a model moved to CUDA trains on CUDA);
the discriminator is moved there, ``images``/``attrs`` stay where they are and each batch is
moved on its own, and the per-step loss values stay on the device until the end (or a
checkpoint), so the loop does not wait for the GPU at every step.  Training stays fp32: bf16
autocast is used only in the attack loops (see :mod:`tsdf_bench.speed`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hashing import tensors_sha256
from ..paths import temp_path

STATE_FILE = "train_state.pt"
DEFAULTS = {"lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.5, 0.999), "n_critic": 5}


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained ``model`` (in eval mode), its ``discriminator``,
    ``history`` (one dict per step: ``step``, ``part`` ("recon"/"warmup"/"d"/"g") and each loss term as float)
    and ``steps`` (joint steps done, warm-up excluded)."""

    model: nn.Module
    discriminator: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0


class StaleTrainingState(CheckpointError):
    """A saved training state belongs to a run with other settings (it is never resumed)."""


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Check ``images`` is ``[N, 3, H, W]`` float in [-1, 1] and resize it to ``size`` x ``size``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"training images must be a float tensor [N, 3, H, W], got {shape}; "
                          "load images with tsdf_bench's image helpers or stack them into one tensor")
    images = images.detach().float()
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ConfigError(f"training images must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]; "
                          "map [0, 1] images with x * 2 - 1")
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = images.clamp(-1, 1)
    return images


def _check_attrs(attrs, n, model):
    n_attr = len(getattr(model, "attributes", ()) or ())
    if not isinstance(attrs, torch.Tensor) or attrs.dim() != 2 or attrs.shape[0] != n:
        raise ConfigError(f"attrs must be a tensor [N={n}, A] of 0/1 labels, got "
                          f"{tuple(attrs.shape) if isinstance(attrs, torch.Tensor) else type(attrs).__name__}")
    if n_attr and attrs.shape[1] != n_attr:
        raise ConfigError(f"attrs has {attrs.shape[1]} columns but {getattr(model, 'name', 'the model')} uses "
                          f"{n_attr} attributes {list(model.attributes)}; select those columns by name")
    return attrs.detach().float()


def _adam(params, lr, betas):
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
        return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


def _generator_params(model, lr):
    """Adam parameter groups of G: ``model.optimizer_param_groups(lr)`` when the model has it."""
    if hasattr(model, "optimizer_param_groups"):
        return model.optimizer_param_groups(lr)
    if hasattr(model, "generator_parameters"):
        return list(model.generator_parameters())
    return list(model.parameters())


def _accepts(fn, name):
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def data_fingerprint(images: torch.Tensor, attrs: torch.Tensor) -> str:
    """A short sha256 of the training tensors (recorded in checkpoints and manifests)."""
    return tensors_sha256(images, attrs)[:16]


def _atomic_save(obj, path: Path):
    tmp = temp_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model, images: torch.Tensor, attrs: torch.Tensor, steps: int, *, discriminator: nn.Module | None = None,
          batch_size: int = 16, lr: float | None = None, lr_d: float | None = None, betas=None,
          n_critic: int | None = None, seed: int = 0, warmup_d_steps: int = 0, progress: bool = True,
          checkpoint_dir=None, checkpoint_every: int = 200, resume: bool = True, augment: bool = True,
          recon_warmup_steps: int = 0, recon_lr: float | None = None, reg_every: int = 1,
          grad_clip_norm: float | None = None) -> TrainResult:
    """Train (or fine-tune) ``model`` with its own GAN objective on ``images`` / ``attrs``.

    Args:
        model: a :class:`~tsdf_bench.models.base.DeepfakeModel` (weights updated in place).
        images: ``[N, 3, H, W]`` in [-1, 1]; resized to ``model.image_size`` if needed.
        attrs: ``[N, len(model.attributes)]`` binary labels.
        steps: iterations; D is updated every step, G every ``n_critic``-th step.
        discriminator: an existing D to continue with; None builds ``model.make_discriminator()``.
        batch_size: images per step (sampled with replacement-free shuffles per epoch).
        lr, lr_d: Adam learning rates of G and D (default: ``model.train_defaults`` or 1e-4).
        betas: Adam betas (default (0.5, 0.999)).  n_critic: D steps per G step (default 5).
        seed: seeds batch order, augmentation and the losses' randomness (deterministic on CPU).
        warmup_d_steps: with a freshly built D, train D alone for this many steps first (G frozen).
        progress: show a tqdm bar.  augment: random horizontal flips (as the official solvers).
        checkpoint_dir, checkpoint_every, resume: see the module docstring.
        recon_warmup_steps: first train G alone on ``model.reconstruction_loss`` for this many
            steps (demo recipes; see the module docstring).
        recon_lr: G's learning rate during that warm-up (default: ``lr``; parameter groups keep
            their ratios).
        reg_every: compute the gradient penalty every this many D steps (lazy regularisation;
            only for models whose ``losses`` take ``reg_scale``).
        grad_clip_norm: clip G's and D's gradient norms (default: ``model.grad_clip_norm`` if set).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be a non-negative int, got {steps!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    cfg = dict(DEFAULTS)
    cfg.update(getattr(model, "train_defaults", {}) or {})
    lr_g = cfg["lr_g"] if lr is None else lr
    lr_d = cfg["lr_d"] if lr_d is None else lr_d
    betas = tuple(cfg["betas"] if betas is None else betas)
    n_critic = int(cfg["n_critic"] if n_critic is None else n_critic)
    if n_critic < 1:
        raise ConfigError(f"n_critic must be >= 1, got {n_critic}")
    recon_warmup = int(recon_warmup_steps)
    if recon_warmup < 0:
        raise ConfigError(f"recon_warmup_steps must be >= 0, got {recon_warmup_steps!r}")
    if recon_warmup and not hasattr(model, "reconstruction_loss"):
        raise ConfigError(f"recon_warmup_steps needs a model with reconstruction_loss(x, attrs); "
                          f"{getattr(model, 'name', type(model).__name__)} has none: pass recon_warmup_steps=0")
    reg_every = int(reg_every)
    if reg_every < 1:
        raise ConfigError(f"reg_every must be >= 1, got {reg_every}")
    lazy_reg = reg_every > 1 and _accepts(model.losses, "reg_scale")
    if grad_clip_norm is None:
        grad_clip_norm = getattr(model, "grad_clip_norm", None)

    images = prepare_images(images, model.image_size)
    attrs = _check_attrs(attrs, images.shape[0], model)
    fresh_d = discriminator is None
    if fresh_d:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            discriminator = model.make_discriminator()
    warmup = int(warmup_d_steps) if fresh_d else 0
    device = _device_of(model)
    discriminator.to(device)

    g_params = _generator_params(model, lr_g)
    opt_g = _adam(g_params, lr_g, betas)
    opt_d = _adam(discriminator.parameters(), lr_d, betas)
    base_lrs = [g["lr"] for g in opt_g.param_groups]
    recon_mult = 1.0 if recon_lr is None else float(recon_lr) / lr_g

    # everything the run's result depends on: a state saved under other settings (another
    # architecture, learning rate, data ...) is never resumed (StaleTrainingState)
    fingerprint = {"model": getattr(model, "name", type(model).__name__), "scale": getattr(model, "scale", ""),
                   "config": json.loads(json.dumps(getattr(model, "config", None), default=str)),
                   "data": data_fingerprint(images, attrs), "seed": seed, "batch_size": batch_size,
                   "n_critic": n_critic, "warmup_d_steps": warmup, "lr": lr_g, "lr_d": lr_d, "betas": list(betas)}
    if recon_warmup or lazy_reg:  # keys only when used, so older train states stay resumable
        fingerprint.update(recon_warmup_steps=recon_warmup, recon_lr=recon_lr, reg_every=reg_every if lazy_reg else 1)
    state_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state_path = checkpoint_dir / STATE_FILE

    sampler = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    done = 0  # iterations done, warm-up included
    order = torch.empty(0, dtype=torch.long)
    cursor = 0
    pre = recon_warmup + warmup  # iterations before the joint phase
    total = pre + steps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if state_path is not None and resume and state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") != fingerprint:
                raise StaleTrainingState(
                    f"{state_path} belongs to a different training run ({state.get('fingerprint')} vs {fingerprint}); "
                    "delete that folder, pass another checkpoint_dir, or resume=False to start afresh")
            model.load_state_dict(state["G"])
            discriminator.load_state_dict(state["D"])
            opt_g.load_state_dict(state["opt_G"])
            opt_d.load_state_dict(state["opt_D"])
            torch.set_rng_state(state["rng"])
            sampler.set_state(state["sampler"])
            order, cursor = state["order"], int(state["cursor"])
            done, history = int(state["done"]), list(state["history"])

        def snapshot():
            if state_path is None:
                return
            _settle(history)
            _atomic_save({"fingerprint": fingerprint, "G": model.state_dict(), "D": discriminator.state_dict(),
                          "opt_G": opt_g.state_dict(), "opt_D": opt_d.state_dict(), "rng": torch.get_rng_state(),
                          "sampler": sampler.get_state(), "order": order, "cursor": cursor, "done": done,
                          "history": history}, state_path)

        def next_batch():
            nonlocal order, cursor
            n = images.shape[0]
            idx = []
            while len(idx) < batch_size:
                if cursor >= order.numel():
                    order, cursor = torch.randperm(n, generator=sampler), 0
                take = min(batch_size - len(idx), order.numel() - cursor)
                idx.extend(order[cursor:cursor + take].tolist())
                cursor += take
            x, a = images[idx], attrs[idx]
            if augment:
                flip = torch.rand(len(idx), generator=sampler) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            return x.to(device, non_blocking=True), a.to(device, non_blocking=True)

        def clip(params):
            if grad_clip_norm:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip_norm)

        def d_step(x, a, it=0):
            _set_requires_grad(discriminator, True)
            opt_d.zero_grad(set_to_none=True)
            if lazy_reg:
                terms = model.losses(discriminator, x, a, part="d",
                                     reg_scale=float(reg_every) if it % reg_every == 0 else 0.0)
            else:
                terms = model.losses(discriminator, x, a, part="d")
            sum(terms.values()).backward()
            clip(discriminator.parameters())
            opt_d.step()
            return terms

        def g_step(x, a):
            _set_requires_grad(discriminator, False)
            opt_g.zero_grad(set_to_none=True)
            terms = model.losses(discriminator, x, a, part="g")
            sum(terms.values()).backward()
            clip(model.parameters())
            opt_g.step()
            _set_requires_grad(discriminator, True)
            return terms

        def set_g_lr(mult):
            for group, base in zip(opt_g.param_groups, base_lrs):
                group["lr"] = base * mult

        def recon_step(x, a):
            set_g_lr(recon_mult)
            opt_g.zero_grad(set_to_none=True)
            terms = model.reconstruction_loss(x, a)
            sum(terms.values()).backward()
            clip(model.parameters())
            opt_g.step()
            set_g_lr(1.0)
            return terms

        model.train()
        discriminator.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, disable=not progress, desc=f"train {fingerprint['model']}",
                   dynamic_ncols=True, leave=False)
        try:
            while done < total:
                x, a = next_batch()
                if done < recon_warmup:
                    row = {"step": done - pre, "part": "recon", **_detached(recon_step(x, a))}
                elif done < pre:
                    flags = [p.requires_grad for p in model.parameters()]
                    _set_requires_grad(model, False)
                    try:
                        row = {"step": done - pre, "part": "warmup", **_detached(d_step(x, a))}
                    finally:
                        for p, flag in zip(model.parameters(), flags):
                            p.requires_grad_(flag)
                else:
                    it = done - pre
                    row = {"step": it, "part": "d", **_detached(d_step(x, a, it))}
                    if (it + 1) % n_critic == 0:
                        history.append(row)
                        row = {"step": it, "part": "g", **_detached(g_step(x, a))}
                history.append(row)
                done += 1
                bar.update(1)
                if progress and done % 10 == 0:
                    bar.set_postfix({k: f"{float(v):.3g}" for k, v in row.items() if k not in ("step", "part")},
                                    refresh=False)
                if state_path is not None and checkpoint_every and done % checkpoint_every == 0:
                    snapshot()
        except KeyboardInterrupt:
            snapshot()
            raise
        finally:
            bar.close()
            _set_requires_grad(discriminator, True)
        snapshot()
    _settle(history)
    model.eval()
    discriminator.eval()
    return TrainResult(model, discriminator, history, steps=max(0, done - pre))


def _detached(terms: dict) -> dict:
    """The loss terms, detached (still on the device: :func:`_settle` turns them into floats)."""
    return {k: v.detach() for k, v in terms.items()}


def _settle(history: list) -> None:
    """Turn the tensor values of ``history``'s rows into floats, in place (one host transfer)."""
    pending = [(row, k) for row in history for k, v in row.items() if torch.is_tensor(v)]
    if pending:
        values = torch.stack([row[k].float().reshape(()) for row, k in pending]).cpu().tolist()
        for (row, k), value in zip(pending, values):
            row[k] = value


def _device_of(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
