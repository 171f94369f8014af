"""Tiny models and detectors implementing the real interfaces, for fast defense tests."""
from __future__ import annotations

import torch
from torch import nn

from tsdf_bench.detectors.base import Detections, DetectorOutput, FaceDetector
from tsdf_bench.models.base import DeepfakeModel


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
