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
environment variable ``TSDF_BENCH_OPTIMIZE=0``; any one of them suffices.  Inside a process the
:func:`optimizations` context manager sets the switch for a block (the runner uses it).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

ENV = "TSDF_BENCH_OPTIMIZE"
_OFF_VALUES = ("0", "false", "no", "off")
_override: list[bool] = []  # a stack: the innermost optimizations(...) block wins


def env_enabled() -> bool:
    """False when ``TSDF_BENCH_OPTIMIZE`` is one of 0/false/no/off (case-insensitive); True otherwise."""
    return os.environ.get(ENV, "1").strip().lower() not in _OFF_VALUES


def optimizations_enabled() -> bool:
    """The switch now: the innermost :func:`optimizations` block, else the environment."""
    return _override[-1] if _override else env_enabled()


@contextlib.contextmanager
def optimizations(enabled: bool) -> Iterator[bool]:
    """Set the switch for the block (restored on exit, exceptions included).

    The environment variable still wins when it says off: ``optimizations(True)`` under
    ``TSDF_BENCH_OPTIMIZE=0`` stays off, so one variable can turn a whole run's speed-ups off.
    """
    value = bool(enabled) and env_enabled()
    _override.append(value)
    try:
        yield value
    finally:
        _override.pop()


def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type


def autocast(device):
    """bf16 autocast on CUDA when optimisations are on; a no-op context otherwise (CPU stays fp32:
    CPU bf16 is slower than fp32 on most CPUs and would change results for no gain)."""
    if optimizations_enabled() and _device_type(device) == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(module):
    """``module`` with channels_last weights when it lives on CUDA and optimisations are on
    (cuDNN's NHWC kernels use tensor cores better); returned unchanged otherwise."""
    if not optimizations_enabled() or not isinstance(module, torch.nn.Module):
        return module
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cuda":
        return module
    return module.to(memory_format=torch.channels_last)
