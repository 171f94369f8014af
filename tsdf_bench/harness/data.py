"""The three image sets of a run, cut from the configured data source.

* **fit** (``n_train_defense``): the images a defense is fitted on (white-box, like the 128
  CelebA training images of CMUA/FOUND/TSDF);
* **collect** (``n_collect``): the photos the attacker collects *after* they were protected and
  retrains on (TSDF's threat model);
* **eval** (``n_eval``): held-out protected images on which forgeries and detections are measured.

fit and collect come from the source's training split (collect right after fit; if the split is
too small, collect wraps around and ``notes`` says so); eval comes from the held-out split.
Images are ``[N, 3, S, S]`` in [-1, 1] with ``S = data.image_size``; ``attrs`` are 0/1 labels with
column names ``attr_names``.  Each model gets its own columns through :func:`select_attrs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .provenance import tensors_hash

# The attribute names of the synthetic test source (CelebA names, so real plugins accept them).
SYNTHETIC_ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
                        "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young")


@dataclass
class Split:
    images: torch.Tensor
    attrs: torch.Tensor


@dataclass
class RunData:
    fit: Split
    collect: Split
    eval: Split
    attr_names: tuple[str, ...]
    data_hash: str
    description: str
    notes: list[str] = field(default_factory=list)


def to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` to ``size x size`` (bilinear, antialiased), clamped to [-1, 1]."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    # the same resize as DeepfakeModel.to_input_size, which attacks differentiate through
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


def select_attrs(attrs: torch.Tensor, attr_names, wanted, who: str) -> torch.Tensor:
    """The columns of ``attrs`` named ``wanted`` (a model's ``attributes``), in that order."""
    attr_names = list(attr_names)
    missing = [a for a in wanted if a not in attr_names]
    if missing:
        raise ConfigError(f"{who} uses attributes {missing} that the data does not label "
                          f"(data attributes: {', '.join(attr_names)}); use a data source with those labels")
    index = [attr_names.index(a) for a in wanted]
    return attrs[:, index].float() if index else attrs[:, :0].float()


def synthetic(n: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded smooth random images with random 0/1 attributes: for harness tests only (no faces)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.randn(n, 3, image_size, image_size, generator=g)).clamp(-1, 1)
    attrs = (torch.rand(n, len(SYNTHETIC_ATTRIBUTES), generator=g) > 0.5).float()
    return images, attrs


def _take(images, attrs, start, n):
    """``n`` rows from ``start``, wrapping around; returns the split and whether it wrapped."""
    total = images.shape[0]
    idx = [(start + i) % total for i in range(n)]
    return Split(images[idx].clone(), attrs[idx].clone()), start + n > total


def _load_source(cfg):
    """``((train images, attrs), (held-out images, attrs), attr_names, description)``."""
    d = cfg.data
    n_train = max(d.n_train_defense + d.n_collect, 1)
    if d.source == "synthetic":
        train = synthetic(n_train, d.image_size, seed=1)
        held = synthetic(d.n_eval, d.image_size, seed=2)
        return train, held, SYNTHETIC_ATTRIBUTES, "synthetic random images (harness tests only; no faces)"
    if d.source == "embedded":
        from ..data.embedded import load_embedded

        ds = load_embedded(image_size=d.image_size, seed=0)
        names = tuple(getattr(ds.train, "attr_names", None) or getattr(ds, "attr_names", ()))
        source_hash = getattr(ds, "data_hash", "")
        description = (f"embedded demo faces from installed packages ({d.image_size}px; demo scale"
                       + (f"; source hash {source_hash[:12]})" if source_hash else ")"))
        return (ds.train.images, ds.train.attrs), (ds.eval.images, ds.eval.attrs), names, description
    from ..data._common import ATTGAN_ATTRS

    attributes = list(d.attributes) or list(ATTGAN_ATTRS)
    if d.source == "celeba":
        from ..data.celeba import CelebA

        train = CelebA(d.path, split="train", protocol=d.protocol, image_size=d.image_size, attrs=attributes)
        test = CelebA(d.path, split="test", protocol=d.protocol, image_size=d.image_size, attrs=attributes)
        tr, te = train.faceset(n=n_train), test.faceset(n=d.n_eval)
        description = f"CelebA at {d.path} ({d.protocol} protocol, {d.image_size}px)"
        return (tr.images, tr.attrs), (te.images, te.attrs), tuple(tr.attr_names), description
    from ..data.folder import ImageFolderDataset

    folder = ImageFolderDataset(d.path, image_size=d.image_size, attr_csv=d.attr_csv or None,
                                attrs=list(d.attributes) or None)
    faces = folder.faceset(n=n_train + d.n_eval)
    if len(faces) < 2:
        raise ConfigError(f"[data] folder {d.path} has {len(faces)} readable image(s); need at least 2")
    n_held = min(d.n_eval, len(faces) - 1)
    tr, te = faces.subset(slice(0, len(faces) - n_held)), faces.subset(slice(len(faces) - n_held, None))
    description = f"image folder {d.path} ({d.image_size}px; the last {n_held} images held out)"
    return (tr.images, tr.attrs), (te.images, te.attrs), tuple(faces.attr_names), description


def load_run_data(cfg) -> RunData:
    """Cut fit / collect / eval from the configured source (see the module docstring)."""
    d = cfg.data
    (train_x, train_a), (held_x, held_a), names, description = _load_source(cfg)
    if train_x.shape[0] == 0 or held_x.shape[0] == 0:
        raise ConfigError(f"[data] source {d.source!r} yielded an empty split "
                          f"({train_x.shape[0]} training, {held_x.shape[0]} held-out images)")
    notes = []
    fit, wrapped_fit = _take(train_x, train_a, 0, d.n_train_defense)
    collect, wrapped_collect = _take(train_x, train_a, d.n_train_defense, d.n_collect)
    if wrapped_fit:
        notes.append(f"only {train_x.shape[0]} training images: the fit split repeats images")
    if wrapped_collect:
        notes.append(f"only {train_x.shape[0]} training images: the collect split overlaps the fit split")
    n_eval = min(d.n_eval, held_x.shape[0])
    if n_eval < d.n_eval:
        notes.append(f"n_eval = {d.n_eval} asked, the held-out split has {held_x.shape[0]}: using {n_eval}")
    ev = Split(held_x[:n_eval].clone(), held_a[:n_eval].clone())
    for split in (fit, collect, ev):
        split.images = to_size(split.images.float(), d.image_size)
    data_hash = tensors_hash(fit.images, fit.attrs, collect.images, collect.attrs, ev.images, ev.attrs)
    return RunData(fit, collect, ev, names, data_hash, description, notes)
