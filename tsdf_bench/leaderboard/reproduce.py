"""Does a rerun reproduce a published leaderboard?

``tsdf-bench leaderboard --results RUN --check-against leaderboards/demo/leaderboard.json`` compares
the rerun's rows with the published ones, cell by cell (:class:`tsdf_bench.schema.CellKey`), and
answers the two questions a published table must survive:

* **Bit for bit** (the same CPU type, torch version and thread count): is every measured value
  equal?  Every column is compared except those that say where and when a row was made
  (:data:`NOT_RESULTS`: run id, timings, config hash, versions, commit, the checkpoint's path).
  Hashes of weights and perturbations count as results: they show where two runs part.
* **Within the intervals** (another CPU type: float kernels differ in their last bits): does each
  rate of the rerun (every column with a published 95% interval: SR_mask and its control and
  worst-case forms, detection recall / precision / F1, crop yield) lie inside the published
  row's interval?  A rate over one source photo has no interval (a bootstrap cannot resample one
  cluster; older tables stored ``[r, r]``): it is compared as a value only.

``rounds`` restricts both to some rounds (``[0]``: the round-0 rows, which a config copy with
``rounds = 0`` reproduces in a third of the time).  Published cells the rerun lacks, and rerun
cells the published table lacks, are listed, never silently passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..schema import CellKey
from .aggregate import check_rows, dedupe

#: Columns that describe the run, not its results.
NOT_RESULTS = frozenset({"run_id", "run_name", "status", "error", "traceback", "timings", "note", "config_hash",
                         "versions", "device", "git_commit", "git_dirty", "checkpoint_path"})


@dataclass
class Reproduction:
    """What :func:`compare` found; :meth:`text` says it in a few lines."""

    cells: int = 0
    missing: list = field(default_factory=list)      # published cells the rerun lacks
    extra: list = field(default_factory=list)        # rerun cells the published table lacks
    values: int = 0
    different: list = field(default_factory=list)    # (cell, column, published, rerun)
    rates: int = 0
    rates_equal: int = 0
    outside: list = field(default_factory=list)      # (cell, rate, published, lo, hi, rerun)
    no_interval: int = 0                             # rates published without an interval

    @property
    def exact(self) -> bool:
        return bool(self.cells) and not (self.missing or self.extra or self.different)

    @property
    def within_intervals(self) -> bool:
        return bool(self.cells) and not (self.missing or self.extra or self.outside)

    @property
    def verdict(self) -> str:
        if self.exact:
            return "reproduced bit for bit"
        if self.within_intervals:
            return "reproduced within the published intervals (not bit for bit)"
        gaps = [f"{len(items)} {what}" for what, items in (("published cells missing", self.missing),
                ("cells not published", self.extra), ("rates outside their published intervals", self.outside))
                if items]
        return "not reproduced: " + ", ".join(gaps) if gaps else "not reproduced: nothing to compare"

    def text(self, show: int = 10) -> str:
        lines = [f"cells: {self.cells} compared; {len(self.missing)} published cells missing from the rerun, "
                 f"{len(self.extra)} not in the published table",
                 f"values: {self.values:,} compared, {self.values - len(self.different):,} equal, "
                 f"{len(self.different):,} different",
                 f"rates with a published interval: {self.rates:,}, {self.rates_equal:,} equal, "
                 f"{self.rates - len(self.outside):,} inside the interval, {len(self.outside):,} outside "
                 f"(and {self.no_interval:,} published without an interval, counted as values)"]
        for label, items in (("missing", self.missing), ("extra", self.extra)):
            lines += [f"  {label}: {cell.label}" for cell in items[:show]]
        lines += [f"  outside: {cell.label} {rate} = {new!r}, published {old!r} [{lo!r}, {hi!r}]"
                  for cell, rate, old, lo, hi, new in self.outside[:show]]
        lines += [f"  different: {cell.label} {column}: published {old!r}, rerun {new!r}"
                  for cell, column, old, new in self.different[:show]]
        if max(len(self.missing), len(self.extra), len(self.outside), len(self.different)) > show:
            lines.append(f"  (first {show} of each listed)")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines) + "\n"


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _by_cell(rows: list[dict], rounds) -> dict:
    """The row of each cell the leaderboard would use (:func:`.aggregate.dedupe`: the last one)."""
    return {CellKey.of(r): r for r in dedupe(check_rows(rows))[0] if rounds is None or int(r["round"]) in rounds}


def compare(published: list[dict], rerun: list[dict], rounds=None) -> Reproduction:
    """Compare ``rerun`` rows with ``published`` ones (see the module docstring)."""
    rounds = None if rounds is None else {int(k) for k in rounds}
    old, new = _by_cell(published, rounds), _by_cell(rerun, rounds)
    report = Reproduction(missing=sorted(set(old) - set(new)), extra=sorted(set(new) - set(old)))
    for cell in sorted(set(old) & set(new)):
        a, b = old[cell], new[cell]
        report.cells += 1
        for column in sorted((set(a) | set(b)) - NOT_RESULTS):
            report.values += 1
            if not _same(a.get(column), b.get(column)):
                report.different.append((cell, column, a.get(column), b.get(column)))
        for rate in sorted(c for c in a if f"{c}_lo" in a and f"{c}_hi" in a and isinstance(a[c], (int, float))):
            lo, hi, value = a[f"{rate}_lo"], a[f"{rate}_hi"], b.get(rate)
            photos = a.get(f"{rate}_photos")
            if lo is None or hi is None or (photos is not None and len(photos) < 2):
                report.no_interval += 1
                continue
            report.rates += 1
            report.rates_equal += _same(a[rate], value)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                report.outside.append((cell, rate, a[rate], lo, hi, value))
    return report
