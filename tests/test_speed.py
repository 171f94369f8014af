"""The speed switch (tsdf_bench.speed): it changes the code path, and rows agree either way."""
import math
import sys
from pathlib import Path

import pytest
import torch

from tsdf_bench import speed
from tsdf_bench.config import from_dict, load_config, to_toml
from tsdf_bench.harness import run_config
from tsdf_bench.plugins import Registry

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
FAKES, SPEED_FAKES = HERE / "harness_fakes", HERE / "speed_fakes"
# ON vs OFF differ only by float rounding (batched vs per-target / per-image convolutions): every
# float column must agree to this relative tolerance (absolute below 1e-6).
REL_TOL, ABS_TOL = 1e-4, 1e-6

CONFIG = """
[run]
name = "speed"
scale = "smoke"
seeds = [0]
device = "cpu"
rounds = 1

[data]
source = "synthetic"
image_size = 32
n_train_defense = 3
n_collect = 6
n_eval = 4
batch_size = 2

[models]
names = ["fake-batched-gan"]
train = false

[defenses]
names = ["fake-shift", "fake-perimage", "fake-pgd"]

[defenses.fake-pgd]
iterations = 3

[detectors]
names = ["fake-count-det"]
attacker = "fake-count-det"

[adaptations]
names = ["fake-retrain", "fake-purify"]
g_steps = 2

[metrics]
names = ["fake-metric"]
"""


@pytest.fixture(autouse=True)
def _no_switch_from_environment(monkeypatch):
    monkeypatch.delenv(speed.ENV, raising=False)


def registry():
    return Registry(plugins_dirs=[FAKES, SPEED_FAKES], entry_points=False)


def counters(reg):
    model = type(reg.create("model", "fake-batched-gan"))
    det = type(reg.create("detector", "fake-count-det"))
    for d in (model.calls, det.calls):
        for k in d:
            d[k] = 0
    return model.calls, det.calls


# -- the switch itself --------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("0", False), ("false", False), ("OFF", False), ("no", False),
                                            ("1", True), ("", True), ("yes", True)])
def test_env_variable(monkeypatch, value, expected):
    monkeypatch.setenv(speed.ENV, value)
    assert speed.env_enabled() is expected
    assert speed.resolve(True) is expected  # the variable turns a run off whatever its config says
    assert speed.resolve(False) is False  # and a config (or --no-optimize) turns it off whatever the variable


def test_the_switch_is_a_value_not_a_process_wide_state():
    """No global stack: speed.py keeps no mutable module state and offers no setter."""
    assert not hasattr(speed, "optimizations") and not hasattr(speed, "optimizations_enabled")
    assert not [name for name, value in vars(speed).items() if isinstance(value, (list, dict, set))
                and not name.startswith("__")]


def test_model_and_defense_attribute_defaults_to_the_environment_and_is_per_instance(monkeypatch):
    reg = registry()
    a, b = reg.create("model", "fake-batched-gan"), reg.create("model", "fake-batched-gan")
    pgd = reg.create("defense", "fake-pgd", eps=0.05, seed=1)
    assert a.optimize is True and pgd.optimize is True
    monkeypatch.setenv(speed.ENV, "0")
    assert a.optimize is False and pgd.optimize is False  # unset: the environment, read when used
    a.optimize = True  # the harness sets the run's resolved value, which already honours the variable
    assert a.optimize is True and b.optimize is False
    monkeypatch.delenv(speed.ENV)
    b.optimize = False
    assert a.optimize is True and b.optimize is False


def test_autocast_and_channels_last_follow_their_argument():
    conv = torch.nn.Conv2d(3, 4, 3)
    for enabled in (True, False):
        with speed.autocast("cpu", enabled):  # CPU stays fp32 either way
            assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
        assert speed.channels_last(conv, enabled) is conv and conv.weight.is_contiguous()
    if torch.cuda.is_available():  # on a GPU machine: bf16 and NHWC when on, neither when off
        conv = conv.cuda()
        with speed.autocast("cuda", False):
            assert conv(torch.randn(1, 3, 8, 8, device="cuda")).dtype == torch.float32
        assert speed.channels_last(conv, False).weight.is_contiguous()
        with speed.autocast("cuda", True):
            assert conv(torch.randn(1, 3, 8, 8, device="cuda")).dtype == torch.bfloat16
        assert speed.channels_last(conv, True).weight.is_contiguous(memory_format=torch.channels_last)


def test_two_runners_in_one_process_keep_their_own_switch(tmp_path, monkeypatch):
    """Each runner resolves its config once and hands the value to its models: two runs in one
    process (or one driver and its Ray workers) never see each other's switch."""
    from tsdf_bench.harness.runner import Runner
    from tsdf_bench.harness.store import ResultsStore

    reg = registry()
    model_calls, _ = counters(reg)
    path = tmp_path / "speed.toml"
    path.write_text(CONFIG)
    runners = {flag: Runner(load_config(path).replace(run__optimize=flag), reg,
                            ResultsStore(tmp_path / f"{flag}.sqlite"), str(flag), tmp_path / str(flag), progress=False)
               for flag in (True, False)}
    monkeypatch.setenv(speed.ENV, "0")  # decided once: a later change of the variable changes nothing
    assert runners[True].optimize is True and runners[False].optimize is False
    models = {flag: r.model("fake-batched-gan") for flag, r in runners.items()}
    assert models[True].optimize is True and models[False].optimize is False
    x, attrs = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for flag in (False, True, False):
        models[flag].generate_targets(x, attrs)
    assert model_calls["batched"] == 1 and model_calls["generate"] == 2 * 3


def test_optimize_is_a_config_key_outside_the_hash(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    on = load_config(path)
    off = load_config(path).replace(run__optimize=False)
    assert on.run.optimize is True and off.run.optimize is False
    assert on.hash == off.hash  # rows from both paths are comparable; --resume may switch it
    assert "optimize = false" in to_toml(off)
    with pytest.raises(Exception, match="optimize must be true or false"):
        from_dict({"run": {"optimize": "no"}, "models": {"names": ["a"]}, "defenses": {"names": ["b"]}})


# -- the code paths -----------------------------------------------------------------------------
def test_generate_targets_batches_when_on_and_loops_when_off():
    reg = registry()
    model_calls, _ = counters(reg)
    model = reg.create("model", "fake-batched-gan")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    attrs = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    on = model.generate_targets(x, attrs)
    assert model_calls["batched"] == 1 and model_calls["generate"] == 0
    model.optimize = False
    off = model.generate_targets(x, attrs)
    assert model_calls["batched"] == 1 and model_calls["generate"] == 3  # one call per target
    assert on.shape == off.shape == (4, 3, 3, 16, 16)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_pgd_attacks_the_batch_when_on_and_each_image_when_off():
    reg = registry()
    model_calls, _ = counters(reg)
    model = reg.create("model", "fake-batched-gan").eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    attrs = {model.name: torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])}
    results = {}
    for flag in (True, False):
        d = reg.create("defense", "fake-pgd", eps=0.05, seed=1, iterations=4).fit(x, attrs, [model], [])
        d.optimize = model.optimize = flag  # as the harness sets them from the run's switch
        model_calls["single_image"] = 0
        results[flag] = d.protect(x, attrs)
        results[flag, "single"] = model_calls["single_image"]
    assert results[True, "single"] == 0
    assert results[False, "single"] == 3 * (1 + 4) * 3  # per image: (clean + 4 steps) x 3 targets (looped)
    diff = (results[True] - results[False]).abs()
    assert float(diff.max()) <= 2 * 0.01 + 1e-6  # at most a rare sign flip of a near-zero gradient
    assert float((diff > 1e-6).float().mean()) < 0.01
    assert float((results[True] - x).abs().max()) <= 0.05 + 1e-6


# -- end to end: the runner with fake plugins ---------------------------------------------------
def run_rows(tmp_path, optimize: bool, reg):
    path = tmp_path / "speed.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG)
    cfg = load_config(path).replace(run__optimize=optimize)
    out = run_config(cfg, reg, output=tmp_path / "runs", progress=False, log=lambda m: None, figures=False)
    return out.rows


def rows_agree(a, b, ignored=("run_id", "timings", "traceback", "git_commit", "git_dirty", "optimize",
                              "perturbation_sha256", "checkpoint_sha256")):
    """Same cells, same strings/ints, every float within REL_TOL/ABS_TOL; returns the largest relative gap."""
    key = lambda r: (r["seed"], r["defense"], r["model"], r["adaptation"], r["round"])  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    worst = 0.0
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if k in ignored:
                continue
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert math.isclose(va, vb, rel_tol=REL_TOL, abs_tol=ABS_TOL), (key(ra), k, va, vb)
                worst = max(worst, abs(va - vb) / max(abs(va), abs(vb), 1e-12))
            else:
                assert va == vb, (key(ra), k, va, vb)
    return worst


def test_runner_shares_clean_outputs_when_on_and_recomputes_when_off(tmp_path):
    reg = registry()
    model_calls, det_calls = counters(reg)
    on = run_rows(tmp_path / "on", True, reg)
    on_model, on_det = dict(model_calls), dict(det_calls)
    counters(reg)
    off = run_rows(tmp_path / "off", False, reg)
    off_model, off_det = dict(model_calls), dict(det_calls)
    assert all(r["status"] == "ok" for r in on + off) and len(on) == len(off) == 3 * 3
    assert all(r["optimize"] is True for r in on) and all(r["optimize"] is False for r in off)
    # ON: batched targets only; OFF: the per-target loop only
    assert on_model["generate"] == 0 and on_model["batched"] > 0
    assert off_model["batched"] == 0 and off_model["generate"] > 0
    # OFF recomputes the clean forgeries per cell and runs PGD image by image
    assert off_model["images"] > on_model["images"]
    assert on_model["single_image"] == 0 and off_model["single_image"] > 0
    # OFF recomputes clean (and protected) detections and the attacker's crops per cell
    assert off_det["images"] > on_det["images"]
    rows_agree(on, off)


def test_env_variable_turns_a_run_off(tmp_path, monkeypatch):
    reg = registry()
    model_calls, _ = counters(reg)
    monkeypatch.setenv(speed.ENV, "0")
    rows = run_rows(tmp_path, True, reg)
    assert all(r["optimize"] is False for r in rows) and model_calls["batched"] == 0


def test_cli_no_optimize_flag(tmp_path, capsys):
    from tsdf_bench.cli import main

    path = tmp_path / "speed.toml"
    path.write_text(CONFIG)
    code = main(["--plugins-dir", str(FAKES), "--plugins-dir", str(SPEED_FAKES), "run", str(path), "--output",
                 str(tmp_path / "runs"), "--no-progress", "--no-figures", "--no-optimize"])
    assert code == 0, capsys.readouterr()
    from tsdf_bench.harness import ResultsStore

    rows = ResultsStore(tmp_path / "runs" / "results.sqlite").rows()
    assert rows and all(r["optimize"] is False for r in rows)
