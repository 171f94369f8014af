"""What every result row carries so it can be reproduced: versions, device, commit, hashes.

RobustBench's users asked which seed and weights stood behind a number; these helpers answer
that per row: package versions (torch, numpy, tsdf-bench and every plugin distribution used),
the device, the git commit of the code with a dirty flag, and sha256 hashes of model weights,
perturbations and data.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error."""
    from ..errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu or device = \"auto\"")
    return torch.device(device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}"


def cpu_description() -> dict[str, str]:
    """The CPU's model name and the SIMD level torch's CPU kernels use (``torch.backends.cpu``):
    float results, and so the bits of fitted perturbations and retrained weights, can differ
    between CPU types (README, "Reproducibility"), so rows say which one made them."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        # a VM may report only "AMD EPYC": the family and model numbers tell the generation
        name = f"{info.get('model name', name)} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        capability = "unknown"
    return {"cpu": name, "cpu_capability": capability}


def versions(registry=None, used: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Versions of python, torch, numpy, tsdf-bench and the plugin distributions of ``used``, and
    the CPU (:func:`cpu_description`).

    ``used`` maps a plugin kind to the names a run uses (``{"defense": ["tsdf"]}``).
    """
    from .. import __version__

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "tsdf-bench": __version__, **cpu_description()}
    if registry is not None and used:
        for kind, names in used.items():
            for name in names:
                entry = registry.get(kind, name)
                dist = entry.distribution or entry.source or "?"
                out[f"plugin:{dist}"] = entry.version or ""
    return dict(sorted(out.items()))


def git_state(path: str | None = None) -> dict:
    """``{"git_commit": sha or None, "git_dirty": bool or None}`` of the tree holding ``path``
    (default: this package's tree).  Dirty = tracked files differ from the commit, or files git
    does not ignore are untracked (a new config or plugin the commit lacks)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        status = subprocess.run(["git", "status", "--porcelain"], cwd=where,
                                capture_output=True, text=True, timeout=30)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"git_commit": commit.stdout.strip(), "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def derived_seed(seed: int, *keys) -> int:
    """A 63-bit seed from a run seed and the names of a step, stable across processes."""
    text = "|".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
