"""Shared detection logic of anchor-based single-shot face detectors (S3FD, DSFD).

A subclass supplies ``self.net`` whose ``forward(bgr_minus_mean)`` returns ``(features,
logits [B, A, 2], loc [B, A, 4], priors [A, 4])`` with priors (cx, cy, w, h) in input pixels;
this class does the pixel normalisation (RGB -> BGR, minus the BGR mean 104/117/123), softmax,
decoding (variances 0.1, 0.2), thresholding and NMS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Detections, DetectorOutput, FaceDetector
from .boxes import decode_center_offsets, nms
from .common import check_images, to_pixels

BGR_MEAN = (104.0, 117.0, 123.0)


class SSDFaceDetector(FaceDetector):
    variances = (0.1, 0.2)

    def _setup(self, score_threshold, nms_threshold, min_size, device):
        self.score_threshold, self.nms_threshold, self.min_size = score_threshold, nms_threshold, int(min_size)
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    def _decoded(self, images):
        h, w = images.shape[2:]
        sx = sy = 1.0
        if self.min_size and min(h, w) < self.min_size:
            s = self.min_size / min(h, w)
            size = (round(h * s), round(w * s))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            sx, sy = size[1] / w, size[0] / h
        feats, logits, loc, priors = self.net(to_pixels(images).flip(1) - self.mean)
        boxes = decode_center_offsets(loc, priors.to(loc), self.variances) / loc.new_tensor([sx, sy, sx, sy])
        return feats, logits.softmax(-1)[..., 1], boxes

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[Detections]:
        images = check_images(images, self.name)
        _, scores, boxes = self._decoded(images.float())
        out = []
        for s, b in zip(scores, boxes):
            ok = s > self.score_threshold
            s, b = s[ok], b[ok]
            keep = nms(b, s, self.nms_threshold)
            out.append(Detections(boxes=b[keep].cpu(), scores=s[keep].cpu(), landmarks=None))
        return out

    def forward_attack(self, images: torch.Tensor) -> DetectorOutput:
        """``features``: the detection-source maps; ``scores``: softmax face probability per
        anchor; ``boxes``: decoded xyxy boxes.  All differentiable."""
        images = check_images(images, self.name)
        feats, scores, boxes = self._decoded(images)
        return DetectorOutput(features=feats, scores=scores, boxes=boxes)
