"""examples/poison_capacity.py: the study behind the TSDF docstring's universal-poison figures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("poison_capacity", ROOT / "examples" / "poison_capacity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_poison_fitted_on_one_face_hides_it_from_retinaface():
    rows = load().main(["--detector", "retinaface", "--loss", "output", "--faces", "1", "--steps", "60",
                        "--held-out", "4"])
    (row,) = rows
    assert row["faces"] == 1 and row["loss_last"] < row["loss_first"]
    assert row["recall_fit"] == 0.0  # per-image poisoning works; the study asks how far it generalises
    assert 0.0 <= row["recall_held_out"] <= 1.0


def test_the_refine_loss_is_refused_for_other_detectors():
    with pytest.raises(SystemExit):
        load().main(["--detector", "retinaface", "--loss", "refine"])
