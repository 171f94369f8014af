"""Contract checks for defense plugins, for tsdf-bench's own suite and for third-party plugins.

Every defense must keep the L-inf budget and the [-1, 1] image range, give the same
perturbation for the same seed, and (a universal defense) survive ``save()``/``load()``.  These
checks run a defense on a small *toy world* (two tiny generators and three tiny face detectors
implementing the real interfaces, 4 images of 16 x 16), so they take seconds on a CPU::

    from tsdf_bench.testing import check_defense

    def test_my_defense_meets_the_contract(tmp_path):
        check_defense(MyDefense, options={"iterations": 2}, seeded=True, tmp_path=tmp_path)

``check_defense`` runs every check of :data:`DEFENSE_CHECKS` and raises ``AssertionError``
naming the defense and the broken property.  To see one test per check, parametrise over
:data:`DEFENSE_CHECKS` and call the check with a :class:`DefenseCase` (tsdf-bench's own
``tests/test_defenses_plugins.py`` does this for every registered defense).  No pytest import
here: the checks work under any test runner.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .defenses.base import Defense, UniversalDefense, load_perturbation
from .detectors.base import Detections, DetectorOutput, FaceDetector
from .models.base import DeepfakeModel

__all__ = ["DefenseCase", "DEFENSE_CHECKS", "check_defense", "check_budget_and_range", "check_determinism",
           "check_seed_changes_result", "check_save_load", "defense_factory", "toy_world", "ToyWorld", "ToyGAN",
           "ToyDetector", "BlackBoxDetector", "toy_images", "toy_attrs"]

EPS = 0.03  # the budget the checks fit with (not the default 0.05, so a defense that ignores eps fails)
TOL = 1e-6


# -- the toy world ------------------------------------------------------------------------------
class ToyGAN(DeepfakeModel):
    """Encoder (two stride-2 convs) -> condition tiled at the bottleneck -> decoder -> tanh."""

    attributes = ("a", "b", "c")

    def __init__(self, name="toy", size=16, seed=0, ch=8):
        super().__init__("smoke", size)
        self.name = name
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(2 * ch + 3, ch, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(ch, 3, 4, 2, 1))
        with torch.no_grad():  # a larger gain than PyTorch's default init, like a trained generator's
            for p in self.parameters():
                p.mul_(2.5)

    def conditions(self, attrs):
        out = []
        for i in range(len(self.attributes)):
            c = attrs.clone()
            c[:, i] = 1 - c[:, i]
            out.append(c)
        return out

    def generate(self, x, condition):
        z = self.enc(x)
        c = condition.view(*condition.shape, 1, 1).expand(-1, -1, *z.shape[-2:])
        return torch.tanh(self.dec(torch.cat([z, c], 1)))

    def encode(self, x):
        return self.enc(x)


class ToyDetector(FaceDetector):
    """Three feature scales (strides 2, 4, 8), one anchor per cell of each scale."""

    def __init__(self, name="toydet", seed=0, ch=4):
        super().__init__()
        self.name = name
        torch.manual_seed(seed)
        self.b1 = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(ch, ch, 3, 2, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(ch, ch, 3, 2, 1), nn.ReLU())
        self.heads = nn.ModuleList(nn.Conv2d(ch, 5, 1) for _ in range(3))

    def forward_attack(self, images):
        f1 = self.b1(images)
        f2 = self.b2(f1)
        f3 = self.b3(f2)
        scores, boxes = [], []
        for f, head in zip((f1, f2, f3), self.heads):
            out = head(f)
            b, _, h, w = out.shape
            stride = images.shape[-1] / w
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            cx = ((xs + 0.5) * stride).to(images).flatten()
            cy = ((ys + 0.5) * stride).to(images).flatten()
            off = out[:, 1:].flatten(2)  # [B, 4, h*w]
            half = stride * torch.exp(off[:, 2:].clamp(-3, 3))
            x1 = cx + off[:, 0] * stride - half[:, 0]
            y1 = cy + off[:, 1] * stride - half[:, 1]
            x2 = cx + off[:, 0] * stride + half[:, 0]
            y2 = cy + off[:, 1] * stride + half[:, 1]
            boxes.append(torch.stack([x1, y1, x2, y2], -1))
            scores.append(torch.sigmoid(out[:, 0].flatten(1)))
        return DetectorOutput([f1, f2, f3], torch.cat(scores, 1), torch.cat(boxes, 1))

    def detect(self, images):
        out = self.forward_attack(images)
        return [Detections(b[s > 0.5], s[s > 0.5]) for s, b in zip(out.scores, out.boxes)]


class BlackBoxDetector(FaceDetector):
    name = "blackbox"
    differentiable = False


def toy_images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 1.8 - 0.9


def toy_attrs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(n, 3, generator=g) > 0.5).float()


class ToyWorld(NamedTuple):
    images: torch.Tensor      # [4, 3, 16, 16] in [-0.9, 0.9]
    attrs: torch.Tensor       # [4, 3] binary attributes of the toy generators
    models: list              # two ToyGANs
    detectors: list           # two differentiable ToyDetectors and a black-box one


def toy_world(n: int = 4, size: int = 16) -> ToyWorld:
    """The images, attributes, generators and detectors every check fits a defense with."""
    return ToyWorld(toy_images(n, size), toy_attrs(n), [ToyGAN("m1", size, seed=1), ToyGAN("m2", size, seed=2)],
                    [ToyDetector("d1", 1), ToyDetector("d2", 2), BlackBoxDetector()])


# -- the checks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DefenseCase:
    """How to run the checks on one defense.

    ``options``: keyword options that make it fast (few iterations, small batches); ``seeded``:
    a different seed must give a different perturbation (True for anything random or optimised
    from a random start); ``perturbs``: it must change the images (False only for an identity
    baseline such as ``none``).
    """

    options: dict = field(default_factory=dict)
    seeded: bool = False
    perturbs: bool = True


def defense_factory(defense, registry=None) -> Callable[..., Defense]:
    """A factory ``(**options) -> Defense`` from a class or callable, a registry entry, or a registered name."""
    if isinstance(defense, str):
        if registry is None:
            from .plugins import get_registry

            registry = get_registry()
        entry = registry.get("defense", defense)
        return entry.create
    if hasattr(defense, "create") and hasattr(defense, "factory"):  # a DefenseEntry
        return defense.create
    if not callable(defense):
        raise TypeError(f"expected a Defense class, a factory, a DefenseEntry or a registered name, got {defense!r}")
    return defense


def _expect(condition, defense, message):
    if not condition:
        raise AssertionError(f"defense {getattr(defense, 'name', '') or type(defense).__name__!r}: {message}")


def _fit(factory, case, world, **options):
    defense = factory(**{**case.options, **options})
    if not isinstance(defense, Defense):
        raise AssertionError(f"the factory built {type(defense).__name__}, not a tsdf_bench.defenses.Defense")
    fitted = defense.fit(world.images, world.attrs, world.models, world.detectors)
    _expect(fitted is defense, defense, "fit() must return self")
    return defense


def check_budget_and_range(factory, case: DefenseCase, world: ToyWorld, tmp_path=None):
    """Protected images keep the shape, stay within eps of the originals and inside [-1, 1]."""
    x, a = world.images, world.attrs
    d = _fit(factory, case, world, eps=EPS, seed=0)
    _expect(isinstance(d.name, str) and d.name, d, "needs a non-empty `name`")
    p = d.protect(x, a)
    _expect(p.shape == x.shape, d, f"protect() changed the shape {tuple(x.shape)} -> {tuple(p.shape)}")
    err = float((p - x).abs().max())
    _expect(err <= EPS + TOL, d, f"exceeds the budget: max |protected - clean| = {err:.4g} > eps = {EPS}")
    _expect(p.min() >= -1 and p.max() <= 1, d, f"leaves [-1, 1]: [{float(p.min()):.4g}, {float(p.max()):.4g}]")
    if case.perturbs:
        _expect(err > EPS / 3, d, f"hardly perturbs: max |protected - clean| = {err:.4g} (eps = {EPS})")
    edge = x.sign()  # images at the edge of the range stay in range
    pe = d.protect(edge, a)
    _expect(pe.abs().max() <= 1, d, "pushes images at the edge of the range outside [-1, 1]")
    _expect((pe - edge).abs().max() <= EPS + TOL, d, "exceeds the budget on images at the edge of the range")


def check_determinism(factory, case: DefenseCase, world: ToyWorld, tmp_path=None):
    """Two defenses built and fitted with the same seed protect identically."""
    x, a = world.images, world.attrs
    p1 = _fit(factory, case, world, seed=3).protect(x, a)
    d2 = _fit(factory, case, world, seed=3)
    _expect(torch.equal(p1, d2.protect(x, a)), d2, "the same seed gave a different perturbation")


def check_seed_changes_result(factory, case: DefenseCase, world: ToyWorld, tmp_path=None):
    """A seeded defense gives another perturbation for another seed; returns a reason when not seeded."""
    if not case.seeded:
        return "not applicable: the case says the defense does not depend on its seed (seeded=False)"
    x, a = world.images, world.attrs
    p0 = _fit(factory, case, world, seed=0).protect(x, a)
    d1 = _fit(factory, case, world, seed=1)
    _expect(not torch.equal(p0, d1.protect(x, a)), d1, "seeds 0 and 1 gave the same perturbation (seeded=True)")


def check_save_load(factory, case: DefenseCase, world: ToyWorld, tmp_path=None):
    """A universal defense's saved perturbation loads into a fresh defense and protects identically,
    also on images of another size; returns a reason for a per-image defense (nothing to save)."""
    x, a = world.images, world.attrs
    d = _fit(factory, case, world, seed=0)
    if not isinstance(d, UniversalDefense):
        _expect(not d.universal, d, "says universal=True but is not a UniversalDefense (no save()/load())")
        return "not applicable: a per-image defense has no perturbation to save"
    _expect(d.perturbation is not None and d.perturbation.dim() == 4 and d.perturbation.shape[:2] == (1, 3), d,
            "a fitted universal defense needs a [1, 3, H, W] `perturbation`")
    with tempfile.TemporaryDirectory() as tmp:
        path = d.save(Path(tmp_path or tmp) / f"{d.name}-contract.pt", note="contract")
        delta, meta = load_perturbation(path)
        _expect(torch.equal(delta, d.perturbation.detach().cpu().float()), d, "save() did not store the perturbation")
        _expect(meta.get("defense") == d.name and meta.get("note") == "contract", d,
                f"the saved provenance lacks the defense name or the caller's fields: {meta}")
        fresh = factory(**{**case.options, "seed": 0}).load(path)
    _expect(torch.equal(fresh.protect(x, a), d.protect(x, a)), d, "a loaded perturbation protects differently")
    big = F.interpolate(x, size=(x.shape[-2] + 8, x.shape[-1] + 4), mode="bilinear", align_corners=False)
    p = fresh.protect(big)
    _expect(p.shape == big.shape and (p - big).abs().max() <= fresh.eps + TOL, d,
            "on images of another size the perturbation breaks the shape or the budget")


DEFENSE_CHECKS: dict[str, Callable] = {
    "budget_and_range": check_budget_and_range,
    "determinism": check_determinism,
    "seed_changes_result": check_seed_changes_result,
    "save_load": check_save_load,
}
"""Every check: ``check(factory, case, world, tmp_path=None)`` raises AssertionError on a broken
contract and returns ``None``, or a string saying why it does not apply to this defense."""


def check_defense(defense, options: dict | None = None, *, seeded: bool = False, perturbs: bool = True,
                  world: ToyWorld | None = None, tmp_path=None, registry=None) -> dict[str, str]:
    """Run every check of :data:`DEFENSE_CHECKS` on ``defense`` (a Defense class or factory, a
    DefenseEntry, or a registered name), fitted on :func:`toy_world` with ``options``.

    Raises AssertionError at the first broken property; returns ``{check: "ok" or the reason it
    does not apply}``.
    """
    factory = defense_factory(defense, registry)
    case = DefenseCase(dict(options or {}), seeded=seeded, perturbs=perturbs)
    world = world or toy_world()
    return {name: check(factory, case, world, tmp_path) or "ok" for name, check in DEFENSE_CHECKS.items()}
