"""``tsdf-bench run --resume``: a run SIGKILLed midway and resumed gives the rows of an uninterrupted run."""
import signal
import sys
from pathlib import Path

import pytest
import torch

from tsdf_bench.harness import ResultsStore

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402
from test_runner import CONFIG  # noqa: E402

FAKES = Path(__file__).parent / "harness_fakes"
IGNORED = ("run_id", "timings", "traceback", "git_commit", "git_dirty")  # the lead may commit mid-test


def comparable(rows):
    return sorted(({k: v for k, v in r.items() if k not in IGNORED} for r in rows),
                  key=lambda r: (r["seed"], r["defense"], r["model"], r["adaptation"], r["round"]))


def cli(*args, env=None):
    """In a subprocess (needed where the process gets killed; costs a torch import, ~3-10 s)."""
    return run_cli("--plugins-dir", str(FAKES), "run", *args, "--no-progress",
                   env={"OMP_NUM_THREADS": "1", "TSDF_BENCH_STRICT_PLUGINS": "0", **(env or {})})


def cli_here(capsys, *args):
    """In this process: ``(exit code, stdout, stderr)``."""
    from tsdf_bench.cli import main

    code = main(["--plugins-dir", str(FAKES), "run", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_rows(tmp_path, capsys):
    config = tmp_path / "fake.toml"
    config.write_text(CONFIG)
    # the reference: one uninterrupted run
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "ref"))
    assert code == 1, err  # 1: the fake-broken defense's cells failed (on purpose)
    ref_rows = ResultsStore(tmp_path / "ref" / "results.sqlite").rows()
    assert len(ref_rows) == 48
    # the same run, SIGKILLed by the fake metric while it measures its 8th cell
    out = tmp_path / "out"
    killed = cli(str(config), "--output", str(out),
                 env={"TSDF_FAKE_KILL_AFTER": "7", "TSDF_FAKE_COUNTER": str(tmp_path / "counter")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = ResultsStore(out / "results.sqlite")
    (run,) = store.runs()
    assert run["status"] == "running"  # a kill leaves no chance to mark it; the cells are intact
    partial = store.rows(run["run_id"])
    assert len([r for r in partial if r["status"] == "ok"]) == 7
    # a different config is refused with a clear message
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.replace("g_steps = 3", "g_steps = 4"))
    code, _, err = cli_here(capsys, str(other), "--output", str(out), "--resume", "latest")
    assert code == 2 and "config hash" in err and "differ" in err
    # resume (the stored config is reused when none is given)
    code, stdout, err = cli_here(capsys, "--output", str(out), "--resume", "latest")
    assert code == 1, err
    assert "finished earlier (resumed)" in stdout
    rows = store.rows(run["run_id"])
    got, want = comparable(rows), comparable(ref_rows)
    diffs = [(w["defense"], w["model"], w["adaptation"], w["round"], w["seed"], k, g.get(k), w.get(k))
             for g, w in zip(got, want) for k in set(g) | set(w) if g.get(k) != w.get(k)]
    assert len(got) == len(want) and not diffs, diffs[:10]
    assert store.run(run["run_id"])["status"] == "finished-with-errors"
    assert (out / run["run_id"] / "results.csv").is_file()


def test_resume_errors_are_clear(tmp_path, capsys):
    code, _, err = cli_here(capsys, "--output", str(tmp_path / "none"), "--resume", "latest")
    assert code == 2 and "no results database" in err
    config = tmp_path / "fake.toml"
    config.write_text(CONFIG)
    ResultsStore(tmp_path / "runs" / "results.sqlite")
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "runs"), "--resume", "nope")
    assert code == 2 and "no run 'nope'" in err


def test_a_changed_checkpoint_is_refitted_not_reused(tmp_path):
    """The protected-image cache is keyed by the models' weights: after a model changes in place
    (a checkpoint fixed, then --resume), the defense is fitted again."""
    from test_runner import fake_registry, make_config
    from tsdf_bench.harness import ResultsStore
    from tsdf_bench.harness.runner import Runner

    cfg = make_config(tmp_path, CONFIG.replace('names = ["fake-gan", "fake-gan8"]', 'names = ["fake-gan"]'))
    store = ResultsStore(tmp_path / "results.sqlite")
    first = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False)
    before = first.protect(0, "fake-shift")
    assert len(list((tmp_path / "run" / "cache").glob("protected-fake-shift-seed0-*.pt"))) == 1
    again = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False)
    assert again.protect(0, "fake-shift").info["fit_key"] == before.info["fit_key"]  # same weights: reused
    changed = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False)
    model = changed.model("fake-gan")
    with torch.no_grad():
        model.conv.weight.add_(0.5)
    from tsdf_bench.hashing import state_sha256

    changed._model_hash["fake-gan"] = state_sha256(model.state_dict())
    after = changed.protect(0, "fake-shift")
    assert after.info["fit_key"] != before.info["fit_key"]
    assert len(list((tmp_path / "run" / "cache").glob("protected-fake-shift-seed0-*.pt"))) == 2


def test_cli_overrides_seeds_publish_and_workers(tmp_path, capsys):
    """A replication on new seeds from the same config: --seeds changes the run (and its hash),
    --publish redirects the tables, --workers only how it runs; --seeds cannot change a resumed run."""
    config = tmp_path / "fake.toml"
    config.write_text(CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift"]')
                      .replace("rounds = 2", "rounds = 1"))
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "a"), "--seeds", "3,4",
                            "--publish", str(tmp_path / "pub"), "--workers", "2", "--no-figures")
    assert code == 0, err
    (run,) = ResultsStore(tmp_path / "a" / "results.sqlite").runs()
    rows = ResultsStore(tmp_path / "a" / "results.sqlite").rows(run["run_id"])
    assert {r["seed"] for r in rows} == {3, 4} and {r["torch_threads"] for r in rows} == {1}
    assert (tmp_path / "pub" / "leaderboard.md").is_file()
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "b"), "--no-figures")
    base = ResultsStore(tmp_path / "b" / "results.sqlite").rows()
    assert {r["seed"] for r in base} == {0, 1} and base[0]["config_hash"] != rows[0]["config_hash"]
    code, _, err = cli_here(capsys, "--resume", run["run_id"], "--output", str(tmp_path / "a"), "--seeds", "5")
    assert code != 0 and "--seeds cannot change a run being resumed" in err
    code, _, err = cli_here(capsys, str(config), "--output", str(tmp_path / "c"), "--seeds", "x")
    assert code != 0 and "--seeds 'x'" in err
