"""The results store: one SQLite file per output folder, one row per benchmark cell.

A *cell* is one (defense, model, adaptation, round, seed) of a run.  Each cell is written in its
own transaction (WAL journal), so a run killed at any moment leaves every finished cell intact and
nothing half-written; ``--resume`` then skips the finished ones (:meth:`ResultsStore.done`).

Tables::

    runs  (run_id, config json, config_hash, started, finished, status)
    cells (run_id, defense, model, adaptation, round, seed, status, error,
           metrics json, provenance json, timings json, written)

:meth:`ResultsStore.rows` flattens a cell into one dict: the cell keys, ``status``, ``error``,
every metric (``l2_mask``, ``sr_mask`` ...) and every provenance field (``config_hash``,
``versions``, ``device``, ``checkpoint_sha256``, ``perturbation_sha256``, ``git_commit``, ``scale``,
``data`` ...) plus ``timings`` (a dict of seconds).
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ..errors import TsdfBenchError
from ..schema import CELL_KEYS

_PROTECTED = frozenset(CELL_KEYS) | {"run_id", "status", "error", "timings"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    defense TEXT NOT NULL,
    model TEXT NOT NULL,
    adaptation TEXT NOT NULL,
    round INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    provenance TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    written REAL NOT NULL,
    PRIMARY KEY (run_id, defense, model, adaptation, round, seed)
);
"""


class StoreError(TsdfBenchError):
    """The results database is unreadable, or a run id is unknown."""


def _json(value) -> str:
    def default(obj):  # numpy / torch scalars
        if hasattr(obj, "item"):
            return obj.item()
        if hasattr(obj, "tolist"):
            return obj.tolist()
        return str(obj)

    return json.dumps(value, sort_keys=True, default=default, allow_nan=True)


class ResultsStore:
    """``ResultsStore(path)``: open (or create) a results database."""

    def __init__(self, db_path):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a tsdf-bench results database ({exc}); "
                             "move it away or pick another --output folder") from exc

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    # -- runs ---------------------------------------------------------------------------
    def start_run(self, run_id: str, config: dict, config_hash: str) -> None:
        with closing(self._connect()) as con, con:
            con.execute("INSERT INTO runs (run_id, config, config_hash, started, status) VALUES (?,?,?,?,?)",
                        (run_id, _json(config), config_hash, time.time(), "running"))

    def set_status(self, run_id: str, status: str) -> None:
        """Mark a run ``running``, ``finished``, ``interrupted`` or ``failed``."""
        finished = None if status == "running" else time.time()
        with closing(self._connect()) as con, con:
            con.execute("UPDATE runs SET status=?, finished=? WHERE run_id=?", (status, finished, run_id))

    def forget_run(self, run_id: str) -> bool:
        """Delete a run that stored no cell (a failed start); returns whether it was deleted."""
        with closing(self._connect()) as con, con:
            if con.execute("SELECT 1 FROM cells WHERE run_id=? LIMIT 1", (run_id,)).fetchone():
                return False
            con.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
        return True

    def run(self, run_id: str) -> dict:
        with closing(self._connect()) as con:
            row = con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            known = ", ".join(r["run_id"] for r in self.runs()[-5:]) or "(none)"
            raise StoreError(f"no run {run_id!r} in {self.path}; recent runs: {known}")
        out = dict(row)
        out["config"] = json.loads(out["config"])
        return out

    def runs(self) -> list[dict]:
        """Every run, oldest first."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT run_id, config_hash, started, finished, status FROM runs "
                               "ORDER BY started, run_id").fetchall()
        return [dict(r) for r in rows]

    def latest_run(self) -> str | None:
        runs = self.runs()
        return runs[-1]["run_id"] if runs else None

    def resolve(self, run_id: str) -> str:
        """``"latest"`` -> the newest run id; any other id must exist."""
        if run_id == "latest":
            latest = self.latest_run()
            if latest is None:
                raise StoreError(f"--resume latest: {self.path} holds no run yet; start one without --resume")
            return latest
        return self.run(run_id)["run_id"]

    # -- cells --------------------------------------------------------------------------
    def write_cell(self, run_id: str, key: dict, *, status: str, metrics: dict | None = None,
                   provenance: dict | None = None, timings: dict | None = None, error: str | None = None) -> None:
        """Write (or overwrite) one cell in a single transaction."""
        missing = [k for k in CELL_KEYS if k not in key]
        if missing:
            raise ValueError(f"cell key lacks {missing}")
        with closing(self._connect()) as con, con:
            con.execute(
                "INSERT OR REPLACE INTO cells (run_id, defense, model, adaptation, round, seed, status, error, "
                "metrics, provenance, timings, written) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, key["defense"], key["model"], key["adaptation"], int(key["round"]), int(key["seed"]),
                 status, error, _json(metrics or {}), _json(provenance or {}), _json(timings or {}), time.time()))

    def done(self, run_id: str) -> set[tuple]:
        """Keys ``(defense, model, adaptation, round, seed)`` of the cells that finished with status ok."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT defense, model, adaptation, round, seed FROM cells "
                               "WHERE run_id=? AND status='ok'", (run_id,)).fetchall()
        return {tuple(r) for r in rows}

    def rows(self, run_id: str | None = None) -> list[dict]:
        """Flattened cells (of one run, or of all runs), in a stable order."""
        query = "SELECT * FROM cells"
        args: tuple = ()
        if run_id is not None:
            query += " WHERE run_id=?"
            args = (run_id,)
        query += " ORDER BY run_id, seed, defense, model, adaptation, round"
        with closing(self._connect()) as con:
            cells = con.execute(query, args).fetchall()
        out = []
        for cell in cells:
            row = {"run_id": cell["run_id"], **{k: cell[k] for k in CELL_KEYS},
                   "status": cell["status"], "error": cell["error"]}
            provenance = json.loads(cell["provenance"])
            metrics = json.loads(cell["metrics"])
            for key, value in provenance.items():
                row.setdefault(key, value)
            for key, value in metrics.items():
                if key not in _PROTECTED:  # metrics win over provenance, never over the cell's own keys
                    row[key] = value
            row["timings"] = json.loads(cell["timings"])
            out.append(row)
        return out
