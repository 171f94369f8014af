"""Run a config's cells on Ray: ``tsdf-bench run CONFIG --executor ray [--ray-address ADDRESS]``.

Without an address (and without ``RAY_ADDRESS`` in the environment) a local Ray instance is
started for the run and stopped after it; with one, the run connects to that cluster.  The
local executor (:meth:`Runner.run`) stays the default; both write the same rows.

Tasks (each asks for ``cpus_per_task`` CPUs and, when the config's device is ``cuda``, or
``auto`` on a cluster that has GPUs, ``gpus_per_task`` GPUs):

``prepare(model)``
    one per model, first: loads it, training a demo model into the cache on first use, so that
    no two tasks train the same model at once.
``protect(seed, defense)``
    one per (seed, defense) with unfinished cells: fits the defense and protects the images;
    its result stays in Ray's object store and every cell of that defense reads it.
``cell``
    **one task per cell**: round ``k`` of a (seed, defense, model, adaptation) chain, starting
    from the state the round-``k-1`` task returned (the attacker's retrained model), exactly as
    :meth:`Runner.advance` does in the local loop.  A round already stored (``--resume``) is
    still retrained, not re-measured, so later rounds start from the same model.

Rows come back to the driver, which writes them into the run's store as each task finishes:
``--resume``, failures recorded per cell (a task whose worker dies gives its cell an error row)
and Ctrl-C behave as with the local executor.  Workers rebuild the plugin registry from
:attr:`Registry.spec` and keep one :class:`Runner` per run, so models, detectors and clean
outputs are loaded once per worker process; a worker's runner resolves the speed switch
(``Runner.optimize``) from the same config and the ``TSDF_BENCH_*`` variables the driver passes
on.  Files (perturbations, samples for the figures,
the resume cache) are written by the workers under the run folder: on a multi-node cluster the
output folder and the model cache (``TSDF_BENCH_CACHE``, passed on to the workers) must be on a
shared file system, and tsdf-bench with the same plugins installed on every node.
"""
from __future__ import annotations

import os
import pickle
import traceback
from pathlib import Path

from ..errors import ConfigError
from ..paths import CACHE_ENV, cache_root
from .plan import Cell, groups
from .runner import Runner, RunSummary
from .state import CellFailure, summarize

_RUNNERS: dict[str, Runner] = {}  # in a worker process: run id -> its Runner


class RowRecorder:
    """A worker's stand-in for the results store: keeps the rows for the driver to write."""

    def __init__(self):
        self.rows: list[tuple[dict, dict]] = []

    def write_cell(self, run_id: str, key: dict, **fields) -> None:
        self.rows.append((dict(key), fields))

    def take(self) -> list[tuple[dict, dict]]:
        rows, self.rows = self.rows, []
        return rows


def _worker_runner(job: dict) -> Runner:
    runner = _RUNNERS.get(job["run_id"])
    if runner is None:
        from ..plugins import Registry

        _RUNNERS.clear()  # one run at a time per worker process
        runner = Runner(job["config"], Registry(**job["registry"]), RowRecorder(), job["run_id"], job["run_dir"],
                        progress=False, log=print, git=job["git"])
        _RUNNERS[job["run_id"]] = runner
    return runner


# Values passed between tasks are pickled inside the task, after the worker has loaded the
# plugins: a model class from a --plugins-dir file can only be unpickled once its module exists.
def _pack(value) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _prepare_task(job: dict, model: str) -> None:
    runner = _worker_runner(job)
    try:
        runner.model(model)
    except Exception:  # noqa: BLE001 - recorded by every cell of this model
        pass


def _protect_task(job: dict, seed: int, defense: str) -> bytes:
    runner = _worker_runner(job)
    try:
        return _pack(runner.protect(seed, defense))
    except Exception as exc:  # noqa: BLE001 - every cell of this defense fails with it
        return _pack(CellFailure.of(exc, f"defense {defense!r} fit/protect"))


def _cell_task(job: dict, cell: Cell, write: bool, prot: bytes, state: bytes | None) -> tuple[list, bytes | None]:
    runner = _worker_runner(job)
    prot = pickle.loads(prot)
    if isinstance(prot, CellFailure):
        if write:
            runner._write_error(cell, prot, None, stage=prot.stage)
        return runner.store.take(), None
    state = runner.start_chain(cell) if state is None else pickle.loads(state)
    state = runner.advance(state, cell, prot, write=write)
    if state.failure is not None:  # exceptions do not pickle reliably: keep text and traceback
        state.failure = (CellFailure.of(*state.failure), state.failure[1])
    return runner.store.take(), _pack(state)


def run_on_ray(runner: Runner, *, address: str | None = None, cpus_per_task: float = 1,
               gpus_per_task: float | None = None) -> RunSummary:
    """Run ``runner``'s unfinished cells as Ray tasks; rows go into ``runner.store``."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray needs Ray: pip install 'tsdf-bench[ray]' (or pip install ray)") from exc
    started = False
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("TSDF_BENCH_")}
        env[CACHE_ENV] = str(cache_root())  # the driver's cache, as an absolute path
        kwargs = {"address": address} if address else {}
        if not address and not os.environ.get("RAY_ADDRESS"):
            kwargs.update(include_dashboard=False)
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True, **kwargs)
        started = True
    try:
        return _submit_and_collect(ray, runner, cpus_per_task, gpus_per_task)
    finally:
        if started:
            ray.shutdown()


def _submit_and_collect(ray, runner: Runner, cpus_per_task: float, gpus_per_task: float | None) -> RunSummary:
    cfg, store, run_id = runner.cfg, runner.store, runner.run_id
    cells = runner.cells()
    done = store.done(run_id)
    todo = [c for c in cells if tuple(c) not in done]
    if not todo:
        return summarize(runner, cells, todo)
    runner.log(f"{len(todo)} of {len(cells)} cells to run on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
               f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    runner.provenance_base()  # loads the data here: a data problem stops the run before any task
    if gpus_per_task is None:
        wants_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        gpus_per_task = 1 if wants_gpu else 0
    options = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task, "max_retries": 0}
    job = {"config": cfg, "registry": runner.registry.spec, "run_id": run_id,
           "run_dir": str(Path(runner.run_dir).resolve()), "git": runner.git}
    job_ref = ray.put(job)
    prepare = ray.remote(_prepare_task).options(**options)
    protect = ray.remote(_protect_task).options(**options)
    cell_task = ray.remote(_cell_task).options(num_returns=2, **options)

    ray.get([prepare.remote(job_ref, m) for m in dict.fromkeys(c.model for c in todo)])
    pending = {}
    for seed, dname, group in groups(cfg, todo):
        prot_ref = protect.remote(job_ref, seed, dname)
        for chain in _chains(group):
            wanted = {c.round: c for c in chain}
            state_ref = None
            for k in range(max(wanted) + 1):
                cell = wanted.get(k) or chain[0]._replace(round=k)
                rows_ref, state_ref = cell_task.remote(job_ref, cell, k in wanted, prot_ref, state_ref)
                if k in wanted:
                    pending[rows_ref] = cell
    bar = runner._bar(total=len(cells), initial=len(cells) - len(todo), desc="cells (ray)")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the task (or one it depends on) died
                    runner._write_error(cell, CellFailure(f"Ray task failed: {type(exc).__name__}: {exc}",
                                                          traceback.format_exc()))
                    rows = []
                for key, fields in rows:
                    store.write_cell(run_id, key, **fields)
                bar.update(1)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return summarize(runner, cells, todo)


def _chains(group: list[Cell]) -> list[list[Cell]]:
    """The cells of one (seed, defense) grouped by (model, adaptation), in run order."""
    chains: dict[tuple, list[Cell]] = {}
    for c in group:
        chains.setdefault((c.model, c.adaptation), []).append(c)
    return [sorted(ch, key=lambda c: c.round) for ch in chains.values()]
