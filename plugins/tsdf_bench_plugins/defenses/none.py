"""No protection: the zero perturbation (the baseline every table needs)."""
from __future__ import annotations

import torch

from tsdf_bench.defenses.attack_utils import options_of
from tsdf_bench.defenses.base import Defense


class NoDefense(Defense):
    """Adds nothing (``delta = 0``): measures the models and detectors on clean images.

    Defaults: eps 0.05 (unused, kept so every defense takes the same options), seed 0.
    """

    name = "none"

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu"):
        super().__init__(eps, seed, device)
        self.options = options_of(locals())

    def perturbation_for(self, images, attrs=None):
        return torch.zeros_like(images)
