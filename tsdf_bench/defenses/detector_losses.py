"""Losses against face detectors, shared by the poisoning defenses (TSDF stage 2, FacePoison).

A detector's differentiable view is :class:`tsdf_bench.detectors.base.DetectorOutput`
(``features`` list, ``scores [B, A]``, ``boxes [B, A, 4]`` xyxy pixels).  Gradients flow
through every detector and every scale used (the TSDF release loses most of them; see
``../shared/docs/defenses.md``).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F


def differentiable(detectors: Sequence) -> list:
    """The detectors that have a differentiable ``forward_attack`` (black-box ones are skipped)."""
    return [d for d in detectors if getattr(d, "differentiable", True)]


def takes_candidates(det) -> bool:
    """Whether ``det.forward_attack`` scores given candidate boxes (``refine_boxes``: MTCNN's
    R-Net / O-Net stages) rather than a fixed set of anchors."""
    try:
        return "refine_boxes" in inspect.signature(det.forward_attack).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def clean_candidates(det, images: torch.Tensor):
    """The candidate boxes a multi-stage detector refines on the clean ``images`` (per image, best
    score first), or None for a single-stage detector.  Attacks pass the same candidates to the
    clean and the adversarial :func:`attack_view`, so that scores and box targets are compared
    candidate by candidate on the same boxes."""
    if not takes_candidates(det):
        return None
    return [d.boxes[torch.argsort(d.scores, descending=True)] for d in det.detect(images.detach())]


def attack_view(det, images: torch.Tensor, candidates=None):
    """``det.forward_attack(images)``, at the given candidates when the detector takes them."""
    if candidates is None:
        return det.forward_attack(images)
    return det.forward_attack(images, refine_boxes=candidates)


def first_scales(features: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` feature maps (shallow to deep), or all of them if the detector has fewer."""
    return list(features[:n])


class FixedProjections:
    """Seeded 1x1 projections of every detector's feature maps to ``channels`` channels.

    Drawn once from ``seed`` when first needed (the TSDF release re-draws them on every call,
    which makes its loss a moving target).  ``channels=None`` keeps the maps as they are.
    """

    def __init__(self, channels: int | None, seed: int):
        self.channels, self.seed = channels, seed
        self.weights: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, det_index: int, scale: int, feat: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return feat
        key = (det_index, scale)
        w = self.weights.get(key)
        if w is None or w.shape[1] != feat.shape[1]:
            g = torch.Generator().manual_seed(self.seed * 1000 + det_index * 37 + scale)
            w = torch.randn(self.channels, feat.shape[1], 1, 1, generator=g) / feat.shape[1] ** 0.5
            self.weights[key] = w
        return F.conv2d(feat, w.to(feat.device, feat.dtype))


def fused_scales(outputs: Sequence, project: FixedProjections, size: int, n_scales: int) -> list[torch.Tensor]:
    """Per scale, every detector's (projected, resized to ``size``) map concatenated on channels.

    ``outputs`` holds one ``DetectorOutput`` per detector.  Returns ``n_scales`` tensors
    ``[B, C_total, size, size]`` (fewer if no detector has that many scales).
    """
    fused = []
    for s in range(n_scales):
        maps = []
        for d, out in enumerate(outputs):
            feats = first_scales(out.features, n_scales)
            if s < len(feats):
                f = feats[s]
                # projection and bilinear resizing commute (both linear): do the cheaper order
                if project.channels is not None and f.shape[1] < project.channels:
                    f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
                    maps.append(project(d, s, f))
                else:
                    maps.append(F.interpolate(project(d, s, f), size=(size, size), mode="bilinear",
                                              align_corners=False))
        if maps:
            fused.append(torch.cat(maps, dim=1))
    return fused


def tiny_boxes(boxes: torch.Tensor, half_size: float = 0.5) -> torch.Tensor:
    """A box of ``2*half_size`` pixels centred on each box's centre (TSDF's box target)."""
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    return torch.stack([cx - half_size, cy - half_size, cx + half_size, cy + half_size], dim=-1)


def score_penalty(scores: torch.Tensor, kind: str = "log", margins: torch.Tensor | None = None) -> torch.Tensor:
    """Per-anchor penalty pushing face probabilities ``scores`` to 0.

    ``"square"``: ``s^2`` (eq. 13 as printed).  Its gradient with respect to the detector's logit
    margin is ``2 s^2 (1 - s)``, which vanishes on exactly the confident detections that must be
    removed (MTCNN's faces score 0.999: 500x less gradient than at s = 0.5).  ``"log"``:
    ``-log(1 - s)``, the cross-entropy to the "no face" label the detectors were trained with;
    same minimiser (0 at s = 0), gradient ``s`` with respect to the logit margin, so the most
    confident anchors get the most gradient.  Given the logit ``margins`` (face logit minus
    background logit, ``s = sigmoid(margin)``) it is computed as ``-logsigmoid(-margin)``
    (= softplus), which stays exact and keeps its gradient for s > 1 - 1e-6 where ``1 - s``
    rounds to 0; from ``scores`` alone, ``1 - s`` is floored at 1e-6 to stay finite.
    """
    if kind == "square":
        return scores ** 2
    if kind == "log":
        if margins is not None:
            return -F.logsigmoid(-margins)
        return -torch.log((1 - scores).clamp_min(1e-6))
    raise ValueError(f"score penalty must be 'square' or 'log', got {kind!r}")


def output_loss(adv, clean, image_size: int, score_loss: str = "log") -> torch.Tensor:
    """Paper eq. 13: scores to 0 and boxes to a tiny box at their clean centre.

    ``1/N sum_i (p(s_i) + ||b_i - b_target,i||_1)`` where the sum runs over anchors weighted by
    the clean score (detached), so the anchors that found the face dominate instead of the
    thousands of background anchors; boxes are divided by the image size so both terms are
    on a comparable [0, 1] scale.  ``p`` is :func:`score_penalty` (``score_loss``: ``"log"``
    by default, ``"square"`` for the printed ``s^2``); it uses the detector's logit margins when
    its output carries them (an optional ``margins [B, A]`` attribute of the output).  ``adv`` and
    ``clean`` must score the same anchors or candidates (see :func:`clean_candidates`).
    """
    w = clean.scores.detach().clamp_min(0)
    w = w / (w.sum(dim=1, keepdim=True) + 1e-8)
    target = tiny_boxes(clean.boxes.detach())
    box_l1 = (adv.boxes - target).abs().sum(-1) / float(image_size)
    penalty = score_penalty(adv.scores, score_loss, getattr(adv, "margins", None))
    return (w * (penalty + box_l1)).sum(dim=1).mean()
