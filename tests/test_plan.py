"""Planning: the metrics a config runs by default, and option checks of every plugin kind."""
import pytest

from tsdf_bench.config import from_dict
from tsdf_bench.errors import ConfigError
from tsdf_bench.harness.plan import Cell, check_options, default_metrics, plan_cells
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


def _swept(defenses=None):
    jpeg = {"sweep": {"quality": [70, 90]}}
    if defenses is not None:
        jpeg["defenses"] = defenses
    return from_dict({"run": {"seeds": [0], "rounds": 1}, "models": {"names": ["stargan"]},
                      "defenses": {"names": ["tsdf", "cmua", "none"]},
                      "adaptations": {"names": ["retrain", "jpeg"], "jpeg": jpeg}})


def test_an_adaptation_runs_only_on_the_defenses_its_table_names():
    retrains = {"retrain": True, "jpeg-quality70": False, "jpeg-quality90": False}
    everything = plan_cells(_swept(), retrains)
    some = plan_cells(_swept(["tsdf", "cmua"]), retrains)
    assert len(everything) == 3 * (2 + 2)  # per defense: retrain rounds 0 and 1, two jpeg variants
    assert set(everything) - set(some) == {Cell("none", "stargan", a, 0, 0) for a in ("jpeg-quality70", "jpeg-quality90")}
    assert [c for c in some if c.defense == "none"] == [Cell("none", "stargan", "retrain", k, 0) for k in (0, 1)]
    assert "defenses" not in _swept(["tsdf"]).adaptations.options_for("jpeg-quality70")  # not the plugin's


def test_an_adaptations_defense_list_names_defenses_of_the_config():
    with pytest.raises(ConfigError, match=r"\[adaptations.jpeg-quality70\] defenses \['tsfd'\].*Did you mean 'tsdf'"):
        _swept(["tsfd"])
