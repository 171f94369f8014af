"""Metrics over a cell's eval photos one batch at a time (the protocol of :class:`~tsdf_bench.metrics.Metric`).

The harness measures a cell in batches of eval photos, so that its memory does not grow with the
number of photos.  Each batch is an :class:`~tsdf_bench.metrics.EvalBatch` whose image tensors
(``clean``, ``protected``, ``fake_clean``, ``fake_protected``, ``fake_clean_original``) hold that
batch's photos; the per-image lists that are not tied to the forged photos (``detections_*``,
``crop_kept``, ``eval_photos``, ``crop_photos``) are the whole cell's, the same in every batch.

A metric either

* **streams**: ``state = metric.start()``, ``metric.update(state, batch)`` per batch, and
  ``metric.finish(state)`` gives the columns.  Keep per-pair values in the state (a
  :class:`PairValues` concatenates them in photo order), not the images; or
* implements only ``compute(batch)`` on a **whole** batch: the harness concatenates the cell's
  batches into one (:class:`WholeBatch`) and calls it once.  Its memory then grows with the number
  of eval photos; a metric that reads only some fields declares them in ``needs`` (the detection
  metric: its detections), and only those are kept.

:class:`MetricPasses` runs a list of metrics over one cell's batches that way.
"""
from __future__ import annotations

import numpy as np
import torch

#: The EvalBatch fields that hold one batch's photos (concatenated to make a whole batch).
BATCH_TENSORS = ("clean", "protected", "fake_clean", "fake_protected", "fake_clean_original")
#: The EvalBatch fields that are the whole cell's in every batch.
CELL_FIELDS = ("detections_clean", "detections_protected", "crop_kept", "eval_photos", "crop_photos")


def metric_streams(metric) -> bool:
    """Whether ``metric`` computes batch by batch: a :class:`~tsdf_bench.metrics.Metric` that
    overrides ``update``, or any other object with ``start``, ``update`` and ``finish``."""
    from .metrics import Metric

    if isinstance(metric, Metric):
        return type(metric).update is not Metric.update
    return all(callable(getattr(metric, m, None)) for m in ("start", "update", "finish"))


def metric_needs(metric) -> tuple[str, ...]:
    """The EvalBatch fields a whole-batch metric reads (its ``needs``; every field when it does not say)."""
    needs = getattr(metric, "needs", None)
    return tuple(BATCH_TENSORS + CELL_FIELDS) if needs is None else tuple(needs)


def needs_images(metric) -> bool:
    """Whether ``metric`` holds image tensors of the whole cell: it does not stream and needs one."""
    return not metric_streams(metric) and any(f in BATCH_TENSORS for f in metric_needs(metric))


class WholeBatch:
    """The batches of one cell combined into the whole cell's EvalBatch, keeping only ``fields``
    (default: every field; the others are None in :meth:`batch`).  Image tensors are concatenated
    along the photos; the cell's lists are taken from the first batch."""

    def __init__(self, fields=None):
        from .metrics import EvalBatch

        known = set(BATCH_TENSORS + CELL_FIELDS)
        self.fields = tuple(known if fields is None else fields)
        unknown = sorted(set(self.fields) - known)
        if unknown:
            raise ValueError(f"WholeBatch: unknown EvalBatch field(s) {unknown}; known: {sorted(known)}")
        self._batch_type = EvalBatch
        self._parts = {f: [] for f in BATCH_TENSORS if f in self.fields}
        self._cell: dict | None = None

    def add(self, batch) -> None:
        if self._cell is None:
            self._cell = {f: getattr(batch, f) for f in CELL_FIELDS if f in self.fields}
        for f, parts in self._parts.items():
            value = getattr(batch, f)
            if value is not None:
                parts.append(value)

    def batch(self):
        """The whole cell's batch (the parts are released as they are concatenated)."""
        out = {f: None for f in BATCH_TENSORS}
        for f, parts in self._parts.items():
            if parts:
                out[f] = parts[0] if len(parts) == 1 else torch.cat(parts)
            parts.clear()
        cell = {k: v for k, v in (self._cell or {}).items() if v is not None}
        return self._batch_type(**out, **cell)


class PairValues:
    """Per-pair (or per-image) values of a cell, added batch by batch: :meth:`add` takes a dict of
    tensors or arrays (first axis: the batch's photos), :meth:`get` gives one key's values of every
    batch concatenated in photo order (a tensor or an array, as added).  ``len()``: batches added."""

    def __init__(self):
        self._parts: dict[str, list] = {}
        self._batches = 0

    def add(self, values: dict) -> None:
        self._batches += 1
        for k, v in values.items():
            self._parts.setdefault(k, []).append(v)

    def __len__(self) -> int:
        return self._batches

    def get(self, key: str):
        parts = self._parts[key]
        if isinstance(parts[0], torch.Tensor):
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])

    def values(self) -> dict:
        return {k: self.get(k) for k in self._parts}


class MetricPasses:
    """One cell's pass of ``metrics`` over its batches: each streaming metric keeps its own state;
    the others share one :class:`WholeBatch` of the fields they need and get ``compute`` on it at
    :meth:`finish`.  The columns come in the metrics' order."""

    def __init__(self, metrics):
        self.metrics = list(metrics)
        self.streaming = [metric_streams(m) for m in self.metrics]
        self.states = [m.start() if s else None for m, s in zip(self.metrics, self.streaming)]
        whole = [m for m, s in zip(self.metrics, self.streaming) if not s]
        fields = dict.fromkeys(f for m in whole for f in metric_needs(m))
        self.whole = WholeBatch(fields) if whole else None

    def update(self, batch) -> None:
        for metric, state, streams in zip(self.metrics, self.states, self.streaming):
            if streams:
                metric.update(state, batch)
        if self.whole is not None:
            self.whole.add(batch)

    def finish(self) -> dict:
        whole = self.whole.batch() if self.whole is not None else None
        self.whole = None
        out: dict = {}
        for metric, state, streams in zip(self.metrics, self.states, self.streaming):
            out.update(metric.finish(state) if streams else metric.compute(whole))
        return out


def run_batches(metric, batches) -> dict:
    """``metric``'s columns over ``batches`` (EvalBatch objects of one cell), as the harness runs it."""
    passes = MetricPasses([metric])
    for batch in batches:
        passes.update(batch)
    return passes.finish()
