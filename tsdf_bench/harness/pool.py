"""Run a config's cells in N local worker processes: ``[run] workers = N`` (or ``run --workers N``).

The unit of work is a **(seed, defense) group**, the unit :meth:`Runner.run_group` runs in the
sequential loop: fit and apply the defense, then every (model, adaptation) chain of its cells.
Each worker takes the next group when it finishes one, so N workers stay busy however the groups
differ in cost, until the last groups: these decide how long the workers wait for each other.
The groups therefore go out **defense by defense** in the config's order (every seed of the first
defense, then of the next), so that a cheap defense listed last (``none``: nothing to fit) ends
the run rather than the most expensive one's last seed.  First come one task per seed that
retrains that seed's clean-retraining controls (shared by all its defenses), so a worker that
reaches a retraining round finds its control already saved instead of retraining it at the same
moment as another worker.

Each worker is a fresh (spawned) process with **one torch thread**, its own :class:`Runner` and
its own connection to the run's SQLite store (each cell is one transaction; WAL), so rows are
written as they finish and ``--resume`` works as with one process.  Models, detectors and data
load once per worker.  Rows depend on the torch thread count only through float rounding; each
records ``torch_threads``.  The clean-retraining controls, shared by every defense of a seed,
are saved in the run's cache folder for the other workers (:meth:`Attacker.control`); a worker
that needs one before it is saved retrains it itself, with the same seed, and gets the same model.

A worker that dies (out of memory, killed) turns the cells of its group that were not written
into error rows; the other groups go on.  Ctrl-C cancels the groups not started.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .plan import Cell, groups
from .state import CellFailure, summarize
from .streaming import release_freed_memory

_RUNNER = None  # the worker process's Runner


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _init_worker(job: dict) -> None:
    import torch

    from ..plugins import Registry
    from .runner import Runner
    from .store import ResultsStore

    global _RUNNER
    torch.set_num_threads(1)
    _RUNNER = Runner(job["config"], Registry(**job["registry"]), ResultsStore(job["store"]), job["run_id"],
                     job["run_dir"], progress=False, log=_log, git=job["git"])


def _group_task(seed: int, dname: str, group: list[Cell]) -> int:
    try:
        _RUNNER.run_group(seed, dname, group)
    finally:
        release_freed_memory()  # give the group's freed tensors back before the next group's peak
    return len(group)


def _controls_task(cells: list[Cell]) -> int:
    """Retrain (and save) the controls of ``cells``, one per (model, adaptation, round >= 1)."""
    for cell in cells:
        try:
            _RUNNER._control(cell)
        except Exception:  # noqa: BLE001 - the cells that need this control record the failure
            pass
    return 0


def _control_cells(seed: int, todo: list[Cell]) -> list[Cell]:
    keys = dict.fromkeys((c.model, c.adaptation, c.round) for c in todo if c.seed == seed and c.round > 0)
    return [Cell("", m, a, k, seed) for m, a, k in keys]


def by_defense(cfg, work: list[tuple[int, str, list[Cell]]]) -> list[tuple[int, str, list[Cell]]]:
    """``work`` (seeds outer) reordered defense by defense, in the config's order, seeds inner."""
    order = {d: i for i, d in enumerate(cfg.defenses.names)}
    return sorted(work, key=lambda g: order[g[1]])


def _drop_models(runner) -> None:
    """Forget the parent's loaded models and give their memory back to the system."""
    import gc

    runner._models.clear()
    runner._discriminators.clear()
    gc.collect()
    release_freed_memory()


def run_in_pool(runner, cells: list[Cell], todo: list[Cell]):
    """Run ``todo`` (unfinished cells of ``runner``'s run) in ``cfg.run.workers`` processes."""
    cfg = runner.cfg
    work = groups(cfg, todo)
    # load (a demo model: train into the cache, build its data cache) every model once here, so
    # that no two workers train or cache the same one at once; a failure is the cells' to record
    for name in dict.fromkeys(c.model for c in todo):
        try:
            runner.model(name)
        except Exception:  # noqa: BLE001
            pass
    _drop_models(runner)  # the workers load their own
    n = min(cfg.run.workers, len(work))
    runner.log(f"{len(work)} (seed, defense) groups on {n} worker processes, one torch thread each")
    job = {"config": cfg, "registry": runner.registry.spec, "run_id": runner.run_id,
           "run_dir": str(Path(runner.run_dir).resolve()), "store": str(Path(runner.store.path).resolve()),
           "git": runner.git}
    bar = runner._bar(total=len(cells), initial=len(cells) - len(todo), desc=f"cells ({n} workers)")
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(job,))
    try:
        futures = {}
        for seed in dict.fromkeys(seed for seed, _, _ in work):
            controls = _control_cells(seed, todo)
            if controls:  # before the groups, which need them
                futures[pool.submit(_controls_task, controls)] = (seed, "controls", [])
        for group in by_defense(cfg, work):
            futures[pool.submit(_group_task, *group)] = group
        for future in as_completed(futures):
            seed, dname, group = futures[future]
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the worker died: its unwritten cells fail
                written = runner.store.done(runner.run_id)
                failure = CellFailure(f"worker process failed: {type(exc).__name__}: {exc}", "")
                for c in group:
                    if tuple(c) not in written:
                        runner._write_error(c, failure, stage=f"defense {dname!r}, seed {seed}")
            bar.update(len(group))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown()
    return summarize(runner, cells, todo)
