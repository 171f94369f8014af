"""Planning: the metrics a config runs by default, and option checks of every plugin kind."""
import pytest

from tsdf_bench.config import from_dict
from tsdf_bench.errors import ConfigError
from tsdf_bench.harness.plan import check_options, default_metrics
from tsdf_bench.plugins import get_registry


def test_default_metrics_leave_out_the_ones_that_need_weights_or_time():
    names = default_metrics(get_registry())
    assert {"forgery", "invisibility", "detection", "crop_yield"} <= set(names)
    assert "lpips" not in names and "identity" not in names  # run only when a config names them


@pytest.mark.parametrize("section,table", [("models", "hisd"), ("detectors", "mtcnn")])
def test_a_misspelt_model_or_detector_option_fails_before_any_work(section, table):
    data = {"models": {"names": ["hisd"]}, "defenses": {"names": ["none"]},
            "detectors": {"names": ["mtcnn"], "attacker": "mtcnn"}}
    data[section][table] = {"chekpoint": "x.pt"}
    with pytest.raises(ConfigError, match=rf"\[{section}.{table}\].*no option 'chekpoint'"):
        check_options(from_dict(data), get_registry())
