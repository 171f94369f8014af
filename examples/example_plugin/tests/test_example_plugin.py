"""The example plugin's own tests: one call gives a third-party defense tsdf-bench's defense checks.

Run with ``python -m pytest examples/example_plugin/tests`` (tsdf-bench installed; the plugin
installed or not: the test imports the module by path).
"""
import importlib.util
from pathlib import Path

import pytest

from tsdf_bench.testing import DEFENSE_CHECKS, DefenseCase, check_defense, toy_world

_spec = importlib.util.spec_from_file_location(
    "tsdf_bench_example", Path(__file__).resolve().parents[1] / "tsdf_bench_example.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_checkerboard_meets_the_defense_contract(tmp_path):
    # budget, range, determinism, save/load; seeded=False: the checkerboard ignores its seed
    outcome = check_defense(example.CheckerboardDefense, options={"period": 2}, tmp_path=tmp_path)
    assert outcome["budget_and_range"] == "ok"


# Or one test per check, to see each property pass or fail on its own:
@pytest.mark.parametrize("check", list(DEFENSE_CHECKS))
def test_checkerboard_property(check, tmp_path):
    reason = DEFENSE_CHECKS[check](example.CheckerboardDefense, DefenseCase({"period": 4}), toy_world(), tmp_path)
    if reason:
        pytest.skip(reason)
