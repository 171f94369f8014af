"""Demo checkpoints shipped inside the package: found, verified and written here.

A model plugin ships trained demo weights by naming a folder in its ``demo_weights_dir`` class
attribute (ours: ``tsdf_bench_plugins/models/weights``, installed as package data) that holds
``<name>-seed<seed>.pt`` and its manifest ``<name>-seed<seed>.pt.json``.  The file is our own
checkpoint format (:func:`tsdf_bench.models.checkpoints.save_model`):

* the **generator in float32**, exactly as trained, so a run on the shipped model computes the same
  round-0 numbers as a run on a model trained here;
* the **discriminator in float16** (it is only the retraining attacker's starting point), which
  keeps every file under :data:`MAX_BYTES`; :func:`export` measures how far the float16 D's
  outputs move from its float32 self on the held-out photos and refuses to write a file whose
  change exceeds :data:`D_TOLERANCE` (the manifest records the measured value).

The manifest holds what :func:`tsdf_bench.models.zoo.get_model` compares (``config``,
``data_hash``, ``steps``, ``seed``, ``recipe``), the file's ``sha256``, the sha256 of the
float32 weights as trained (``g_state_sha256``, ``d_state_sha256``: what ``tsdf-bench train
--retrain`` compares its own result to), the CPU, torch threads and package versions it was
trained with, and ``reproducible`` (what is bit-for-bit reproducible where).

:func:`get_model` uses a shipped checkpoint when a request is the shipped one (the embedded
training faces, the plugin's demo recipe, that seed) and the model's config does not say
``shipped = false``.  It refuses one, never uses it (:class:`~tsdf_bench.errors.CheckpointError`):
when the file's sha256 differs from its manifest (corrupt or edited) or when it was made for
another data hash than the embedded faces hash to here.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..hashing import file_sha256, state_sha256
from . import checkpoints

MAX_BYTES = 5_000_000  # the limit per shipped file
D_DTYPE = torch.float16
# the largest change of the float16 discriminator's outputs, relative to the largest float32 output
D_TOLERANCE = 1e-3
# the request fields a shipped checkpoint must match to be used (data_hash is checked apart: a
# mismatch there is a refusal, not "another recipe")
MATCH_KEYS = ("config", "steps", "seed", "recipe")
REPRODUCIBLE = ("tsdf-bench train --scale demo --retrain reproduces the float32 weights "
                "(g_state_sha256, d_state_sha256) bit for bit on the same CPU type with the same torch "
                "version and torch_threads; on another CPU type or thread count the weights differ in the "
                "last bits and drift apart over training (the results are then comparable within the rows' "
                "intervals, not equal)")


def _fix(name: str) -> str:
    return (f"reinstall tsdf-bench (pip install --force-reinstall .), or train the model yourself with "
            f"`tsdf-bench train --models {name} --retrain` and set `[models.{name}] shipped = false`")


def shipped_path(model, seed: int = 0) -> Path | None:
    """The shipped checkpoint of ``model`` for ``seed``, or None when its plugin ships none."""
    folder = getattr(model, "demo_weights_dir", None)
    if not folder:
        return None
    path = Path(folder) / f"{model.name}-seed{seed}.pt"
    return path if path.is_file() else None


def applies(manifest: dict, expect: dict) -> bool:
    """Whether a shipped manifest is the checkpoint for request ``expect`` (data hash aside)."""
    from .zoo import _jsonish

    return all(manifest.get(k) == _jsonish(expect.get(k)) for k in MATCH_KEYS)


def verify(path: Path, name: str, data_hash: str) -> dict:
    """The manifest of shipped checkpoint ``path``, after checking the file's sha256 and data hash."""
    manifest = checkpoints.read_manifest(path)
    if not manifest:
        raise CheckpointError(f"shipped checkpoint {path} has no manifest {checkpoints.manifest_path(path).name}; "
                              + _fix(name))
    found = file_sha256(path)
    if manifest.get("sha256") != found:
        raise CheckpointError(f"shipped checkpoint {path} fails its sha256 check (file {found[:12]}, manifest "
                              f"{str(manifest.get('sha256'))[:12]}): the file is corrupt or was changed; " + _fix(name))
    if manifest.get("data_hash") != data_hash:
        raise CheckpointError(f"shipped checkpoint {path} was trained on data hash {manifest.get('data_hash')}, "
                              f"but the embedded training faces hash to {data_hash} here (another version of "
                              "the embedded faces or of the image libraries): it is not used; " + _fix(name))
    return manifest


@torch.no_grad()
def d_change(discriminator, probe: torch.Tensor, model=None) -> float:
    """Largest change of ``discriminator``'s outputs on ``probe`` when its weights are rounded to
    :data:`D_DTYPE`, relative to its largest float32 output.  The outputs are ``D(probe)``, or
    ``model.discriminator_outputs(D, probe)`` for a model whose D takes more than an image (HiSD)."""
    import copy

    def flat(d):
        d.eval()
        with torch.no_grad():
            out = model.discriminator_outputs(d, probe) if hasattr(model, "discriminator_outputs") else d(probe)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return torch.cat([o.float().flatten() for o in out if torch.is_tensor(o)])

    rounded = copy.deepcopy(discriminator).to(D_DTYPE).float()
    reference = flat(discriminator)
    return float((flat(rounded) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def export(model, discriminator, manifest: dict, out_dir, probe: torch.Tensor, curve: list | None = None) -> dict:
    """Write ``model`` (float32) and ``discriminator`` (float16) as a shipped checkpoint into
    ``out_dir``, with ``manifest`` (the cache manifest it was trained under) extended as the
    module docstring says; ``probe`` is a batch of held-out photos at the model's size; ``curve``
    (:mod:`tsdf_bench.models.curve` points, when it was trained in increments) goes into the
    manifest with the total training time."""
    import copy

    change = d_change(discriminator, probe, model)
    if change > D_TOLERANCE:
        raise CheckpointError(f"{model.name}: the float16 discriminator's outputs move by {change:.2e} of their "
                              f"range (> {D_TOLERANCE:g}); not shipped")
    out = Path(out_dir) / f"{model.name}-seed{manifest['seed']}.pt"
    extra = {k: v for k, v in manifest.items() if k not in ("sha256", "weights", "versions")}
    extra.update(g_state_sha256=state_sha256(model.state_dict()), d_state_sha256=state_sha256(discriminator.state_dict()),
                 d_dtype=str(D_DTYPE).replace("torch.", ""), d_change=change, d_tolerance=D_TOLERANCE,
                 cpu=manifest.get("cpu") or cpu_name(), reproducible=REPRODUCIBLE,
                 trained_with_versions=manifest.get("versions"))
    if curve:
        extra.update(curve=curve, train_seconds=round(sum(p.get("train_s") or 0 for p in curve), 1),
                     train_seconds_note="the sum of the curve's increments (each resumed the same run)")
    info = checkpoints.save_model(model, out, copy.deepcopy(discriminator).to(D_DTYPE), manifest=extra)
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        checkpoints.manifest_path(out).unlink()
        raise CheckpointError(f"{model.name}: the shipped file would be {size / 1e6:.1f} MB (> {MAX_BYTES / 1e6:g} MB)")
    return info


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reproduction_report(trained_manifest: dict, shipped_manifest: dict, model, discriminator) -> str:
    """One line: whether weights trained here equal the shipped float32 weights bit for bit."""
    same = (state_sha256(model.state_dict()) == shipped_manifest.get("g_state_sha256")
            and discriminator is not None
            and state_sha256(discriminator.state_dict()) == shipped_manifest.get("d_state_sha256"))
    if same:
        return "reproduces the shipped weights bit for bit"
    here = f"{cpu_name()}, {trained_manifest.get('torch_threads')} thread(s), torch {json.dumps(trained_manifest.get('versions', {}).get('torch'))}"
    there = (f"{shipped_manifest.get('cpu')}, {shipped_manifest.get('torch_threads')} thread(s), torch "
             f"{json.dumps((shipped_manifest.get('trained_with_versions') or {}).get('torch'))}")
    return f"differs from the shipped weights (trained here on {here}; shipped on {there})"
