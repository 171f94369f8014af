"""The interface every deepfake-model plugin implements.

Images are float tensors ``[B, 3, H, W]`` in **[-1, 1]** (the CMUA/TSDF scale).
A *condition* is whatever the generator takes besides the image (a label vector for StarGAN,
AttentionGAN and AttGAN, a style code for HiSD); ``conditions(attrs)`` returns the protocol's
targets for a batch, so code that attacks or evaluates a model never needs to know which it is.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..speed import Switch

# scale name -> (image size, base channel count); "paper" is the official configuration.
SCALES = ("paper", "demo", "smoke")


class DeepfakeModel(nn.Module):
    """Base class: a conditional face-editing generator plus what attacks and training need.

    Subclasses set ``name``, ``attributes`` (the attribute names their conditions use),
    ``image_size`` and ``scale``, and implement :meth:`conditions`, :meth:`generate`,
    :meth:`encode`, :meth:`make_discriminator` and :meth:`losses`.
    """

    name: str = ""
    attributes: tuple[str, ...] = ()
    input_range = (-1.0, 1.0)
    #: The speed switch for this model (:mod:`tsdf_bench.speed`): the harness sets it to the run's
    #: resolved ``optimize``; unset, ``TSDF_BENCH_OPTIMIZE`` decides.  Read by :meth:`generate_targets`.
    optimize = Switch()

    def __init__(self, scale: str, image_size: int):
        super().__init__()
        self.scale = scale
        self.image_size = image_size

    # -- inference -----------------------------------------------------------------------
    def to_input_size(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` resized (bilinear, antialiased, differentiable) to the model's input size.

        Everything that feeds images of another size to the model (attacks, evaluation) goes
        through this, so a perturbation is optimised through the same resize it is measured with.
        """
        if tuple(x.shape[-2:]) == (self.image_size, self.image_size):
            return x
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True).clamp(-1.0, 1.0)

    def conditions(self, attrs: torch.Tensor) -> list[Any]:
        """The protocol's targets for images with binary attributes ``attrs`` ``[B, len(attributes)]``.

        Returns a list of T conditions, each valid for the whole batch (StarGAN/AttentionGAN 5,
        AttGAN 14, HiSD 1).
        """
        raise NotImplementedError

    def generate(self, x: torch.Tensor, condition: Any) -> torch.Tensor:
        """One edit of a batch: ``[B, 3, H, W] -> [B, 3, H, W]`` in the generator's output range."""
        raise NotImplementedError

    def generate_all(self, x: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """Every protocol target: ``[B, T, 3, H, W]``.  Subclasses may batch the T targets."""
        return torch.stack([self.generate(x, c) for c in self.conditions(attrs)], dim=1)

    def generate_targets(self, x: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """Every protocol target, ``[B, T, 3, H, W]``: what callers (the runner, the attacks) use.

        With :attr:`optimize` on (:mod:`tsdf_bench.speed`) this is the subclass's ``generate_all``
        (batched over targets where the plugin does so); with it off it is the papers'
        per-target loop of :meth:`DeepfakeModel.generate_all`.  Both give the same images up to
        float rounding.
        """
        if self.optimize:
            return self.generate_all(x, attrs)
        return DeepfakeModel.generate_all(self, x, attrs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The features feature-level attacks use (see ../shared/docs/models-and-data.md)."""
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------
    def make_discriminator(self) -> nn.Module:
        """A fresh discriminator matching this generator's scale."""
        raise NotImplementedError

    def losses(self, discriminator: nn.Module, x: torch.Tensor, attrs: torch.Tensor, part: str) -> dict[str, torch.Tensor]:
        """The model's own training objective for one batch; ``part`` is ``"d"`` or ``"g"``.

        Returns named loss terms; their sum is minimised (D step: over D's parameters;
        G step: over G's parameters).
        """
        raise NotImplementedError
