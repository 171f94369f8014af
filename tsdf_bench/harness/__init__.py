"""The benchmark harness: run configs into a results store, then tables and figures.

``run_config(cfg, registry, output=..., resume=...)`` is what ``tsdf-bench run`` calls;
:class:`Runner` runs the cells (in this process, or one Ray task per cell with
:mod:`.ray_executor`), :class:`ResultsStore` keeps them (SQLite), :mod:`.figures`
draws them, :mod:`.provenance` records what is needed to reproduce each row.
"""
from .plan import Cell, plan_cells
from .runner import Runner, RunSummary
from .session import RunOutputs, open_run, run_config
from .store import ResultsStore, StoreError

__all__ = ["Cell", "Runner", "RunSummary", "plan_cells", "RunOutputs", "open_run", "run_config", "ResultsStore",
           "StoreError"]
