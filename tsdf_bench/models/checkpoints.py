"""Checkpoints: strict loading of official generator weights, and tsdf-bench's own model files.

Official files (paper scale) hold the generator's state_dict exactly as the official code saves
it: StarGAN/AttentionGAN ``200000-G.ckpt`` is a bare state_dict; AttGAN ``weights.199.pth`` is
``{"G": ..., "D": ..., "optim_G": ..., "optim_D": ...}`` (a bare G state_dict is accepted too).
A model declares how to read them with ``official_state_dict()`` /
``load_official_state_dict(sd)`` and, optionally, ``official_checkpoint_keys`` (the dict keys that
may hold the generator, default ``("G",)``; HiSD: ``("gen_test", "gen")``) and
``official_checkpoint_file`` (the official file's name, used in error messages).  Everything is
read with ``torch.load(weights_only=True)`` -- no pickled code runs.

Two save formats of the same weights are accepted for every generator (:func:`adapt_state_dict`):
keys saved from a ``nn.DataParallel`` wrapper (``module.`` prefix) are stripped, and BatchNorm /
InstanceNorm ``num_batches_tracked`` counters missing from files written by PyTorch < 0.4.1 are
filled with the model's own (torch's strict load accepts such files too).  Anything else that
does not match is an error naming the keys, the scale the file fits (when one does) and the fix.

A paper-scale model needs a checkpoint: :func:`model_options` (called by whoever creates a model
from a config) refuses a paper-scale model without ``checkpoint`` unless its table says
``random_init = true``; :func:`create_model` does that and the creation in one call.

Official discriminators (``[models.<name>] discriminator_checkpoint``: StarGAN/AttentionGAN
``200000-D.ckpt``, AttGAN's ``"D"`` entry of ``weights.199.pth``) load with
:func:`load_official_discriminator`; the retraining attacker then starts from them instead of a
fresh D (rows record which: :func:`discriminator_record`).

Our own files (``save_model``) hold ``{"format": FORMAT, "model", "scale", "config",
"state_dict", "discriminator"}``; a JSON manifest beside them records how they were made
(config, data hash, steps, seed, package versions, sha256 of the weights).
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..hashing import file_sha256
from ..paths import temp_path

FORMAT = "tsdf-bench-model/1"
DATAPARALLEL_PREFIX = "module."
BN_COUNTER = "num_batches_tracked"


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


def adapt_state_dict(state: dict, expected: dict) -> tuple[dict, list[str]]:
    """``state`` with the two accepted save-format differences undone, and a note per change.

    * ``module.`` prefixes (a ``nn.DataParallel``-wrapped model's ``state_dict()``) are stripped
      from every key that has one, when the model itself has no such keys;
    * ``num_batches_tracked`` buffers that the model has and the file lacks (PyTorch < 0.4.1
      saves) are filled with the model's current values, as torch's own loader does for them.
    """
    notes = []
    state = dict(state)
    prefixed = [k for k in state if k.startswith(DATAPARALLEL_PREFIX)]
    if prefixed and not any(k.startswith(DATAPARALLEL_PREFIX) for k in expected):
        state = {(k[len(DATAPARALLEL_PREFIX):] if k.startswith(DATAPARALLEL_PREFIX) else k): v
                 for k, v in state.items()}
        notes.append(f"stripped the DataParallel prefix 'module.' from {len(prefixed)} key(s)")
    counters = [k for k in expected if k.rsplit(".", 1)[-1] == BN_COUNTER and k not in state]
    if counters:
        for k in counters:
            state[k] = expected[k].detach().clone()
        notes.append(f"filled {len(counters)} missing {BN_COUNTER} buffer(s) (an old PyTorch save)")
    return state, notes


def _build_at_scale(model, scale):
    """``type(model)(scale=scale)`` on the meta device (no memory), or None when it cannot be built."""
    try:
        with torch.device("meta"):
            return type(model)(scale=scale)
    except Exception:  # noqa: BLE001 - a plugin that cannot be built on meta: no hint
        return None


def guess_scale(model, state: dict) -> str | None:
    """The scale of ``type(model)`` whose generator layout ``state`` fits exactly, if any."""
    from .base import SCALES

    for scale in SCALES:
        other = _build_at_scale(model, scale)
        if other is None:
            continue
        layouts = [other.state_dict()]
        if hasattr(other, "official_state_dict"):
            layouts.append(other.official_state_dict())
        for expected in layouts:
            if not any(compare_state_dicts(expected, adapt_state_dict(state, expected)[0])):
                return scale
    return None


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
    fits = guess_scale(model, state_dict)
    if fits is not None and fits != scale:
        fix = f"the file fits {name} at scale {fits!r}: build the model with scale={fits!r}"
    else:
        official = getattr(model, "official_checkpoint_file", "")
        fix = (f"official checkpoints load only at scale 'paper' with the matching model"
               + (f" ({name}: {official})" if official else "")
               + f"; check that the file belongs to {name!r} and the scale is right")
    raise CheckpointError(f"{source} does not fit {name} at scale {scale!r}: " + "; ".join(parts) +
                          f". Fix: {fix}")


def extract_generator_state(obj, model, source: str) -> dict:
    """The generator's state_dict inside a loaded official file (bare dict or ``{"G": ...}``),
    with the accepted format differences undone (:func:`adapt_state_dict`)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    expected = model.official_state_dict()
    keys = tuple(getattr(model, "official_checkpoint_keys", ("G",)))
    state = obj
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, dict) and not any(k in obj for k in expected):
            state = inner
            break
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        found = _few([str(k) for k in state]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{source} is not a generator checkpoint of {getattr(model, 'name', type(model).__name__)}: "
            f"expected a state_dict of tensors, bare or under key {' or '.join(repr(k) for k in keys)}; "
            f"found keys {found}")
    return adapt_state_dict(state, expected)[0]


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
    tmp = temp_path(path)
    torch.save(blob, tmp)
    os.replace(tmp, path)
    info = {"model": blob["model"], "scale": blob["scale"], "config": getattr(model, "config", {}),
            "weights": path.name, "sha256": file_sha256(path), "versions": package_versions()}
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
        state = adapt_state_dict(obj["state_dict"], expected)[0]
        check_state_dict(model, state, f"checkpoint {path}", expected=expected)
        model.load_state_dict(state, strict=True)
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


DISCRIMINATOR_KEYS = ("D", "dis")  # where official training files keep D (AttGAN: "D"; HiSD's dis_*.pt: "dis")


def load_official_discriminator(model, path):
    """The discriminator for ``model`` stored in ``path`` (``[models.<name>] discriminator_checkpoint``).

    Accepted: the official D files as the official code saves them -- StarGAN / AttentionGAN
    ``200000-D.ckpt`` (a bare state_dict), AttGAN ``weights.199.pth`` (its ``"D"`` entry; a bare D
    state_dict is accepted too) -- and our own model files (their ``discriminator``).  Read with
    ``torch.load(weights_only=True)``; the ``module.`` prefix of ``nn.DataParallel`` saves is
    stripped; a model whose D names keys differently from the official code maps them with
    ``discriminator_key_from_official(key)`` (AttGAN).  Loaded strictly: a mismatch names the keys
    (and says so when the file is the generator's).  Returns the module in eval mode."""
    source = f"discriminator_checkpoint {path}"
    name = getattr(model, "name", type(model).__name__)
    obj = _read(path)
    own = isinstance(obj, dict) and obj.get("format") == FORMAT
    if own:
        state = obj.get("discriminator") or {}
        if not state:
            raise CheckpointError(f"{source} is a tsdf-bench model file without a discriminator")
    elif isinstance(obj, dict):
        state = obj
        for key in tuple(getattr(model, "official_discriminator_keys", DISCRIMINATOR_KEYS)):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    else:
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        found = _few([str(k) for k in state]) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{source} is not a discriminator checkpoint of {name}: expected a state_dict of "
                              f"tensors, bare or under key 'D'; found keys {found}")
    d = model.make_discriminator()
    expected = d.state_dict()
    state = adapt_state_dict(state, expected)[0]
    rename = getattr(model, "discriminator_key_from_official", None)
    if rename is not None and not own:
        state = {rename(k): v for k, v in state.items()}
    missing, unexpected, mismatching = compare_state_dicts(expected, state)
    if missing or unexpected or mismatching:
        parts = [f"{len(keys)} {what}: {_few(keys, 3 if what.startswith('shape') else 5)}"
                 for what, keys in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                    ("shape mismatch(es)", mismatching)) if keys]
        official = getattr(model, "official_discriminator_file", "")
        expected_file = f" Expected: {official}." if official else ""
        try:
            generator = model.official_state_dict()
            is_generator = not any(compare_state_dicts(generator, adapt_state_dict(state, generator)[0]))
        except Exception:  # noqa: BLE001 - only a hint
            is_generator = False
        if is_generator:
            raise CheckpointError(f"{source} is the generator's file of {name}, not its discriminator: pass the "
                                  f"discriminator's file.{expected_file}")
        raise CheckpointError(f"{source} does not fit the discriminator of {name} at scale "
                              f"{getattr(model, 'scale', '?')!r}: " + "; ".join(parts) + "." + expected_file)
    d.load_state_dict(state, strict=True)
    return d.eval()


def discriminator_record(source: str, path=None) -> str:
    """What a row's ``discriminator`` column says: ``"official <path> <sha256>"``,
    ``"trained with the demo model"``, or ``"fresh, warm-up N D steps"`` (set by the retraining)."""
    if source == "official":
        p = Path(path).expanduser()
        return f"official {p.resolve()} {file_sha256(p)}"
    if source == "demo":
        return "trained with the demo model"
    return source




def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "tsdf-bench"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# -- creating a model from a config: no silent random weights at paper scale ---------------
def _plugin_class(registry, name):
    """The class behind the registered model ``name`` (a lazy factory is imported), or None."""
    if registry is None:
        return None
    try:
        factory = registry.get("model", name).factory
        target = getattr(factory, "target", None)
        if target:
            import importlib

            module, _, attr = target.partition(":")
            return getattr(importlib.import_module(module), attr)
        return factory if isinstance(factory, type) else None
    except Exception:  # noqa: BLE001 - only used for the hint in an error message
        return None


DISCRIMINATOR_OPTION = "discriminator_checkpoint"


def discriminator_path(options: dict) -> str | None:
    """``[models.<name>] discriminator_checkpoint`` (the official D the retraining attacker starts
    from; :func:`load_official_discriminator`), or None."""
    return options.get(DISCRIMINATOR_OPTION) or None


def model_options(name: str, scale: str, options: dict, registry=None) -> tuple[dict, bool]:
    """``(options for the plugin, random_init)`` from a ``[models.<name>]`` table.

    Pops ``random_init`` and ``discriminator_checkpoint`` (the plugins do not take them; read the
    latter with :func:`discriminator_path`; it needs ``checkpoint``).  At paper scale a model without
    ``checkpoint`` is a :class:`ConfigError` naming the model, the option and the fix, unless
    ``random_init = true`` (the randomly initialised architecture, on purpose; rows should then
    record ``random_init``).  ``random_init`` with a checkpoint, or at another scale (demo/smoke
    models are trained on first use; ``[models] train = false`` keeps them untrained), is an error.
    """
    options = dict(options)
    random_init = options.pop("random_init", False)
    discriminator = options.pop(DISCRIMINATOR_OPTION, None)
    table = f"[models.{name}]"
    if not isinstance(random_init, bool):
        raise ConfigError(f"{table} random_init must be true or false, got {random_init!r}")
    checkpoint = options.get("checkpoint")
    if discriminator is not None and (not isinstance(discriminator, (str, os.PathLike)) or not checkpoint):
        raise ConfigError(f"{table} {DISCRIMINATOR_OPTION} = {discriminator!r}: it must be a path, and it goes with "
                          "the generator's checkpoint (set checkpoint = \"...\" too)")
    if random_init and checkpoint:
        raise ConfigError(f"{table} has both checkpoint = {checkpoint!r} and random_init = true; keep one "
                          "(random_init = true runs the randomly initialised architecture)")
    if random_init and scale != "paper":
        raise ConfigError(f"{table} random_init = true is for scale 'paper' only (this run is {scale!r}: its models "
                          "are trained on first use, or used untrained with [models] train = false)")
    if scale == "paper" and not checkpoint and not random_init:
        official = getattr(_plugin_class(registry, name), "official_checkpoint_file", "")
        raise ConfigError(
            f"{table}: model {name!r} runs at scale 'paper' without a checkpoint, so it would run with random "
            f"weights. Fix: set {table} checkpoint = \"/path/to/{official or 'the official generator weights'}\", "
            f"or random_init = true to run the randomly initialised architecture on purpose (rows record "
            f"random_init = true)")
    return options, random_init


def checkpoint_record(options: dict, random_init: bool = False) -> dict:
    """What a row records about a model's weights: ``{"random_init", "checkpoint_path",
    "checkpoint_sha256"}`` (path and sha256 of the *file*; empty without a checkpoint)."""
    path = options.get("checkpoint")
    if not path:
        return {"random_init": bool(random_init), "checkpoint_path": "", "checkpoint_sha256": ""}
    path = Path(path).expanduser()
    return {"random_init": bool(random_init), "checkpoint_path": str(path.resolve()),
            "checkpoint_sha256": file_sha256(path) if path.is_file() else ""}


def create_model(registry, name: str, scale: str, options: dict, **extra):
    """:func:`model_options` then ``registry.create("model", name, scale=scale, **options, **extra)``.

    The model gets ``random_init`` and ``checkpoint_record`` (see :func:`checkpoint_record`)
    attributes, for the rows.
    """
    options, random_init = model_options(name, scale, options, registry)
    model = registry.create("model", name, scale=scale, **options, **extra)
    model.random_init = random_init
    model.checkpoint_record = checkpoint_record(options, random_init)
    return model
