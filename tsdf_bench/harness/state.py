"""What the runner passes around: a defense's protected images, where a chain of rounds stands,
failures that travel between cells and processes, and the run's summary."""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .provenance import derived_seed


def _seed(seed: int, *keys) -> None:
    torch.manual_seed(derived_seed(seed, *keys))


@dataclass
class Protected:
    """One fitted defense's output for one seed."""

    collect: torch.Tensor
    eval: torch.Tensor
    perturbation_sha256: str
    timings: dict
    info: dict
    detections: dict = field(default_factory=dict)  # detector -> list[Detections] | Exception
    preps: dict = field(default_factory=dict)  # (size, purify key) -> prep tuple | Exception


@dataclass
class ChainState:
    """Where a chain of rounds stands: the attacker's current model and what the last retraining did."""

    model: object
    hash: str
    base_hash: str  # the round-0 model's
    usable: list | None = None  # per collected photo: the attacker's crop is the right face
    retrain_info: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # timings of the last retraining
    failure: tuple | None = None  # (exception, stage): every later round fails with it


class _Failed(Exception):
    """A cached failure re-raised for every cell that depends on it."""


class CellFailure(Exception):
    """A failure as text and traceback, so it can travel between processes (the Ray executor)."""

    def __init__(self, text: str, traceback_text: str = "", stage: str = ""):
        super().__init__(text)
        self.text, self.traceback_text, self.stage = text, traceback_text, stage

    def __reduce__(self):
        return CellFailure, (self.text, self.traceback_text, self.stage)

    @classmethod
    def of(cls, exc: BaseException, stage: str = "") -> "CellFailure":
        if isinstance(exc, CellFailure):
            return exc
        cause = exc.__cause__ if isinstance(exc, _Failed) and exc.__cause__ is not None else exc
        text = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
        return cls(text, "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)), stage)


def _cached(cache: dict, key, compute: Callable[[], object], what: str):
    """``cache[key]``, computed once by ``compute()``.  A failure is cached as well and re-raised as
    :class:`_Failed` ("``what``: error") for every cell that depends on it."""
    if key not in cache:
        try:
            cache[key] = compute()
        except Exception as exc:  # noqa: BLE001 - recorded in every dependent cell
            cache[key] = exc
    got = cache[key]
    if isinstance(got, Exception):
        raise _Failed(f"{what}: {type(got).__name__}: {got}") from got
    return got


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    total: int
    ok: int
    errors: list[dict]
    skipped: int


def summarize(runner, cells: list, todo: list) -> RunSummary:
    """Counts and failures of a run's cells, read back from its store."""
    from ..schema import CellKey

    rows = {CellKey.of(r): r for r in runner.store.rows(runner.run_id)}
    errors = [rows[c] for c in cells if c in rows and rows[c]["status"] != "ok"]
    ok = sum(1 for c in cells if c in rows and rows[c]["status"] == "ok")
    return RunSummary(runner.run_id, runner.run_dir, len(cells), ok, errors, len(cells) - len(todo))
