"""``tsdf-bench leaderboard``: render the results database as a leaderboard.

Reads rows with :class:`tsdf_bench.harness.store.ResultsStore` and renders them with
:func:`tsdf_bench.leaderboard.render` (markdown, csv, latex or json) to stdout or ``--output``;
``--out-dir`` writes all four files.  ``--results`` takes the SQLite file or a folder holding
``results.sqlite``; a run's own folder (``<output>/<run_id>/``) also works: the database of its
parent is read, restricted to that run unless ``--run-id`` says otherwise.  A published
``leaderboard.json`` (its rows) works too: re-rendering a published run with the current tables.
``--check-against PUBLISHED`` says instead whether the rows reproduce a published leaderboard
(:mod:`tsdf_bench.leaderboard.reproduce`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import TsdfBenchError
from ..leaderboard import FORMATS, render, write_leaderboards

HELP = "render results as a leaderboard (markdown, csv, latex or json)"
DB_NAME = "results.sqlite"
DEFAULT_DB = Path("runs") / DB_NAME


def add_arguments(parser):
    parser.add_argument("--results", default=str(DEFAULT_DB), metavar="PATH",
                        help=f"results database, run folder or a published leaderboard.json (default {DEFAULT_DB})")
    parser.add_argument("--format", default="markdown", choices=FORMATS, help="output format (default markdown)")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="only this run ('latest' for the newest); default: every run, newest row per cell")
    parser.add_argument("--output", default=None, metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument("--out-dir", default=None, metavar="DIR",
                        help="also write leaderboard.md/.csv/.tex/.json into DIR")
    parser.add_argument("--check-against", default=None, metavar="PUBLISHED",
                        help="instead of rendering, say whether these rows reproduce a published "
                             "leaderboard.json (bit for bit, or each rate inside its published interval); "
                             "exit status 1 if not (tsdf_bench.leaderboard.reproduce)")
    parser.add_argument("--rounds", default=None, metavar="K[,K...]",
                        help="with --check-against: compare only these rounds (e.g. 0)")


def resolve_results(path) -> tuple[Path, str | None]:
    """``(database path, implied run id)`` for a ``--results`` argument."""
    path = Path(path)
    if path.is_file():
        return path, None
    if path.is_dir():
        if (path / DB_NAME).is_file():
            return path / DB_NAME, None
        if (path.parent / DB_NAME).is_file():
            return path.parent / DB_NAME, path.name
        raise TsdfBenchError(f"--results {path}: no {DB_NAME} in this folder or its parent; pass the database "
                             "file, or the output folder of a `tsdf-bench run`")
    raise TsdfBenchError(f"--results {path}: no such file or folder; run `tsdf-bench run CONFIG` first, "
                         "or pass --results with the output folder or results.sqlite of a run")


def load_rows(path, run_id: str | None = None) -> list[dict]:
    """Rows of the results database at ``path`` (file or folder) or of a published
    ``leaderboard.json``, optionally of one run."""
    from ..harness.store import ResultsStore

    if Path(path).suffix == ".json" and Path(path).is_file():
        return _json_rows(Path(path), run_id)
    db, implied = resolve_results(path)
    store = ResultsStore(db)
    run_id = run_id or implied
    if run_id == "latest":
        run_id = store.latest_run()
    elif run_id is not None:
        run_id = store.resolve(run_id)
    rows = store.rows(run_id=run_id)
    if not rows:
        which = f" for run {run_id!r}" if run_id else ""
        raise TsdfBenchError(f"{db} holds no results{which}; run `tsdf-bench run CONFIG` first")
    return rows


def _json_rows(path: Path, run_id: str | None) -> list[dict]:
    import json

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TsdfBenchError(f"--results {path}: not JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "defense" in r for r in rows):
        raise TsdfBenchError(f"--results {path}: not a leaderboard.json (a list of result rows)")
    if run_id not in (None, "latest"):
        rows = [r for r in rows if str(r.get("run_id", "")).startswith(run_id)]
    if not rows:
        raise TsdfBenchError(f"--results {path}: no rows" + (f" of run {run_id!r}" if run_id else ""))
    return rows


def leaderboard_text(rows: list[dict], fmt: str = "markdown", header: dict | None = None, registry=None) -> str:
    """The command's output for ``rows`` (no database needed; used by tests)."""
    return render(rows, fmt, header, registry=registry)


def check_against(rows: list[dict], published, rounds: str | None = None) -> int:
    """``--check-against``: print whether ``rows`` reproduce the published rows; 0 if they do."""
    from ..leaderboard.reproduce import compare

    if Path(published).suffix != ".json":
        raise TsdfBenchError(f"--check-against {published}: pass a published leaderboard.json "
                             "(e.g. leaderboards/demo/leaderboard.json)")
    try:
        wanted = None if rounds is None else [int(k) for k in str(rounds).split(",")]
    except ValueError:
        raise TsdfBenchError(f"--rounds {rounds!r}: give round numbers separated by commas, e.g. 0 or 0,1") from None
    report = compare(load_rows(published), rows, wanted)
    sys.stdout.write(f"{published} vs this run\n" + report.text())
    return 0 if report.within_intervals else 1


def main(args, registry):
    rows = load_rows(args.results, args.run_id)
    if args.check_against:
        return check_against(rows, args.check_against, args.rounds)
    text = leaderboard_text(rows, args.format, registry=registry)
    if args.out_dir:
        for path in write_leaderboards(rows, args.out_dir, registry=registry).values():
            print(f"wrote {path}", file=sys.stderr)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
