"""One switch for every speed optimisation, and the small helpers that honour it.

With optimisations **on** (the default):

- the runner computes clean forgeries, clean detections and the attacker's data preparation
  once and shares them across defenses, rounds and cells;
- :meth:`DeepfakeModel.generate_targets` calls the model's (possibly batched) ``generate_all``,
  so all T targets go through the generator in one forward;
- per-image attacks (PGD) attack a whole batch at once;
- on CUDA only: bf16 autocast (:func:`autocast`) and channels_last weights (:func:`channels_last`).

With them **off** the code takes the papers' straightforward path: clean outputs recomputed per
cell, one generator call per target, one PGD run per image, fp32 and the default memory format.
Both paths compute the same quantities; on CPU they differ only by float rounding (see
tests/test_speed.py for the tolerance), so rows from both are comparable and the switch is not
part of a config's hash.

Turn them off with ``[run] optimize = false``, ``tsdf-bench run --no-optimize`` or the
environment variable ``TSDF_BENCH_OPTIMIZE=0``; any one of them suffices (:func:`resolve`).

The switch is a value, not a process-wide state: a run resolves it once (``Runner.optimize``,
recorded in every row as ``optimize``) and passes it on explicitly: to :func:`autocast` and
:func:`channels_last` as their ``enabled`` argument, and to plugins as the documented attribute
``optimize`` of every model (:class:`~tsdf_bench.models.base.DeepfakeModel`) and defense
(:class:`~tsdf_bench.defenses.base.Defense`) the run creates.  That attribute defaults to
:func:`env_enabled`, so a model or defense used outside a run follows the environment variable.
"""
from __future__ import annotations

import contextlib
import os

import torch

ENV = "TSDF_BENCH_OPTIMIZE"
_OFF_VALUES = ("0", "false", "no", "off")


def env_enabled() -> bool:
    """False when ``TSDF_BENCH_OPTIMIZE`` is one of 0/false/no/off (case-insensitive); True otherwise."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF_VALUES


def resolve(configured: bool = True) -> bool:
    """The switch of a run: ``configured`` (``[run] optimize``, False under ``--no-optimize``)
    unless the environment says off: ``TSDF_BENCH_OPTIMIZE=0`` turns a whole run's speed-ups off,
    whatever its config says."""
    return bool(configured) and env_enabled()


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def autocast(device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context otherwise (CPU stays fp32: CPU
    bf16 is slower than fp32 on most CPUs and would change results for no gain)."""
    if enabled and _device_type(device) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(module, enabled: bool):
    """``module`` with channels_last weights when it lives on CUDA and ``enabled`` (cuDNN's NHWC
    kernels use tensor cores better); returned unchanged otherwise."""
    if not enabled or not isinstance(module, torch.nn.Module):
        return module
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cuda":
        return module
    return module.to(memory_format=torch.channels_last)


class Switch:
    """The ``optimize`` attribute of models and defenses (a descriptor): the value the harness set
    on the instance (the run's :func:`resolve`), else :func:`env_enabled` at the time it is read.

    ``class DeepfakeModel: optimize = speed.Switch()``; ``model.optimize = False`` sets it for that
    instance only.
    """

    def __set_name__(self, owner, name: str) -> None:
        self._key = f"_{name}_value"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self._key)
        return env_enabled() if value is None else value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self._key] = bool(value)
