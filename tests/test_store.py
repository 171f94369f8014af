"""ResultsStore: round trip, flattening, done-set, latest run, atomic cells."""
import sqlite3

import pytest

from tsdf_bench.harness.store import ResultsStore, StoreError

KEY = {"defense": "tsdf", "model": "stargan", "adaptation": "retrain", "round": 1, "seed": 0}


def test_round_trip_flattens_metrics_and_provenance(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    store.start_run("r1", {"run": {"name": "x"}}, "h" * 64)
    store.write_cell("r1", KEY, status="ok", metrics={"l2_mask": 0.12, "sr_mask": 0.9, "seed": 99},
                     provenance={"config_hash": "h" * 64, "versions": {"torch": "2"}, "device": "cpu",
                                 "checkpoint_sha256": "c", "perturbation_sha256": "p", "git_commit": None,
                                 "scale": "demo", "data": "embedded", "sr_mask": -1},
                     timings={"fit_s": 1.5})
    (row,) = store.rows("r1")
    assert row["run_id"] == "r1" and row["status"] == "ok" and row["error"] is None
    assert {k: row[k] for k in KEY} == KEY
    assert row["l2_mask"] == 0.12 and row["sr_mask"] == 0.9  # a metric wins over a provenance field
    assert row["seed"] == 0  # ... never over the cell's own keys
    assert row["versions"] == {"torch": "2"} and row["scale"] == "demo" and row["timings"] == {"fit_s": 1.5}
    assert store.run("r1")["config"] == {"run": {"name": "x"}}


def test_done_counts_only_ok_cells_and_overwrite(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    store.start_run("r1", {}, "h")
    store.write_cell("r1", KEY, status="error", error="boom")
    assert store.done("r1") == set()
    assert store.rows("r1")[0]["error"] == "boom"
    store.write_cell("r1", KEY, status="ok", metrics={"l2_mask": 1.0})
    assert store.done("r1") == {("tsdf", "stargan", "retrain", 1, 0)}
    assert len(store.rows("r1")) == 1 and store.rows("r1")[0]["status"] == "ok"


def test_latest_and_resolve(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    with pytest.raises(StoreError, match="holds no run"):
        store.resolve("latest")
    store.start_run("a", {}, "h1")
    store.start_run("b", {}, "h2")
    assert store.latest_run() == "b" and store.resolve("latest") == "b" and store.resolve("a") == "a"
    with pytest.raises(StoreError, match="no run 'zzz'.*a, b"):
        store.resolve("zzz")
    store.set_status("a", "interrupted")
    assert {r["run_id"]: r["status"] for r in store.runs()} == {"a": "interrupted", "b": "running"}
    store.start_run("c", {}, "h3")
    store.write_cell("c", KEY, status="ok")
    assert [r["run_id"] for r in store.rows()] == ["c"] and store.rows("a") == []


def test_wal_journal_and_reopen(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultsStore(path).start_run("a", {}, "h")
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert ResultsStore(path).runs()[0]["run_id"] == "a"


def test_not_a_database(tmp_path):
    bad = tmp_path / "r.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a tsdf-bench results database"):
        ResultsStore(bad)
