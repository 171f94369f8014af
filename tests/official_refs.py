"""Helpers for the official-checkpoint acceptance tests (not a test module).

The reference material is data in the repository, ``tests/data/official/`` (see its README):
for each generator, ``<model>_layout.json`` (the official state_dict's keys, shapes and dtypes,
plus the weight rule), ``<model>_reference.npz`` and ``references.json`` (what the official code
computed from those weights).  Nothing here reads outside the repository, so a plain clone runs
every reference test.
"""
from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

OFFICIAL = Path(__file__).resolve().parent / "data" / "official"
MODELS = ("stargan", "attentiongan", "attgan", "hisd")
ATOL = 1e-4
SUM_RTOL = 1e-6  # sums over ~10^5-10^6 float32 values: compared relatively (plus ATOL*100 absolute)


def official_dir():
    """The folder of the official layouts and reference outputs (always present: it is tracked)."""
    if not OFFICIAL.is_dir():  # a broken checkout, not an optional dependency: fail, never skip
        raise FileNotFoundError(f"{OFFICIAL} is missing; it is part of the repository")
    return OFFICIAL


@lru_cache(maxsize=None)
def layout(model_name):
    """The parsed ``<model>_layout.json``: config, state_dict entries, norm_weight_keys, num_params."""
    return json.loads((official_dir() / f"{model_name}_layout.json").read_text())


def _weight(key, shape, dtype, norm_weight_keys):
    """One tensor of the layout's deterministic weight rule (its ``weight_rule`` field).

    Integer tensors are zeros; running variances and the affine weights of normalisation layers
    are ones; running means and every bias are zeros; any other tensor of rank >= 2 is
    0.02 * standard normal float32 from a numpy generator seeded with the CRC-32 of its key, so a
    tensor does not depend on the order of the entries.
    """
    shape = tuple(int(s) for s in shape)
    if dtype in ("int64", "long", "int32"):
        return torch.zeros(shape, dtype=torch.int32 if dtype == "int32" else torch.int64)
    if dtype not in ("float32", "float"):
        raise ValueError(f"{key}: unexpected dtype {dtype!r} in the layout")
    if key.endswith("running_var") or (not key.endswith("running_mean") and key in norm_weight_keys):
        return torch.ones(shape)
    if key.endswith("running_mean") or key.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) < 2:
        raise ValueError(f"{key}: the weight rule has no clause for shape {list(shape)}")
    seed = zlib.crc32(key.encode("utf-8"))
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(0.02)
    return torch.from_numpy(np.ascontiguousarray(values))


def official_state_dict(model_name):
    """The deterministic state_dict the references were computed from, in the layout's key order."""
    spec = layout(model_name)
    norm_keys = frozenset(spec.get("norm_weight_keys", ()))
    return OrderedDict((key, _weight(key, shape, dtype, norm_keys)) for key, shape, dtype in spec["state_dict"])


@lru_cache(maxsize=None)
def _references():
    return json.loads((official_dir() / "references.json").read_text())


def reference(model_name):
    """(the model's reference npz, its entry of references.json)."""
    return np.load(official_dir() / f"{model_name}_reference.npz"), _references()[model_name]


def reference_input():
    return torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32))


def hisd_reference_image():
    """HiSD's style reference: ``default_rng(1).uniform(-1, 1, (1, 3, 256, 256))`` in float32."""
    return torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32))


def assert_matches(model_name, key, tensor):
    """Compare ``tensor`` with the stored reference ``key``: shape, sampled values, sum, abs_sum."""
    npz, refs = reference(model_name)
    ref = refs["tensors"][key]
    t = tensor.detach().double().cpu().numpy()
    assert list(t.shape) == ref["shape"], f"{key}: shape {t.shape} != {ref['shape']}"
    if key + "__idx" in npz:
        got = t.reshape(-1)[npz[key + "__idx"]]
        err = np.abs(got - npz[key + "__val"]).max()
        assert err <= ATOL, f"{key}: sampled values differ by up to {err:.3g}"
    else:
        err = np.abs(t - npz[key]).max()
        assert err <= ATOL, f"{key}: values differ by up to {err:.3g}"
    for stat, value in (("sum", t.sum()), ("abs_sum", np.abs(t).sum())):
        if stat in ref:
            assert abs(value - ref[stat]) <= SUM_RTOL * abs(ref[stat]) + 100 * ATOL, \
                f"{key}: {stat} {value} != {ref[stat]}"
