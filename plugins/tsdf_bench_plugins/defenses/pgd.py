"""Per-image PGD against deepfake generators ("Disrupting Deepfakes", Ruiz et al.)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tsdf_bench.defenses.attack_utils import (check_images, model_outputs, options_of, require, slice_attrs,
                                              uniform_like)
from tsdf_bench.defenses.base import Defense


class PGD(Defense):
    """Per-image L-inf PGD (Ruiz, Bargal, Sclaroff, "Disrupting Deepfakes: Adversarial Attacks
    Against Conditional Image Translation Networks and Facial Manipulation Systems", ECCV-W 2020;
    code ``natanielruiz/disrupting-deepfakes``).

    For each batch ``x`` (``[B, 3, H, W]`` in [-1, 1]): start at ``x + U(-eps, eps)`` (if
    ``random_start``), then ``iterations`` times ascend ``sum_m MSE(G_m(x_adv, c), G_m(x, c))`` over
    every model and all its targets at once (the paper's *joint* class-transfer variant) by
    ``step * sign(grad)``, projecting onto the eps ball and [-1, 1].

    Defaults (the paper's): eps 0.05, iterations 10, step 0.01, random_start True,
    max_targets None (all targets).

    With :attr:`optimize` on (the run's speed switch, :mod:`tsdf_bench.speed`) a batch is attacked
    at once; with it off, image by image as in the paper's code.  Both give the same perturbations
    up to float rounding.

    Departures: when the models take a fixed input size (``model.image_size``) different from the
    image's, the attack runs on a bilinear resize of the image and the perturbation is resized
    back (still within eps: bilinear interpolation is a convex combination).  The random start is
    drawn from this defense's seeded generator, so the same images give the same result.
    """

    name = "pgd"

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu", *, iterations: int = 10, step: float = 0.01,
                 random_start: bool = True, max_targets: int | None = None):
        super().__init__(eps, seed, device)
        self.options = options_of(locals())
        self.iterations, self.step, self.random_start, self.max_targets = iterations, step, random_start, max_targets

    def fit(self, images, attrs, models, detectors=()):
        super().fit(images, attrs, models, detectors)
        require(self.models, "deepfake model", self.name, "pass the models to attack")
        return self

    def perturbation_for(self, images, attrs=None):
        require(self.models, "deepfake model", self.name, "call fit(images, attrs, models, detectors) first")
        images = check_images(images, "pgd")
        size = getattr(self.models[0], "image_size", None)
        x = images
        if size and tuple(images.shape[-2:]) != (size, size):
            x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        start = None
        if self.random_start:
            start = uniform_like(x.shape, self.eps, self.generator(), x.device)
        if self.optimize or x.shape[0] == 1:
            adv = self._attack(x, attrs, start)
        else:  # the papers' one-image-at-a-time loop (same result: each image's loss is its own)
            adv = torch.cat([self._attack(x[i:i + 1], slice_attrs(attrs, slice(i, i + 1)),
                                          None if start is None else start[i:i + 1])
                             for i in range(x.shape[0])])
        delta = adv - x
        if delta.shape[-2:] != images.shape[-2:]:
            delta = F.interpolate(delta, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return delta.detach()

    def _attack(self, x, attrs, start):
        """PGD on the batch ``x`` (model input size) from ``x + start``; returns the adversarial batch.

        The loss is a mean over the batch, but every image's gradient depends only on its own
        image (models run in eval mode), and the sign step ignores the 1/B scale: a batch gives
        the per-image results."""
        with torch.no_grad():
            clean = [model_outputs(m, x, attrs, self.max_targets) for m in self.models]
        adv = x.clone() if start is None else (x + start).clamp(-1, 1)
        for _ in range(self.iterations):
            adv.requires_grad_(True)
            loss = sum(F.mse_loss(model_outputs(m, adv, attrs, self.max_targets), y) for m, y in zip(self.models, clean))
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + self.step * grad.sign()
            adv = (x + (adv - x).clamp(-self.eps, self.eps)).clamp(-1, 1)
        return adv
