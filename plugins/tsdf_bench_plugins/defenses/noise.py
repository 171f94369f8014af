"""Uniform random noise at the defense budget: the floor any real defense must beat."""
from __future__ import annotations

from tsdf_bench.defenses.attack_utils import options_of, uniform_like
from tsdf_bench.defenses.base import Defense


class UniformNoise(Defense):
    """Uniform noise ``U(-eps, eps)`` per pixel and channel, drawn from the seeded generator.

    A control, not a paper's method: it shows how much of a defense's effect any perturbation
    of that size would have.  Defaults: eps 0.05 (on [-1, 1]), seed 0.  The same seed and image
    shape give the same noise.
    """

    name = "noise"

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu"):
        super().__init__(eps, seed, device)
        self.options = options_of(locals())

    def perturbation_for(self, images, attrs=None):
        return uniform_like(images.shape, self.eps, self.generator(), images.device).to(images.dtype)
