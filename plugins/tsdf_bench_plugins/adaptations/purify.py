"""Input purification: the attacker cleans protected images before the forgery model sees them.

JPEG re-compression, Gaussian blur, down-up resizing and Gaussian noise: the robustness axis of
the Proactive Defense Benchmark (ICML 2026) and standard countermeasures to adversarial
perturbations (Dziugaite et al., 2016, on JPEG).  None of them retrains the model
(``retrains = False``), so only round 0 is evaluated.  Images are ``[B, 3, H, W]`` in [-1, 1];
the output has the same shape, dtype and device.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from tsdf_bench.adaptations.base import Adaptation
from tsdf_bench.errors import ConfigError


def _check(images: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"adaptation {who!r}: expected images [B, 3, H, W] in [-1, 1], got {shape}")
    return images


class NoAdaptation(Adaptation):
    """The attacker uses the protected images as they are, with the original model (inference-time only)."""

    name = "none"


class JpegPurification(Adaptation):
    """Real JPEG encode/decode with Pillow at ``quality`` (default 75), 4:2:0 chroma subsampling."""

    name = "jpeg"

    def __init__(self, quality: int = 75):
        if not 1 <= int(quality) <= 95:
            raise ConfigError(f"adaptation 'jpeg': quality must be in 1..95, got {quality}")
        self.quality = int(quality)

    def purify(self, images):
        from PIL import Image

        images = _check(images, self.name)
        u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = []
        for img in u8.permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            out.append(np.asarray(Image.open(buf).convert("RGB")))
        dec = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return dec.to(images.device, images.dtype)


class BlurPurification(Adaptation):
    """Gaussian blur with standard deviation ``sigma`` pixels (default 1.0), kernel 2*ceil(3 sigma)+1, reflect padding."""

    name = "blur"

    def __init__(self, sigma: float = 1.0):
        if float(sigma) <= 0:
            raise ConfigError(f"adaptation 'blur': sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def purify(self, images):
        images = _check(images, self.name)
        radius = max(1, math.ceil(3 * self.sigma))
        if radius >= min(images.shape[-2:]):
            radius = min(images.shape[-2:]) - 1
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-t ** 2 / (2 * self.sigma ** 2))
        k = (k / k.sum()).to(images.dtype).to(images.device)
        x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        return x


class ResizePurification(Adaptation):
    """Down-scale by ``factor`` (default 0.5, antialiased bilinear) and up-scale back to the input size."""

    name = "resize"

    def __init__(self, factor: float = 0.5):
        if not 0 < float(factor) < 1:
            raise ConfigError(f"adaptation 'resize': factor must be in (0, 1), got {factor}")
        self.factor = float(factor)

    def purify(self, images):
        images = _check(images, self.name)
        h, w = images.shape[-2:]
        small = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        x = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(-1, 1)


class NoisePurification(Adaptation):
    """Add Gaussian noise of standard deviation ``std`` (default 0.05 on [-1, 1]), seeded by ``seed`` (0)."""

    name = "noise"

    def __init__(self, std: float = 0.05, seed: int = 0):
        if float(std) <= 0:
            raise ConfigError(f"adaptation 'noise': std must be > 0, got {std}")
        self.std, self.seed = float(std), int(seed)

    def purify(self, images):
        images = _check(images, self.name)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(images.shape, generator=g, dtype=torch.float32) * self.std
        return (images + noise.to(images.device, images.dtype)).clamp(-1, 1)
