"""The local worker pool (tsdf_bench.harness.pool): the same rows as one process, controls shared
through the run's cache, a worker that dies turns only its group's cells into error rows."""
import torch

from tsdf_bench.config import from_dict
from tsdf_bench.harness import run_config
from tsdf_bench.harness.pool import by_defense
from tsdf_bench.plugins import Registry

from test_runner import CONFIG, FAKES, make_config

VOLATILE = {"run_id", "timings", "written", "torch_threads", "git_dirty", "traceback"}


def _run(tmp_path, text, registry, **kw):
    return run_config(make_config(tmp_path, text), registry, output=tmp_path / "runs", progress=False,
                      log=lambda m: None, figures=False, **kw)


def _by_key(rows):
    return {(r["defense"], r["model"], r["adaptation"], r["round"], r["seed"]):
            {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def test_two_workers_write_the_rows_one_process_writes(tmp_path, monkeypatch):
    registry = Registry(plugins_dirs=[FAKES], entry_points=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs
    try:
        one = _run(tmp_path / "one", CONFIG, registry)
    finally:
        torch.set_num_threads(threads)
    two = _run(tmp_path / "two", CONFIG.replace('rounds = 2', 'rounds = 2\nworkers = 2'), registry)
    assert two.summary.total == one.summary.total == 48 and two.summary.ok == one.summary.ok == 32
    a, b = _by_key(one.rows), _by_key(two.rows)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert {r["torch_threads"] for r in two.rows if r["status"] == "ok"} == {1}
    assert one.rows[0]["config_hash"] == two.rows[0]["config_hash"]  # workers is not hashed
    # the clean-retraining controls (rounds 1 and 2, per model and seed) were saved for the workers
    saved = sorted(p.name for p in (two.summary.run_dir / "cache" / "controls").glob("*.pt"))
    assert len(saved) == 2 * 2 * 2 and all("fake-retrain" in n for n in saved)


CRASH = '''
import os
from tsdf_bench.defenses.base import Defense
from tsdf_bench.plugins import hookimpl
from tsdf_bench.records import DefenseEntry


class Crash(Defense):
    name = "fake-crash"

    def fit(self, images, attrs, models, detectors):
        os._exit(3)  # the worker process dies, as one killed for memory would


@hookimpl
def register_defenses(register):
    register(DefenseEntry("fake-crash", "Kills its worker process.", Crash))
'''


def test_a_dead_worker_fails_its_cells_and_keeps_the_finished_ones(tmp_path):
    crash_dir = tmp_path / "crash_plugins"
    crash_dir.mkdir()
    (crash_dir / "crash.py").write_text(CRASH)
    registry = Registry(plugins_dirs=[FAKES, crash_dir], entry_points=False)
    text = (CONFIG.replace('rounds = 2', 'rounds = 2\nworkers = 2').replace('seeds = [0, 1]', 'seeds = [0]')
            .replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift", "fake-crash"]'))
    out = _run(tmp_path, text, registry)
    crashed = [r for r in out.rows if r["defense"] == "fake-crash"]
    assert crashed and all(r["status"] == "error" and "worker process failed" in r["error"] for r in crashed)
    # the other group either finished before the pool broke or failed the same way: never half-written
    other = [r for r in out.rows if r["defense"] == "fake-shift"]
    assert len(other) == 8 and all(r["status"] == "ok" or "worker process failed" in r["error"] for r in other)


def test_groups_go_out_defense_by_defense_so_the_cheap_last_defense_ends_the_run():
    cfg = from_dict({"run": {"seeds": [0, 1]}, "models": {"names": ["stargan"]},
                     "defenses": {"names": ["tsdf", "none"]}})
    work = [(seed, d, []) for seed in (0, 1) for d in ("tsdf", "none")]
    assert [(s, d) for s, d, _ in by_defense(cfg, work)] == [(0, "tsdf"), (1, "tsdf"), (0, "none"), (1, "none")]


def test_the_parent_forgets_its_models_and_returns_the_memory(monkeypatch):
    import types

    from tsdf_bench.harness import pool

    calls = []
    monkeypatch.setattr(pool, "release_freed_memory", lambda: calls.append(1))
    runner = types.SimpleNamespace(_models={"stargan": object()}, _discriminators={"stargan": object()})
    pool._drop_models(runner)
    assert runner._models == {} and runner._discriminators == {} and calls == [1]


def test_workers_record_the_commit_the_run_started_at(tmp_path, monkeypatch):
    """A worker's rows carry the parent's git state, taken when the run started: a commit made
    while the run goes on (a worker reading git when it writes its first row) must not appear."""
    import tsdf_bench.harness.runner as runner_module

    monkeypatch.setattr(runner_module, "git_state", lambda: {"git_commit": "commit-at-start", "git_dirty": False})
    registry = Registry(plugins_dirs=[FAKES], entry_points=False)
    text = CONFIG.replace('rounds = 2', 'rounds = 1\nworkers = 2').replace('seeds = [0, 1]', 'seeds = [0]')
    rows = _run(tmp_path, text, registry).rows
    assert rows and {(r["git_commit"], r["git_dirty"]) for r in rows} == {("commit-at-start", False)}
