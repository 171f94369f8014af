"""Start or resume a run, then write its outputs (rows, leaderboards, figures).

Layout of an output folder (``[run] output``, default ``runs/``)::

    runs/results.sqlite            every run's cells (ResultsStore)
    runs/<run_id>/config.toml      the resolved config (and config.json)
    runs/<run_id>/results.csv      one line per cell (results.json: the same, nested)
    runs/<run_id>/leaderboard/     tables from tsdf_bench.leaderboard.write_leaderboards
    runs/<run_id>/figures/         visual_<model>.png, detections.png, persistence.png
    runs/<run_id>/perturbations/   fitted universal perturbations with provenance
    runs/<run_id>/samples/         a few images per cell for the figures
    runs/<run_id>/cache/           protected images for --resume (removed when every cell is ok)
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, check_names, from_dict, to_toml, _unresolve
from ..errors import ConfigError
from .plan import check_options
from .runner import Runner, RunSummary
from .store import ResultsStore

DB_NAME = "results.sqlite"


@dataclass
class RunOutputs:
    summary: RunSummary
    rows: list[dict]
    files: dict[str, list[Path]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def new_run_id(cfg: RunConfig, store: ResultsStore) -> str:
    """``<YYYYmmdd-HHMMSS>-<name>-<config hash[:8]>`` (a suffix keeps it unique)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.run.name).strip("-") or "run"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{cfg.hash[:8]}"
    known = {r["run_id"] for r in store.runs()}
    run_id, i = base, 2
    while run_id in known:
        run_id, i = f"{base}-{i}", i + 1
    return run_id


def stored_config(store: ResultsStore, run_id: str) -> RunConfig:
    """The config a run was started with (for ``--resume`` without a config file)."""
    return from_dict(_unresolve(store.run(run_id)["config"]), source=f"run {run_id}")


def open_run(cfg: RunConfig | None, output, resume: str | None) -> tuple[RunConfig, ResultsStore, str, Path]:
    """Create a new run, or reopen ``resume`` (a run id or ``"latest"``) after checking its config hash."""
    if cfg is None and resume is None:
        raise ConfigError("no config given: pass a TOML run config or --resume RUN_ID")
    output = Path(output if output is not None else cfg.run.output)
    if resume is not None and not (output / DB_NAME).is_file():
        raise ConfigError(f"--resume {resume}: no results database at {output / DB_NAME}; "
                          "pass the --output folder the run wrote to")
    store = ResultsStore(output / DB_NAME)
    if resume is not None:
        run_id = store.resolve(resume)
        stored = store.run(run_id)
        if cfg is None:
            cfg = stored_config(store, run_id)
        elif stored["config_hash"] != cfg.hash:
            raise ConfigError(
                f"--resume {resume}: run {run_id} was started with config hash {stored['config_hash'][:12]}, but "
                f"{cfg.source} hashes to {cfg.hash[:12]}: the configs differ, so finished cells would not be "
                f"comparable. Resume with the same config (saved as {output / run_id / 'config.toml'}), "
                "or omit the config to reuse the stored one, or start a new run without --resume.")
        store.set_status(run_id, "running")
    else:
        run_id = new_run_id(cfg, store)
        store.start_run(run_id, cfg.to_dict(), cfg.hash)
    run_dir = output / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    (run_dir / "config.json").write_text(json.dumps({"config_hash": cfg.hash, "source": cfg.source,
                                                     "config": cfg.to_dict()}, indent=2), encoding="utf-8")
    return cfg, store, run_id, run_dir


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message)  # does not break an active progress bar


EXECUTORS = ("local", "ray")


def run_config(cfg: RunConfig | None, registry, *, output=None, resume: str | None = None, progress: bool = True,
               log=_log, figures: bool = True, executor: str = "local", ray_options: dict | None = None,
               preflight_first: bool = True) -> RunOutputs:
    """Run (or resume) a config to the end and write its outputs.  Ctrl-C marks the run interrupted.

    ``executor``: ``"local"`` (this process, the default) or ``"ray"`` (one Ray task per cell,
    :mod:`.ray_executor`; ``ray_options`` go to :func:`~.ray_executor.run_on_ray`: ``address``,
    ``cpus_per_task``, ``gpus_per_task``).  Both write the same rows.  ``preflight_first``: run
    :func:`~.preflight.preflight` (fail fast) before the run is created."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if cfg is not None:  # fail before a run is created
        check_names(cfg, registry)
        check_options(cfg, registry)
        if preflight_first:
            from .preflight import preflight

            # every model, detector, checkpoint file and data entry, one batch each: a bad one
            # stops here, before any fitting (estimates over what is free are only warnings)
            preflight(cfg, registry, output=output, fail_fast=True, log=log)
    cfg, store, run_id, run_dir = open_run(cfg, output, resume)
    check_names(cfg, registry)
    log(f"run {run_id}: {cfg.source} (config hash {cfg.hash[:12]}) -> {run_dir}")
    try:
        runner = Runner(cfg, registry, store, run_id, run_dir, progress=progress, log=log)
        if executor == "ray":
            from .ray_executor import run_on_ray

            summary = run_on_ray(runner, **(ray_options or {}))
        else:
            summary = runner.run()
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted")
        log(f"interrupted: finished cells are stored; continue with: tsdf-bench run --resume {run_id} "
            f"--output {run_dir.parent}")
        raise
    except BaseException:
        if resume is None and store.forget_run(run_id):  # a failed start leaves no run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            store.set_status(run_id, "failed")
        raise
    outputs = write_outputs(cfg, store, run_id, run_dir, summary, figures=figures, registry=registry)
    store.set_status(run_id, "finished" if not summary.errors else "finished-with-errors")
    if not summary.errors:
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return outputs


def header_for(cfg: RunConfig, run_id: str, rows: list[dict]) -> dict:
    """The leaderboard header: scale, data and config (file and hash), so a table never travels without them."""
    from ..leaderboard import make_header

    return make_header(rows, title=f"tsdf-bench leaderboard: {cfg.run.name}", scale=cfg.run.scale,
                       config_hash=f"{cfg.hash[:12]} ({cfg.source}; seeds {', '.join(map(str, cfg.run.seeds))}, "
                                   f"rounds {cfg.run.rounds})")


def _flat(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def write_rows(rows: list[dict], run_dir: Path) -> list[Path]:
    """``results.json`` (nested) and ``results.csv`` (one line per cell, nested values as JSON)."""
    json_path, csv_path = run_dir / "results.json", run_dir / "results.csv"
    json_path.write_text(json.dumps(rows, indent=1, sort_keys=True, default=str), encoding="utf-8")
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "traceback"))
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _flat(r.get(k)) for k in columns})
    return [json_path, csv_path]


def write_outputs(cfg: RunConfig, store: ResultsStore, run_id: str, run_dir: Path, summary: RunSummary,
                  figures: bool = True, registry=None) -> RunOutputs:
    rows = store.rows(run_id)
    out = RunOutputs(summary, rows)
    out.files["results"] = write_rows(rows, run_dir)
    try:
        from ..leaderboard import write_leaderboards
    except ImportError as exc:
        out.warnings.append(f"leaderboard tables skipped: {exc}")
        write_leaderboards = None
    if write_leaderboards is not None:
        header = header_for(cfg, run_id, rows)
        out.files["leaderboard"] = _paths(write_leaderboards(rows, run_dir / "leaderboard", header, registry=registry))
        if cfg.run.publish:
            out.files["published"] = _paths(write_leaderboards(rows, Path(cfg.run.publish), header,
                                                                         registry=registry))
    if figures:
        from .figures import make_figures

        try:
            out.files["figures"] = make_figures(run_dir, rows, defenses=cfg.defenses.names, models=cfg.models.names)
        except Exception as exc:  # noqa: BLE001 - a figure must never cost the results
            out.warnings.append(f"figures failed: {type(exc).__name__}: {exc}")
    return out


def _paths(result) -> list[Path]:
    if result is None:
        return []
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (str, Path)):
        return [Path(result)]
    return [Path(p) for p in result]
