"""benchmarks/cuda_check.py, the one-run GPU check, kept working on CPU at smoke sizes.

On a GPU machine it measures issue 6's GPU figures; here it must at least run every section,
write a complete report and compare like with like (on CPU, bf16 is off, so every batched variant's
gradient equals the fp32 one up to float reordering).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda_check():
    spec = importlib.util.spec_from_file_location("cuda_check", ROOT / "benchmarks" / "cuda_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_writes_every_section(cuda_check, tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "cache"))
    data = cuda_check.main(["--out", str(tmp_path / "out"), "--quick"])
    on_disk = json.loads((tmp_path / "out" / "cuda_check.json").read_text())
    assert set(on_disk) == set(data) == {"env", "tests", "attack_step", "fit", "grid"}
    assert not [name for name, section in data.items() if "error" in section]
    assert data["tests"]["returncode"] == 0 and "skipped" in data["tests"]["summary"]  # no GPU here
    for name in cuda_check.MODELS:
        step = data["attack_step"][name]
        assert {label for label, *_ in cuda_check.VARIANTS} <= set(step)
        for label, *_ in cuda_check.VARIANTS:
            assert step[label]["ms"] > 0 and step[label]["flops"] > 0
            assert step[label]["grad_rel_diff"] < 1e-4  # fp32 on CPU: the same gradient every way
    assert data["fit"]["fit_s"] > 0 and 0 < data["fit"]["mask_fraction"] <= 1
    grid = data["grid"]
    assert grid["cells"] == 4 and grid["speedup"] > 0 and grid["max_rel_diff_on_off"] == 0
    assert grid["model_training"]["stargan"]["train_device"] == "cpu"


def test_unknown_section_is_refused_by_name(cuda_check, tmp_path):
    with pytest.raises(SystemExit):
        cuda_check.main(["--out", str(tmp_path), "--sections", "env,grdi"])
