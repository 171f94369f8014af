"""``tsdf-bench run --executor ray``: a local Ray instance on CPU gives the local executor's rows."""
import sys
from pathlib import Path

import pytest

from tsdf_bench.harness import ResultsStore

sys.path.insert(0, str(Path(__file__).parent))
from test_run_resume import cli_here, comparable  # noqa: E402
from test_runner import CONFIG, run  # noqa: E402

pytest.importorskip("ray", reason="the Ray executor is tested where Ray is installed (it is in the [test] extra)")


def assert_same_rows(got_rows, want_rows):
    got, want = comparable(got_rows), comparable(want_rows)
    diffs = [(w["defense"], w["model"], w["adaptation"], w["round"], w["seed"], k, g.get(k), w.get(k))
             for g, w in zip(got, want) for k in set(g) | set(w) if g.get(k) != w.get(k)]
    assert len(got) == len(want) and not diffs, diffs[:10]


@pytest.mark.slow
def test_ray_executor_gives_the_local_rows(tmp_path, capsys):
    reference = run(tmp_path / "local").rows  # the local executor (in this process)
    assert len(reference) == 48
    config = tmp_path / "fake.toml"
    config.write_text(CONFIG)
    # the CLI path: starts a local Ray instance (2 CPUs here), one task per cell, stops it again
    code, stdout, err = cli_here(capsys, str(config), "--output", str(tmp_path / "ray"), "--executor", "ray")
    assert code == 1, err  # 1: the fake-broken defense fails on purpose, in both executors
    store = ResultsStore(tmp_path / "ray" / "results.sqlite")
    rows = store.rows()
    assert_same_rows(rows, reference)
    assert {r["status"] for r in rows if r["defense"] == "fake-broken"} == {"error"}
    assert all("fit/protect: RuntimeError: the fake defense failed on purpose" in r["error"]
               for r in rows if r["defense"] == "fake-broken")
    assert "32/48 cells ok" in stdout, stdout
    import ray

    assert not ray.is_initialized()  # the instance it started is stopped


@pytest.mark.slow
def test_ray_executor_resumes_an_interrupted_local_run(tmp_path, capsys, monkeypatch):
    reference = run(tmp_path / "ref").rows
    # interrupted while measuring its 6th cell: round 0 of a chain is stored, rounds 1-2 are not,
    # so the Ray tasks must retrain round 1 again without re-measuring it
    monkeypatch.setenv("TSDF_FAKE_INTERRUPT_AFTER", "5")
    monkeypatch.setenv("TSDF_FAKE_COUNTER", str(tmp_path / "counter"))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part")
    monkeypatch.delenv("TSDF_FAKE_INTERRUPT_AFTER")
    out = tmp_path / "part" / "runs"
    code, stdout, err = cli_here(capsys, "--output", str(out), "--resume", "latest", "--executor", "ray")
    assert code == 1, err
    assert "5 finished earlier (resumed)" in stdout
    assert_same_rows(ResultsStore(out / "results.sqlite").rows(), reference)


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    config = tmp_path / "fake.toml"
    config.write_text(CONFIG)
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "runs"), "--executor", "ray")
    assert code == 2 and "pip install" in err and "ray" in err


@pytest.mark.slow
def test_ray_executor_connects_to_an_existing_cluster(tmp_path, capsys):
    """``--ray-address``: a cluster started beforehand (``ray start --head``) is used, not stopped."""
    import subprocess

    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", "--port", "0", "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120)
    try:
        reference = run(tmp_path / "local").rows
        config = tmp_path / "fake.toml"
        config.write_text(CONFIG)
        code, stdout, err = cli_here(capsys, str(config), "--output", str(tmp_path / "ray"), "--executor", "ray",
                                     "--ray-address", "auto")
        assert code == 1, err
        assert_same_rows(ResultsStore(tmp_path / "ray" / "results.sqlite").rows(), reference)
        import ray
        from ray._private import state

        assert not ray.is_initialized()
        ray.init(address="auto", log_to_driver=False)  # the cluster is still up after the run ...
        try:
            assert len(state.jobs()) == 2  # ... and ran the run's driver (plus this check's)
        finally:
            ray.shutdown()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
