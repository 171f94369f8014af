"""Which columns the leaderboard shows: the harness's own columns, and the metric plugins' declared ones.

The metrics table is driven by the metric plugins: each plugin declares ``columns``
(:class:`tsdf_bench.metrics.Metric`), and a new plugin's columns appear in the tables without
any change here.  The columns come, in this order of preference, from

1. ``metric_columns`` passed by the caller: a sequence of column names, or a mapping
   ``{metric name: columns}``;
2. the registry, for the metrics named in the rows' provenance (a row's ``metrics`` list), else
   for every registered metric.

A declared column that no row fills is left out of the tables (an optional metric that did not
run shows nothing rather than a column of dashes).  A rate declared with its counts
(:func:`tsdf_bench.schema.rate_family`: ``crop_yield`` with ``crop_yield_lo`` ... ``crop_yield_photos``)
is one column: its parts are shown inside it (``rate [lo, hi] (hits/n)``), not beside it.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Iterable

from .. import schema
from ..schema import KEY_COLUMNS  # noqa: F401 - row keys that are not metrics (re-exported)

PROVENANCE_COLUMNS = ("config_hash", "versions", "device", "checkpoint_sha256", "perturbation_sha256", "git_commit",
                      "scale", "data", "split")
# The harness's own columns (tsdf_bench.harness.runner: measure / _persistence), not a plugin's.
RATE_SUFFIXES, HARNESS_RATES = schema.RATE_SUFFIXES, schema.HARNESS_RATES
HARNESS_COLUMNS = (tuple(f"{c}{s}" for c in HARNESS_RATES for s in ("", *RATE_SUFFIXES))
                   + schema.HARNESS_COLUMNS + ("crop_yield", "g_steps", "d_steps"))
PROVENANCE_METRICS_KEY = "metrics"  # a row's list of the metric plugins that measured it


def _flatten(metric_columns) -> list[str]:
    if isinstance(metric_columns, Mapping):
        metric_columns = [c for cols in metric_columns.values() for c in cols]
    if isinstance(metric_columns, str):
        metric_columns = [metric_columns]
    return list(dict.fromkeys(str(c) for c in metric_columns))


def entry_columns(entry) -> tuple[str, ...]:
    """The columns a registered metric declares, read from its class when the factory is lazy
    (no instantiation, so a metric whose weights are missing still lists its columns), else from
    an instance built with default options; ``()`` when neither works."""
    factory = entry.factory
    cls = factory if isinstance(factory, type) else None
    target = getattr(factory, "target", None)
    if cls is None and target:
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001 - a broken optional plugin must not break the tables
            cls = None
    declared = getattr(cls, "columns", None) if cls is not None else None
    if isinstance(declared, (tuple, list)):
        return tuple(declared)
    try:
        return tuple(entry.create().columns)
    except Exception:  # noqa: BLE001
        return ()


def registry_columns(registry=None, names: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
    """``{metric name: declared columns}`` of ``names`` (default: every registered metric)."""
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    known = registry.names("metric")
    names = known if names is None else [n for n in names if n in known]
    return {name: entry_columns(registry.get("metric", name)) for name in names}


def provenance_metrics(rows: Iterable[dict]) -> list[str] | None:
    """The metric names the rows' provenance records (union, first-seen order), or None."""
    names: dict[str, None] = {}
    for row in rows:
        value = row.get(PROVENANCE_METRICS_KEY)
        if isinstance(value, (list, tuple)):
            names.update(dict.fromkeys(str(v) for v in value))
    return list(names) or None


def declared_columns(rows: list[dict], metric_columns=None, registry=None) -> list[str]:
    """Every metric column to consider, in declaration order (see the module docstring)."""
    if metric_columns is not None:
        return _flatten(metric_columns)
    try:
        return _flatten(registry_columns(registry, provenance_metrics(rows)))
    except Exception:  # noqa: BLE001 - no registry (broken install): the harness columns still render
        return []


def rate_parts(columns: Iterable[str]) -> set[str]:
    """The count and interval columns of the rates among ``columns`` (a rate is a column whose
    ``<column>_photos`` is declared too)."""
    columns = set(columns)
    return {f"{c}{s}" for c in columns if f"{c}_photos" in columns for s in RATE_SUFFIXES}


def shown_columns(rows: list[dict], metric_columns=None, registry=None) -> list[str]:
    """The declared metric columns that at least one ok row fills, a rate's parts left out."""
    ok = [r for r in rows if (r.get("status") or "ok") == "ok"]
    declared = declared_columns(rows, metric_columns, registry)
    parts = rate_parts(declared)
    return [c for c in declared if c not in parts and any(r.get(c) is not None for r in ok)]
