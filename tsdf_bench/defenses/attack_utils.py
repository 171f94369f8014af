"""Small pieces that the interruption attacks (TSDF stage 1, FOUND, CMUA, PGD) share.

Images are ``[B, 3, H, W]`` in [-1, 1]; a universal perturbation is ``[1, 3, S, S]``.
Every random choice takes an explicit :class:`torch.Generator` (CPU) so that a defense's
seed fixes its result on any device.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def attrs_for(model, attrs, batch: int, device) -> torch.Tensor:
    """The attribute tensor ``[B, len(model.attributes)]`` that ``model.conditions`` expects.

    ``attrs`` may be None (no labels: all attributes 0, e.g. a person's own photos), one tensor
    already shaped for this model, or -- when models use different attribute lists -- a mapping
    ``{model.name: tensor}`` or a mapping of label columns ``{attribute name: [B] tensor}``
    holding every attribute the model uses.
    """
    names = tuple(getattr(model, "attributes", ()) or ())
    n = len(names)
    if isinstance(attrs, Mapping):
        if model.name in attrs:
            attrs = attrs[model.name]
        elif n and all(a in attrs for a in names):
            attrs = torch.stack([torch.as_tensor(attrs[a], device=device).float() for a in names], dim=1)
        else:
            missing = [a for a in names if a not in attrs]
            raise ConfigError(f"attribute mapping has neither key {model.name!r} nor the columns {missing} "
                              f"that model {model.name!r} needs")
    if attrs is None:
        return torch.zeros(batch, n, device=device)
    attrs = torch.as_tensor(attrs, device=device).float()
    if attrs.dim() != 2 or attrs.shape[0] != batch or (n and attrs.shape[1] != n):
        raise ConfigError(
            f"attributes of shape {tuple(attrs.shape)} do not fit model {model.name!r}, which needs "
            f"[{batch}, {n}] ({', '.join(names)}); pass a dict {{model name: tensor}}, a dict of label "
            "columns {attribute name: tensor}, or None")
    return attrs


def target_spec(max_targets=None, targets: Mapping | None = None, what: str = "defense"):
    """Check and normalise a defense's target set: ``max_targets`` is None or ``"all"`` (every
    protocol target), or n >= 1 (the first n); ``targets`` optionally maps model names to lists of
    target indices (into the model's ``conditions``), which win over ``max_targets`` for those
    models.  Returns ``(max_targets, targets)`` with ``"all"`` turned into None."""
    if isinstance(max_targets, str):
        if max_targets != "all":
            raise ConfigError(f"{what}: max_targets must be a number >= 1 or 'all', got {max_targets!r}")
        max_targets = None
    if max_targets is not None and (isinstance(max_targets, bool) or int(max_targets) < 1):
        raise ConfigError(f"{what}: max_targets must be a number >= 1 or 'all', got {max_targets!r}")
    if targets is not None:
        if not isinstance(targets, Mapping) or not all(
                isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and i >= 0 for i in v)
                for v in targets.values()):
            raise ConfigError(f"{what}: targets must map model names to non-empty lists of target indices, "
                              f"e.g. {{stargan = [0, 2]}}; got {targets!r}")
        targets = {str(k): [int(i) for i in v] for k, v in targets.items()}
    return (None if max_targets is None else int(max_targets)), targets


def target_indices(model, n: int, max_targets: int | None = None, targets: Mapping | None = None) -> list[int] | None:
    """The indices of ``model``'s ``n`` protocol targets a defense attacks (None: all of them)."""
    if targets and model.name in targets:
        bad = [i for i in targets[model.name] if i >= n]
        if bad:
            raise ConfigError(f"targets: model {model.name!r} has {n} targets (indices 0-{n - 1}), got {bad}")
        return list(targets[model.name])
    if max_targets is None or max_targets >= n:
        return None
    return list(range(max_targets))


def targets_used(models, attrs, defense) -> dict:
    """Per model, the target indices ``defense`` (with ``max_targets`` and ``targets``) attacks,
    or "all" (for provenance records)."""
    out = {}
    for m in models:
        n = len(m.conditions(attrs_for(m, slice_attrs(attrs, slice(0, 1)), 1, "cpu")))
        picked = target_indices(m, n, defense.max_targets, defense.targets)
        out[m.name] = "all" if picked is None else picked
    return out


def model_outputs(model, x: torch.Tensor, attrs, max_targets: int | None = None,
                  targets: Mapping | None = None) -> torch.Tensor:
    """All protocol edits of ``x`` (or the first ``max_targets``, or for a model named in
    ``targets`` the listed target indices): ``[B, T, 3, H, W]``."""
    a = attrs_for(model, attrs, x.shape[0], x.device)
    x = model.to_input_size(x)
    if max_targets is None and not (targets and model.name in targets):
        # batched over targets, or the per-target loop (tsdf_bench.speed)
        generate = getattr(model, "generate_targets", None) or model.generate_all
        return generate(x, a)
    conds = model.conditions(a)
    picked = target_indices(model, len(conds), max_targets, targets)
    conds = conds if picked is None else [conds[i] for i in picked]
    return torch.stack([model.generate(x, c) for c in conds], dim=1)


def resized_features(model, x: torch.Tensor, size: int) -> torch.Tensor:
    """``model.encode(x)`` resized bilinearly to ``size x size`` (all channels kept)."""
    feat = model.encode(model.to_input_size(x))
    if feat.dim() == 3:  # a code without a channel axis
        feat = feat.unsqueeze(1)
    return F.interpolate(feat, size=(size, size), mode="bilinear", align_corners=False)


def ensemble_features(models: Sequence, x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Each model's encoder features at ``size x size``, summed over channels, stacked:
    ``[B, M, size, size]`` (the multi-feature aggregation of FOUND and TSDF stage 1)."""
    return torch.cat([resized_features(m, x, size).sum(1, keepdim=True) for m in models], dim=1)


def input_diversity(x: torch.Tensor, generator: torch.Generator, prob: float = 0.5,
                    max_ratio: float = 290 / 256) -> torch.Tensor:
    """With probability ``prob`` resize ``x`` to a random size in ``[S, S*max_ratio)``, zero-pad
    it at a random place to ``S*max_ratio`` and resize back to ``S`` (Xie et al., CVPR 2019;
    TSDF uses 256 -> [256, 290)).  Differentiable; ``x`` is returned unchanged otherwise."""
    h, w = x.shape[-2:]
    big = max(int(round(h * max_ratio)), h + 1)
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return x
    rnd = int(torch.randint(h, big, (), generator=generator))
    rem = big - rnd
    top = int(torch.randint(0, rem + 1, (), generator=generator))
    left = int(torch.randint(0, rem + 1, (), generator=generator))
    out = F.interpolate(x, size=(rnd, rnd), mode="bilinear", align_corners=False)
    out = F.pad(out, (left, rem - left, top, rem - top), value=0.0)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


def normalized(grad: torch.Tensor) -> torch.Tensor:
    """``grad / mean(|grad|)`` per sample (for momentum; the sign is unchanged)."""
    dims = tuple(range(1, grad.dim()))
    return grad / (grad.abs().mean(dim=dims, keepdim=True) + 1e-12)


def uniform_like(shape, eps: float, generator: torch.Generator, device) -> torch.Tensor:
    """``U(-eps, eps)`` of ``shape``, drawn on the CPU generator then moved to ``device``."""
    return ((torch.rand(shape, generator=generator) * 2 - 1) * eps).to(device)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` (the papers use the first images, unshuffled)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse anything that is not ``[B, 3, H, W]`` float in [-1, 1]."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"{what}: expected images [B, 3, H, W] with B >= 1, got {shape}")
    if not images.is_floating_point():
        raise ConfigError(f"{what}: images must be float in [-1, 1], got {images.dtype}")
    if images.min() < -1.001 or images.max() > 1.001:
        raise ConfigError(f"{what}: images must be in [-1, 1] (got [{images.min():.3f}, {images.max():.3f}]); "
                          "convert with x * 2 - 1 from [0, 1]")
    return images


def require(items: Sequence, what: str, defense: str, fix: str):
    """Raise a clear error when a defense needs models or detectors and got none."""
    if not items:
        raise ConfigError(f"defense {defense!r} needs at least one {what}; {fix}")


def options_of(local_vars: dict) -> dict:
    """A defense's constructor arguments as a JSON-friendly dict (for provenance records)."""
    skip = {"self", "__class__", "device"}
    out = {}
    for key, value in local_vars.items():
        if key in skip:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def slice_attrs(attrs, sl: slice):
    """``attrs`` (None, a tensor, or a mapping of tensors) restricted to the images ``sl``."""
    if attrs is None:
        return None
    if isinstance(attrs, Mapping):
        return {k: v[sl] for k, v in attrs.items()}
    return attrs[sl]
