"""The plugin system: discovery, isolation of broken plugins, duplicates, unknown names."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tsdf_bench import PluginError, Registry, UnknownNameError
from tsdf_bench.plugins import PluginWarning
from tsdf_bench.records import KINDS

from conftest import ROOT, run_cli

EXAMPLE = ROOT / "examples" / "example_plugin"

GOOD = """
from tsdf_bench import DefenseEntry, hookimpl
from tsdf_bench.defenses import Defense

class Zero(Defense):
    def perturbation_for(self, images, attrs=None):
        return images * 0

@hookimpl
def register_defenses(register):
    register(DefenseEntry("{name}", "A test defense.", Zero))
"""


def write(tmp_path, name, text):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return tmp_path


def dir_registry(tmp_path, strict=False):
    return Registry(plugins_dirs=[tmp_path], strict=strict, entry_points=False)


def test_plugins_dir_defense_is_registered_and_usable(tmp_path):
    reg = dir_registry(write(tmp_path, "mine", GOOD.format(name="zero-test")))
    entry = reg.get("defense", "zero-test")
    assert entry.distribution == "(plugins-dir)" and entry.source.endswith("mine.py")
    import torch

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(entry.create(eps=0.05).protect(x), x)


@pytest.mark.parametrize("body, needle", [
    ("import no_such_module_xyz\n", "failed to import: ModuleNotFoundError"),
    ("from tsdf_bench import hookimpl\n@hookimpl\ndef register_defenses(register):\n    raise RuntimeError('boom')\n",
     "raised in register_defenses: RuntimeError: boom"),
    ("from tsdf_bench import hookimpl\n@hookimpl\ndef register_defenses(register):\n    register('not a record')\n",
     "expected a DefenseEntry"),
    ("from tsdf_bench import hookimpl, ModelEntry\n@hookimpl\ndef register_defenses(register):\n"
     "    register(ModelEntry('m', 'wrong kind', dict))\n", "expected a DefenseEntry"),
    ("from tsdf_bench import hookimpl, DefenseEntry\n@hookimpl\ndef register_defenses(register):\n"
     "    register(DefenseEntry('d', '', dict))\n", "one-line description"),
    ("from tsdf_bench import hookimpl\n@hookimpl\ndef register_defense(register):\n    pass\n", "unknown hook"),
])
def test_broken_plugin_warns_names_itself_and_others_keep_working(tmp_path, body, needle):
    write(tmp_path, "broken", body)
    write(tmp_path, "good", GOOD.format(name="still-here"))
    with pytest.warns(PluginWarning) as caught:
        reg = dir_registry(tmp_path)
    message = " ".join(str(w.message) for w in caught)
    assert "broken.py" in message and needle in message
    assert reg.names("defense") == ["still-here"]
    with pytest.raises(PluginError, match="broken.py"):
        dir_registry(tmp_path, strict=True)


def test_strict_mode_from_environment(tmp_path, monkeypatch):
    write(tmp_path, "broken", "raise ImportError('nope')\n")
    monkeypatch.setenv("TSDF_BENCH_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="nope"):
        Registry(plugins_dirs=[tmp_path], entry_points=False)


def test_duplicate_names_are_refused_naming_both_sources(tmp_path):
    write(tmp_path, "first", GOOD.format(name="twin"))
    write(tmp_path, "second", GOOD.format(name="twin"))
    with pytest.raises(PluginError) as err:
        dir_registry(tmp_path)
    assert "twin" in str(err.value) and "first.py" in str(err.value) and "second.py" in str(err.value)


def test_unknown_name_lists_valid_names_and_closest(tmp_path):
    write(tmp_path, "a", GOOD.format(name="cmua-like"))
    write(tmp_path, "b", GOOD.format(name="found-like"))
    reg = dir_registry(tmp_path)
    with pytest.raises(UnknownNameError) as err:
        reg.get("defense", "cmua-lke")
    text = str(err.value)
    assert "Did you mean 'cmua-like'?" in text and "found-like" in text
    with pytest.raises(UnknownNameError, match="plugin kind"):
        reg.get("defenses", "cmua-like")


def test_cli_plugins_dir_before_or_after_command(tmp_path):
    write(tmp_path, "mine", GOOD.format(name="cli-zero"))
    for args in (["--plugins-dir", str(tmp_path), "plugins", "--json"], ["plugins", "--json", "--plugins-dir", str(tmp_path)]):
        out = run_cli(*args)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert {"kind": "defense", "name": "cli-zero"}.items() <= next(r for r in rows if r["name"] == "cli-zero").items()
        assert all(set(r) >= {"kind", "name", "description", "distribution", "version"} for r in rows)
        assert all(r["kind"] in KINDS for r in rows)


def test_cli_broken_plugin_keeps_json_clean_and_warns_once_on_stderr(tmp_path):
    write(tmp_path, "broken", "import no_such_module_xyz\n")
    write(tmp_path, "mine", GOOD.format(name="cli-ok"))
    lenient = {"TSDF_BENCH_STRICT_PLUGINS": "0"}  # CI runs strict; this test is about the lenient default
    out = run_cli("--plugins-dir", str(tmp_path), "plugins", "--json", env=lenient)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)  # the whole of stdout is the JSON array
    assert any(r["name"] == "cli-ok" for r in rows)
    lines = [line for line in out.stderr.splitlines() if "broken.py" in line]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("tsdf-bench: warning: plugin file ") and "ModuleNotFoundError" in lines[0]
    # not Python's warnings format ("file:line: PluginWarning: ..." followed by the source line)
    assert "PluginWarning" not in out.stderr and "warnings.warn" not in out.stderr
    table = run_cli("--plugins-dir", str(tmp_path), "plugins", env=lenient)
    assert "cli-ok" in table.stdout and "broken.py" not in table.stdout
    assert table.stderr.count("broken.py") == 1


def test_example_plugin_through_plugins_dir():
    reg = Registry(plugins_dirs=[EXAMPLE], entry_points=False)
    assert "example-checkerboard" in reg.names("defense") and "example-energy" in reg.names("metric")
    import torch

    x = torch.zeros(1, 3, 4, 4)
    y = reg.create("defense", "example-checkerboard", eps=0.05).protect(x)
    assert y.abs().max().item() == pytest.approx(0.05) and (y > 0).any() and (y < 0).any()


def test_a_third_partys_defense_metric_and_model_run_and_the_metric_gets_its_column(tmp_path):
    """One file (examples/example_plugin/tsdf_bench_example.py) adds a defense, a metric and a
    model; a run uses all three beside the built-ins and the metric's column is in the table."""
    from tsdf_bench.config import from_dict
    from tsdf_bench.harness import run_config

    reg = Registry(plugins_dirs=[EXAMPLE])
    cfg = from_dict({"run": {"scale": "demo", "rounds": 0, "device": "cpu"},
                     "data": {"source": "synthetic", "image_size": 32, "n_train_defense": 2, "n_collect": 2,
                              "n_eval": 3, "batch_size": 3},
                     "models": {"names": ["example-tint"], "train": False},
                     "defenses": {"names": ["example-checkerboard", "none"]},
                     "detectors": {"names": [], "attacker": "haar"}, "adaptations": {"names": ["none"]},
                     "metrics": {"names": ["forgery", "example-energy"]}})
    out = run_config(cfg, reg, output=tmp_path / "runs", progress=False, log=lambda m: None, figures=False)
    assert [r["status"] for r in out.rows] == ["ok", "ok"]
    energy = {r["defense"]: r["energy"] for r in out.rows}
    assert energy["example-checkerboard"] == pytest.approx(0.05 ** 2, rel=0.05) and energy["none"] == 0  # (clipped at +-1)
    markdown = (out.summary.run_dir / "leaderboard" / "leaderboard.md").read_text()
    assert "energy" in markdown


@pytest.mark.slow
def test_example_plugin_as_installed_distribution(tmp_path):
    """Build and install the example as a real distribution; discovery is by entry point only."""
    target = tmp_path / "site"
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)], check=True, timeout=300)
    env = {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    out = run_cli("plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    mine = [r for r in rows if r["distribution"] == "tsdf-bench-example-plugin"]
    assert {(r["kind"], r["name"]) for r in mine} == {("defense", "example-checkerboard"), ("metric", "example-energy"),
                                                      ("model", "example-tint")}
    assert all(r["version"] == "0.1.0" for r in mine)
    # without the distribution on the path the example is not there
    plain = json.loads(run_cli("plugins", "--json").stdout)
    assert not any(r["name"] == "example-checkerboard" for r in plain)
