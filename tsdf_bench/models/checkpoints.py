"""Checkpoints: strict loading of official generator weights, and tsdf-bench's own model files.

Official files (paper scale) hold the generator's state_dict exactly as the official code saves
it: StarGAN/AttentionGAN ``200000-G.ckpt`` is a bare state_dict; AttGAN ``weights.199.pth`` is
``{"G": ..., "D": ..., "optim_G": ..., "optim_D": ...}`` (a bare G state_dict is accepted too).
A model declares how to read them with ``official_state_dict()`` /
``load_official_state_dict(sd)`` and, optionally, ``official_checkpoint_keys`` (the dict keys that
may hold the generator, default ``("G",)``).  Everything is read with
``torch.load(weights_only=True)`` -- no pickled code runs.

Our own files (``save_model``) hold ``{"format": FORMAT, "model", "scale", "config",
"state_dict", "discriminator"}``; a JSON manifest beside them records how they were made
(config, data hash, steps, seed, package versions, sha256 of the weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = "tsdf-bench-model/1"


def _read(path) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of the weights file "
                              "(e.g. 200000-G.ckpt for StarGAN/AttentionGAN, weights.199.pth for AttGAN)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"checkpoint {path} could not be read safely ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); it must be a torch.save'd state_dict "
                              "(no pickled objects)") from None


def _few(keys, n=5):
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def compare_state_dicts(expected: dict, found: dict) -> tuple[list, list, list]:
    """``(missing, unexpected, mismatching)`` keys of ``found`` against ``expected``; mismatching
    entries are ``"key: found (a, b) expected (c, d)"`` strings."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatching = [f"{k}: found {tuple(found[k].shape)} expected {tuple(expected[k].shape)}"
                   for k in expected if k in found and hasattr(found[k], "shape")
                   and tuple(found[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatching


def check_state_dict(model, state_dict: dict, source: str, expected: dict | None = None):
    """Raise :class:`CheckpointError` naming missing/unexpected/mismatching keys (first few + counts)."""
    expected = model.official_state_dict() if expected is None else expected
    missing, unexpected, mismatching = compare_state_dicts(expected, state_dict)
    if not (missing or unexpected or mismatching):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatching:
        parts.append(f"{len(mismatching)} shape mismatch(es): {_few(mismatching, 3)}")
    name, scale = getattr(model, "name", type(model).__name__), getattr(model, "scale", "?")
    raise CheckpointError(
        f"{source} does not fit {name} at scale {scale!r}: " + "; ".join(parts) +
        f". Fix: official checkpoints load only at scale 'paper' with the matching model "
        f"(StarGAN/AttentionGAN: 200000-G.ckpt of the 256 px CelebA model; AttGAN: weights.199.pth of "
        f"256_shortcut1_inject0_none); check that the file belongs to {name!r} and the scale is right")


def extract_generator_state(obj, model, source: str) -> dict:
    """The generator's state_dict inside a loaded official file (bare dict or ``{"G": ...}``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    expected = model.official_state_dict()
    for key in getattr(model, "official_checkpoint_keys", ("G",)):
        inner = obj.get(key)
        if isinstance(inner, dict) and not any(k in obj for k in expected):
            return inner
    return obj


def load_official(model, path) -> None:
    """Load an official generator checkpoint into ``model`` strictly (see the module docstring)."""
    source = f"checkpoint {path}"
    state = extract_generator_state(_read(path), model, source)
    check_state_dict(model, state, source)
    model.load_official_state_dict(state, strict=True)


def save_model(model, path, discriminator=None, manifest: dict | None = None) -> dict:
    """Write our checkpoint (G and optionally D) atomically, plus ``<path>.json`` manifest; returns the manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "model": getattr(model, "name", ""), "scale": getattr(model, "scale", ""),
            "config": json.dumps(getattr(model, "config", {}), sort_keys=True),
            "state_dict": model.state_dict(),
            "discriminator": discriminator.state_dict() if discriminator is not None else {}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    info = {"model": blob["model"], "scale": blob["scale"], "config": getattr(model, "config", {}),
            "weights": path.name, "sha256": sha256_file(path), "versions": package_versions()}
    info.update(manifest or {})
    manifest_path(path).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return info


def manifest_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_manifest(path) -> dict:
    """The manifest of our checkpoint ``path`` (empty dict when absent)."""
    p = manifest_path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def load_model_checkpoint(model, path) -> dict:
    """Load ``path`` into ``model``: our own file (checked for model/scale) or an official one.

    Returns the loaded blob's extras: ``{"discriminator": state_dict or {}}``.
    """
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        name, scale = getattr(model, "name", ""), getattr(model, "scale", "")
        if obj.get("model") != name or obj.get("scale") != scale:
            raise CheckpointError(f"checkpoint {path} holds {obj.get('model')!r} at scale {obj.get('scale')!r}, "
                                  f"not {name!r} at scale {scale!r}; pass model and scale that match the file")
        expected = model.state_dict()
        check_state_dict(model, obj["state_dict"], f"checkpoint {path}", expected=expected)
        model.load_state_dict(obj["state_dict"], strict=True)
        return {"discriminator": obj.get("discriminator") or {}}
    source = f"checkpoint {path}"
    state = extract_generator_state(obj, model, source)
    check_state_dict(model, state, source)
    model.load_official_state_dict(state, strict=True)
    return {"discriminator": {}}


def load_discriminator(model, path):
    """The discriminator stored in our checkpoint ``path`` (a fresh module with its weights), or None."""
    blob = _read(path)
    sd = blob.get("discriminator") if isinstance(blob, dict) else None
    if not sd:
        return None
    d = model.make_discriminator()
    check_state_dict(model, sd, f"discriminator in {path}", expected=d.state_dict())
    d.load_state_dict(sd, strict=True)
    d.eval()
    return d


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "tsdf-bench"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
