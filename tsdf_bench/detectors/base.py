"""The interface every face-detector plugin implements.

Images are float tensors ``[B, 3, H, W]`` in **[-1, 1]**, RGB.  Boxes are ``x1, y1, x2, y2``
in pixels of the input image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Detections:
    """Detections of one image after thresholds and NMS (the attacker's view)."""

    boxes: torch.Tensor  # [N, 4] float, xyxy pixels
    scores: torch.Tensor  # [N]
    landmarks: torch.Tensor | None = None  # [N, 5, 2] (eyes, nose, mouth corners) or None

    def __len__(self):
        return int(self.boxes.shape[0])


@dataclass
class DetectorOutput:
    """The differentiable view used by poisoning attacks.

    ``features``: multi-scale feature maps (list of ``[B, C_i, H_i, W_i]``);
    ``scores``: face probability per anchor/candidate ``[B, A]``;
    ``boxes``: decoded boxes per anchor ``[B, A, 4]`` (xyxy pixels).
    """

    features: list[torch.Tensor]
    scores: torch.Tensor
    boxes: torch.Tensor


class FaceDetector(nn.Module):
    """Base class.  ``differentiable`` is False for black-box detectors (no :meth:`forward_attack`)."""

    name: str = ""
    differentiable: bool = True

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """The non-differentiable pipeline an attacker runs: thresholds, NMS, landmarks."""
        raise NotImplementedError

    def forward_attack(self, images: torch.Tensor) -> DetectorOutput:
        """Differentiable features, scores and boxes (gradients flow to ``images``)."""
        raise NotImplementedError(f"detector {self.name!r} is black-box: it has no differentiable path")
