"""sha256 digests the suite records: of files, of tensors and of state dicts (one definition each).

* :func:`file_sha256`: a file's bytes (checkpoints, photos, shipped weights).
* :func:`tensors_sha256`: the shapes and float32 bytes of some tensors (data sets, perturbations,
  protected images); :func:`differences_sha256` the same of differences, made a few rows at a
  time (a perturbation's digest from protected and clean photos).
* :func:`state_sha256`: a state dict's names, dtypes, shapes and raw bytes in its key order (a
  module's ``state_dict()`` lists them in registration order, so the digest of a model is stable).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes and float32 bytes (CPU, contiguous) of ``tensors``, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        _update_values(h, t)
    return h.hexdigest()


def _update_values(h, t: torch.Tensor) -> None:
    """Feed ``t``'s float32 bytes (CPU, contiguous) to ``h``: the tensor's own buffer, no copy."""
    h.update(t.detach().float().cpu().contiguous().numpy().reshape(-1).view("uint8"))


def differences_sha256(*pairs: tuple[torch.Tensor, torch.Tensor], rows: int = 64) -> str:
    """``tensors_sha256(a - b, ...)`` for the ``(a, b)`` in ``pairs``, the differences made ``rows``
    rows at a time (the same bytes, without a whole difference in memory)."""
    h = hashlib.sha256()
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"differences_sha256: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        h.update(str(tuple(a.shape)).encode())
        for start in range(0, a.shape[0], rows):
            _update_values(h, a[start:start + rows] - b[start:start + rows])
    return h.hexdigest()


def state_sha256(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (key order as stored)."""
    h = hashlib.sha256()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
