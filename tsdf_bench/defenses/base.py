"""The interface every defense plugin implements.

Images are float tensors ``[B, 3, H, W]`` in **[-1, 1]**.  ``eps`` is an L-inf budget on that
scale (0.05 there = 0.025 on [0, 1], about 6.4/255).  A defense is *fitted* with white-box
access to deepfake models and face detectors, then *protects* images; the protected image is
always within ``eps`` of the original and inside [-1, 1].

Universal defenses (:class:`UniversalDefense`) learn one perturbation ``[1, 3, S, S]``.  On an
image of another size it is resized bilinearly to the image's ``H x W`` and clipped to ``eps``
again before it is added.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..hashing import tensors_sha256
from ..paths import temp_path
from ..speed import Switch


class Defense:
    """Base class.  Subclasses implement :meth:`fit` (may be a no-op) and :meth:`perturbation_for`."""

    name: str = ""
    universal: bool = False
    #: The speed switch (:mod:`tsdf_bench.speed`): the harness sets it to the run's resolved
    #: ``optimize`` when it creates the defense; unset, ``TSDF_BENCH_OPTIMIZE`` decides.  A defense
    #: may take a faster path when it is on (PGD attacks a whole batch at once).
    optimize = Switch()

    def __init__(self, eps: float = 0.05, seed: int = 0, device: str | torch.device = "cpu"):
        if not 0 <= eps <= 2:
            raise ValueError(f"eps={eps} is outside [0, 2] (the budget is on the [-1, 1] scale)")
        self.eps = float(eps)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.models: list = []
        self.detectors: list = []

    @property
    def info(self) -> dict:
        """What a result row should show about this defense (JSON-friendly): its constructor
        options as given (``self.options``, when the subclass records them).  Subclasses add
        what they resolve while fitting (CMUA: ``model_order``)."""
        return {"defense_options": dict(getattr(self, "options", {}) or {})}

    def generator(self) -> torch.Generator:
        """A seeded CPU generator: the same seed gives the same perturbation."""
        return torch.Generator().manual_seed(self.seed)

    def fit(self, images: torch.Tensor, attrs: torch.Tensor | None, models: Sequence, detectors: Sequence) -> "Defense":
        """Learn from ``images`` with white-box ``models`` and ``detectors``.  Returns self."""
        self.models, self.detectors = list(models), list(detectors)
        return self

    def perturbation_for(self, images: torch.Tensor, attrs: torch.Tensor | None) -> torch.Tensor:
        """The additive perturbation for ``images`` (same shape, or broadcastable)."""
        raise NotImplementedError

    def protect(self, images: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """``clamp(x + clip(delta, -eps, eps), -1, 1)``: the budget and the range always hold."""
        delta = self.perturbation_for(images, attrs).to(images.device, images.dtype)
        return (images + delta.clamp(-self.eps, self.eps)).clamp(-1.0, 1.0).detach()


class UniversalDefense(Defense):
    """One perturbation for all images (CMUA, FOUND, TSDF)."""

    universal = True

    def __init__(self, eps: float = 0.05, seed: int = 0, device="cpu"):
        super().__init__(eps, seed, device)
        self.perturbation: torch.Tensor | None = None  # [1, 3, S, S]
        self.provenance: dict = {}

    def perturbation_for(self, images, attrs=None):
        if self.perturbation is None:
            raise RuntimeError(f"defense {self.name!r} is not fitted: call fit() or load() first")
        delta = self.perturbation.to(images.device)
        if delta.shape[-2:] != images.shape[-2:]:
            delta = F.interpolate(delta, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return delta.clamp(-self.eps, self.eps)

    def save(self, path, **provenance) -> Path:
        return save_perturbation(path, self.perturbation, {"defense": self.name, "eps": self.eps,
                                                          "seed": self.seed, **self.provenance, **provenance})

    def load(self, path) -> "UniversalDefense":
        self.perturbation, self.provenance = load_perturbation(path)
        return self


def save_perturbation(path, perturbation: torch.Tensor, provenance: dict) -> Path:
    """Save a universal perturbation with its provenance (``.pt`` of plain tensors and a JSON string)."""
    if perturbation is None:
        raise RuntimeError("nothing to save: the defense is not fitted")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(provenance, sha256=tensors_sha256(perturbation), shape=list(perturbation.shape))
    buf = io.BytesIO()
    torch.save({"perturbation": perturbation.detach().cpu().float(), "provenance": json.dumps(meta, sort_keys=True)}, buf)
    tmp = temp_path(path)
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_perturbation(path) -> tuple[torch.Tensor, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"perturbation file {path} does not exist; fit the defense first or fix the path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        delta, meta = blob["perturbation"], json.loads(blob["provenance"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"perturbation file {path} is not a tsdf-bench perturbation: {exc}") from exc
    if meta.get("sha256") and meta["sha256"] != tensors_sha256(delta):
        raise CheckpointError(f"perturbation file {path} is corrupt: its hash does not match its provenance record")
    return delta, meta
