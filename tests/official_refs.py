"""Helpers for the official-checkpoint acceptance tests (not a test module).

The reference material lives in ``../shared/official-layouts`` beside the repository root; the
tests skip (saying so) only when that folder is absent.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

LAYOUTS = Path(__file__).resolve().parents[1].parent / "shared" / "official-layouts"
ATOL = 1e-4
SUM_RTOL = 1e-6  # sums over ~10^5-10^6 float32 values: compared relatively (plus ATOL*100 absolute)


def require_layouts():
    if not LAYOUTS.is_dir():
        pytest.skip(f"official layouts folder {LAYOUTS} is absent (it ships beside the repository as ../shared)")
    return LAYOUTS


def official_state_dict(model_name):
    """make_state_dict(<model>_layout.json), importing make_weights.py by path."""
    root = require_layouts()
    spec = importlib.util.spec_from_file_location("tsdf_test_make_weights", root / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_state_dict(str(root / f"{model_name}_layout.json"))


def reference(model_name):
    root = require_layouts()
    return np.load(root / f"{model_name}_reference.npz"), json.loads((root / "references.json").read_text())[model_name]


def reference_input():
    return torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32))


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
