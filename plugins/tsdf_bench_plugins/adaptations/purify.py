"""Input purification: the attacker cleans protected images before the forgery model sees them.

JPEG re-compression, Gaussian blur, down-up resizing, Gaussian noise and salt-and-pepper noise:
the robustness axis of the Proactive Defense Benchmark (PDB, Baek et al., ICML 2026) and standard
countermeasures to adversarial perturbations (Dziugaite et al., 2016, on JPEG).  None of them
retrains the model (``retrains = False``), so only round 0 is evaluated.  Images are
``[B, 3, H, W]`` in [-1, 1]; the output has the same shape, dtype and device.

PDB's eight settings, as its released code runs them (``attacks/batch_robustness_test.py``,
``apply_preprocessing``; names as in its ``robustness.py``), are in :data:`PDB_SETTINGS`:

* ``jpeg70`` / ``jpeg90``: Pillow JPEG at quality 70 / 90 (``jpeg`` with ``quality``).
* ``blur1`` / ``blur3``: the number is the **kernel size**, not sigma: torchvision's
  ``GaussianBlur(kernel_size=k, sigma=1.0)`` on [0, 1] (``blur`` with ``kernel_size=k, sigma=1``).
  A 1-pixel kernel is the identity, so PDB's ``blur1`` leaves images unchanged.
* ``noise001`` / ``noise003``: Gaussian noise added on the **[-1, 1]** scale, then clamped; the
  code parses the digits as thousandths (``float("001") / 1000``), i.e. std **0.001 / 0.003**,
  although the names (and the issue that asked for them) read as 0.01 / 0.03 (``noise`` with
  ``std``).  :data:`PDB_SETTINGS` follows the code; the names' reading is
  :data:`PDB_SETTINGS_AS_NAMED`.
* ``salt_pepper001`` / ``salt_pepper003``: likewise parsed as thousandths, amount **0.001 /
  0.003**: each *element* (pixel and channel independently) becomes +1 with probability
  amount/2 and -1 with probability amount/2 (``salt-pepper`` with ``amount``).

PDB compares the purified input's forgery with the forgery of the *unpurified* clean image; the
harness's choice of reference is its own (see :mod:`tsdf_bench.field_scores`).
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
    """Real JPEG encode/decode with Pillow at ``quality`` (default 75), 4:2:0 chroma subsampling.

    PDB's ``jpeg70`` / ``jpeg90`` are ``quality=70`` / ``90`` (PDB truncates to uint8 where this
    rounds: at most one grey level apart before encoding).
    """

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
    """Gaussian blur with standard deviation ``sigma`` pixels (default 1.0), reflect padding.

    ``kernel_size`` (default None: 2*ceil(3 sigma)+1, at least 3) sets the kernel's side, an odd
    number >= 1, as torchvision's ``GaussianBlur(kernel_size, sigma)`` does (same kernel and
    padding, tested): PDB's ``blur1`` / ``blur3`` are ``kernel_size=1`` / ``3`` with ``sigma=1``.
    ``kernel_size=1`` is the identity.  Blurring is linear, so doing it on [-1, 1] instead of
    PDB's [0, 1] gives the same image.
    """

    name = "blur"

    def __init__(self, sigma: float = 1.0, kernel_size: int | None = None):
        if float(sigma) <= 0:
            raise ConfigError(f"adaptation 'blur': sigma must be > 0, got {sigma}")
        if kernel_size is not None and (int(kernel_size) != kernel_size or int(kernel_size) < 1
                                        or int(kernel_size) % 2 == 0):
            raise ConfigError(f"adaptation 'blur': kernel_size must be an odd integer >= 1, got {kernel_size}")
        self.sigma = float(sigma)
        self.kernel_size = None if kernel_size is None else int(kernel_size)

    def purify(self, images):
        images = _check(images, self.name)
        if self.kernel_size is not None:
            radius = self.kernel_size // 2
            if radius == 0:
                return images.clone()
        else:
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
    """Add Gaussian noise of standard deviation ``std`` (default 0.05) on the [-1, 1] scale, then clamp.

    Seeded by ``seed`` (0): every call adds the same noise.  PDB's ``noise001`` / ``noise003`` add
    noise on the same [-1, 1] scale with std 0.001 / 0.003 (see the module docstring).
    """

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


class SaltPepperPurification(Adaptation):
    """Salt-and-pepper noise: each element becomes +1 (salt) or -1 (pepper) with probability ``amount / 2`` each.

    ``amount`` (default 0.01) in (0, 1].  ``per_pixel`` (default False): False draws every
    channel of every pixel independently, as PDB's ``salt_and_pepper_noise`` does (coloured specks);
    True turns whole pixels white / black.  Seeded by ``seed`` (0).  As in PDB, salt and pepper are
    drawn independently and pepper wins where both fall, so the share of changed elements is
    ``amount - amount**2 / 4`` (minus those that already had the value).  PDB's
    ``salt_pepper001`` / ``salt_pepper003`` are ``amount=0.001`` / ``0.003`` (module docstring).
    """

    name = "salt-pepper"

    def __init__(self, amount: float = 0.01, seed: int = 0, per_pixel: bool = False):
        if not 0 < float(amount) <= 1:
            raise ConfigError(f"adaptation 'salt-pepper': amount must be in (0, 1], got {amount}")
        self.amount, self.seed, self.per_pixel = float(amount), int(seed), bool(per_pixel)

    def purify(self, images):
        images = _check(images, self.name)
        g = torch.Generator().manual_seed(self.seed)
        shape = (images.shape[0], 1, *images.shape[2:]) if self.per_pixel else tuple(images.shape)
        salt = (torch.rand(shape, generator=g) < self.amount / 2).expand(images.shape)
        pepper = (torch.rand(shape, generator=g) < self.amount / 2).expand(images.shape)
        out = images.clone()
        out[salt.to(images.device)] = 1.0
        out[pepper.to(images.device)] = -1.0
        return out


#: PDB's eight robustness settings as its released code runs them: name -> (adaptation, options).
PDB_SETTINGS: dict[str, tuple[str, dict]] = {
    "jpeg70": ("jpeg", {"quality": 70}),
    "jpeg90": ("jpeg", {"quality": 90}),
    "blur1": ("blur", {"kernel_size": 1, "sigma": 1.0}),
    "blur3": ("blur", {"kernel_size": 3, "sigma": 1.0}),
    "noise001": ("noise", {"std": 0.001}),
    "noise003": ("noise", {"std": 0.003}),
    "salt_pepper001": ("salt-pepper", {"amount": 0.001}),
    "salt_pepper003": ("salt-pepper", {"amount": 0.003}),
}

#: The same eight with noise / salt-and-pepper read as the names (and PDB's paper labels) suggest:
#: std 0.01 / 0.03 and amount 0.01 / 0.03.
PDB_SETTINGS_AS_NAMED: dict[str, tuple[str, dict]] = {
    **PDB_SETTINGS,
    "noise001": ("noise", {"std": 0.01}),
    "noise003": ("noise", {"std": 0.03}),
    "salt_pepper001": ("salt-pepper", {"amount": 0.01}),
    "salt_pepper003": ("salt-pepper", {"amount": 0.03}),
}
