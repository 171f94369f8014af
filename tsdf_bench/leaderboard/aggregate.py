"""Aggregation: rows -> per-model and overall records, ranks, and the reference-vs-others comparison.

No formatting here (see :mod:`.render`).  A record's statistics are dicts:

* a **rate** ``{"kind": "rate", "value", "lo", "hi", "successes", "pairs", "photos", "counts", "n"}``:
  the ``{photo: [successes, pairs]}`` counts (a row's ``<col>_photos``) of every seed pooled
  (:func:`tsdf_bench.stats.merge_counts`), the rate and its 95% cluster-bootstrap interval over
  source photos (:func:`tsdf_bench.stats.rate`); ``n`` is the number of rows pooled.  Rows
  without counts (older results) give the mean over seeds and no interval (``counts`` None).
* a **mean** ``{"kind": "mean", "value", "std", "n"}``: mean over seeds, sample std (ddof=1) when
  n > 1.
* a **difference** ``{"kind": "diff", "value", "lo", "hi", "excludes_zero", "photos"}`` from
  :func:`tsdf_bench.stats.paired_difference` (paired bootstrap over the photos both sides share).

The detection rates (``det_recall_<det>``, ``det_precision_<det>``, ``det_f1_<det>``: face boxes)
and the crop yield (collected photos) are rates like SR_mask when their rows carry counts.
Detection depends on the defense and the seed only (every model and adaptation measures the same
protected photos), so it is pooled over seeds from one round-0 row each, never added up over models.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable

from .. import stats
from ..errors import TsdfBenchError
from ..schema import CellKey
from .columns import HARNESS_COLUMNS, KEY_COLUMNS, PROVENANCE_COLUMNS, RATE_SUFFIXES, shown_columns

# the rate columns the summary reports at the final round k (the harness's, see columns.py)
FINAL_RATES = ("sr_mask", "sr_mask_orig", "sr_mask_ctrl", "sr_mask_worst")
# the detection metric's rates, per detector (plugins/tsdf_bench_plugins/metrics/detection.py)
DETECTION_RATES = ("det_recall", "det_precision", "det_f1")


# -- row hygiene ---------------------------------------------------------------------------
def finite(value):
    """JSON-safe scalar: NaN/inf floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def num(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_rows(rows) -> list[dict]:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TsdfBenchError(f"leaderboard row {i} is a {type(row).__name__}, "
                                 "expected a dict from ResultsStore.rows()")
        missing = [k for k in ("defense", "model", "adaptation", "round") if k not in row]
        if missing:
            raise TsdfBenchError(f"leaderboard row {i} lacks {missing}; rows must come from ResultsStore.rows() "
                                 "(keys defense, model, adaptation, round, seed, status ...)")
    return rows


def dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the last row per (defense, model, adaptation, round, seed); also the number replaced."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[CellKey.of(row)] = row
    return list(latest.values()), len(rows) - len(latest)


def ok(row) -> bool:
    return (row.get("status") or "ok") == "ok"


def detectors(rows: Iterable[dict]) -> list[str]:
    """The detectors whose rates the rows carry (``det_recall_<det>``; not the paper's form, not a
    rate's count or interval columns)."""
    names = {k[len("det_recall_"):] for r in rows for k in r
             if k.startswith("det_recall_") and not k.startswith("det_recall_paper_")}
    return sorted(n for n in names if not any(n == f"{m}{s}" for m in names for s in RATE_SUFFIXES))


def detection_rows(rows: Iterable[dict]) -> list[dict]:
    """One ok round-0 row per (defense, seed): the first by (model, adaptation).  Detection is
    measured on the defense's protected photos of a seed, the same for every model and adaptation."""
    first: dict[tuple, dict] = {}
    for row in sorted((r for r in rows if ok(r) and int(r["round"]) == 0),
                      key=lambda r: (str(r["model"]), str(r["adaptation"]))):
        first.setdefault((str(row["defense"]), row.get("seed")), row)
    return list(first.values())


def flat_rows(rows: Iterable[dict], metric_columns=None, registry=None) -> list[dict]:
    """One JSON-ready dict per row: keys, every metric and harness column (missing -> None),
    provenance, the rest.  Sorted by model, defense, adaptation, seed, round.  NaN/inf become
    None; ``crop_yield`` is None in round 0.  Error rows are kept with their message."""
    rows = check_rows(rows)
    columns = shown_columns(rows, metric_columns, registry)
    out = []
    for row in rows:
        flat = {k: row.get(k) for k in KEY_COLUMNS}
        flat["status"] = flat["status"] or "ok"
        for k in (*columns, *HARNESS_COLUMNS, *PROVENANCE_COLUMNS):
            flat[k] = finite(row.get(k))
        for k, v in row.items():
            if k not in flat:
                flat[k] = finite(v)
        if int(flat["round"]) == 0:
            flat["crop_yield"] = None
        out.append(flat)
    out.sort(key=lambda r: (str(r["model"]), str(r["defense"]), str(r["adaptation"]), str(r.get("seed")),
                            int(r["round"]), str(r.get("run_id"))))
    return out


# -- statistics ----------------------------------------------------------------------------
def mean_stat(values) -> dict | None:
    values = [v for v in (num(x) for x in values) if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"kind": "mean", "value": mean, "std": std, "n": n}


def value(stat) -> float | None:
    return None if stat is None else stat["value"]


def _key(counts: dict) -> tuple:
    return tuple(sorted((str(p), int(h), int(n)) for p, (h, n) in counts.items()))


class Pooler:
    """Rates and paired differences from pooled photo counts, each bootstrap computed once."""

    def __init__(self):
        self._rates: dict = {}
        self._diffs: dict = {}

    def rate_of(self, counts: dict, n_rows: int) -> dict:
        key = _key(counts)
        if key not in self._rates:
            self._rates[key] = stats.rate(counts)
        r = self._rates[key]
        return {"kind": "rate", "value": r["rate"], "lo": r["lo"], "hi": r["hi"], "successes": r["successes"],
                "pairs": r["pairs"], "photos": r["photos"], "counts": counts, "n": n_rows}

    def column(self, rows: list[dict], column: str) -> dict | None:
        """A column over rows (seeds, or models' pooled records): a pooled rate when every row
        carries ``<column>_photos``, else the mean."""
        present = [r for r in rows if num(r.get(column)) is not None or r.get(f"{column}_photos")]
        if not present:
            return None
        counts = [r.get(f"{column}_photos") for r in present]
        if all(isinstance(c, dict) and c for c in counts):
            return self.rate_of(stats.merge_counts(*counts), len(present))
        stat = mean_stat(r.get(column) for r in present)
        if stat is not None and any(f"{column}_photos" in r or f"{column}_n" in r for r in present):
            ns = [r.get(f"{column}_n") for r in present]
            stat = {"kind": "rate", "value": stat["value"], "lo": None, "hi": None, "successes": None,
                    "pairs": sum(int(n) for n in ns) if all(n is not None for n in ns) else None,
                    "photos": None, "counts": None, "n": stat["n"]}
        return stat

    def combine(self, stats_list: list[dict | None]) -> dict | None:
        """Records of several models into one: rates with counts pooled, else the mean of values."""
        given = [s for s in stats_list if s is not None]
        if not given:
            return None
        if all(s["kind"] == "rate" and s.get("counts") for s in given):
            return self.rate_of(stats.merge_counts(*(s["counts"] for s in given)), sum(s["n"] for s in given))
        stat = mean_stat(s["value"] for s in given)
        if stat is not None:
            stat["std"] = None  # a spread over models is not a seed spread: not shown
        return stat

    def difference(self, a, b, a0=None, b0=None) -> dict | None:
        """``a - b`` (or persistence ``a/a0 - b/b0``) of rate stats; paired bootstrap when all have counts."""
        given = [a, b] + ([a0, b0] if a0 is not None or b0 is not None else [])
        if any(s is None or s.get("value") is None for s in given):
            return None
        if all(s.get("counts") for s in given):
            key = tuple(_key(s["counts"]) for s in given)
            if key not in self._diffs:
                self._diffs[key] = stats.paired_difference(*(s["counts"] for s in given))
            d = self._diffs[key]
            if d["diff"] is None:  # undefined (a persistence whose round-0 rate is 0)
                return None
            return {"kind": "diff", "value": d["diff"], "lo": d["lo"], "hi": d["hi"],
                    "excludes_zero": d["excludes_zero"], "photos": d["photos"]}
        if len(given) == 2:
            point = a["value"] - b["value"]
        else:
            pa, pb = persistence(a0["value"], a["value"]), persistence(b0["value"], b["value"])
            point = None if pa is None or pb is None else pa - pb
        return None if point is None else {"kind": "diff", "value": point, "lo": None, "hi": None,
                                           "excludes_zero": False, "photos": None}


def persistence(sr_before: float | None, sr_after: float | None) -> float | None:
    """SR_mask(after) / SR_mask(before); None when before is 0 or missing, or after is missing."""
    if sr_before is None or sr_after is None or sr_before <= 0:
        return None
    return sr_after / sr_before


def rank_desc(values: dict[str, float]) -> dict[str, float]:
    """Rank keys by value, highest = 1, ties share the average rank."""
    ordered = sorted(values.items(), key=lambda kv: -kv[1])
    ranks, i = {}, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][1] == ordered[i][1]:
            j += 1
        for k in range(i, j + 1):
            ranks[ordered[k][0]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# -- records -------------------------------------------------------------------------------
def _final(rec: dict) -> None:
    """The final SR the rank uses (the attacker's best option at k), and persistence from it."""
    if rec["k"] is None:
        rec["final_basis"], final = "sr_mask@0", rec["sr_mask@0"]
    elif rec["sr_mask_worst@k"] is not None:
        rec["final_basis"], final = "sr_mask_worst@k", rec["sr_mask_worst@k"]
    else:  # rows from before the attacker's best option was measured
        rec["final_basis"], final = "sr_mask@k", rec["sr_mask@k"]
    rec["final"] = final
    rec["sr_final"] = value(final)
    rec["persistence"] = (persistence(value(rec["sr_mask@0"]), value(final)) if rec["k"] is not None else None)


def _status(n_errors: int, n_rows: int, all_failed: bool) -> str:
    return "error" if all_failed else "ok" if not n_errors else f"{n_errors} of {n_rows} rows failed"


def _attacker_detector(rows: list[dict]) -> str | None:
    """The detector of the rows' attacker (None for a pipeline without one, or several)."""
    if any(r.get("pipeline") == "aligned" for r in rows):
        return None
    names = {str(r["attacker_detector"]) for r in rows if r.get("attacker_detector")}
    return names.pop() if len(names) == 1 else None


def _model_record(pool: Pooler, key: tuple, grows: list[dict], columns: list[str], dets=()) -> dict:
    model, defense, adaptation = key
    good = [r for r in grows if ok(r)]
    rounds = sorted({int(r["round"]) for r in good})
    k = max((r for r in rounds if r > 0), default=None)
    at0 = [r for r in good if int(r["round"]) == 0]
    atk = [r for r in good if k is not None and int(r["round"]) == k]
    rec = {"model": model, "defense": defense, "adaptation": adaptation, "k": k,
           "n_seeds": len({r.get("seed") for r in good}), "n_errors": len(grows) - len(good), "n_rows": len(grows)}
    rec["sr_mask@0"] = pool.column(at0, "sr_mask")
    for c in FINAL_RATES:
        rec[f"{c}@k"] = pool.column(atk, c) if atk else None
    rec["adaptation_gain"] = (pool.difference(rec["sr_mask_ctrl@k"], rec["sr_mask@k"])
                              or (mean_stat(r.get("adaptation_gain") for r in atk) if atk else None))
    rec["crop_yield"] = pool.column(atk, "crop_yield") if atk else None
    rec["detection"] = {f"{c}_{d}": pool.column(at0, f"{c}_{d}") for d in dets for c in DETECTION_RATES}
    rec["attacker_detector"] = _attacker_detector(good)
    kept = [num(r.get("eval_kept")) for r in atk]
    dropped = [num(r.get("eval_dropped")) for r in atk]
    rec["eval_dropped"] = int(sum(d for d in dropped if d is not None)) if any(d is not None for d in dropped) else None
    rec["eval_total"] = (int(sum(x for x in kept + dropped if x is not None)) if rec["eval_dropped"] is not None
                         else None)
    rec["attacker_keeps"] = dict(Counter(str(r["attacker_keeps"]) for r in atk if r.get("attacker_keeps")))
    rec["metrics"] = {}
    for c in columns:
        rec["metrics"][f"{c}@0"] = pool.column(at0, c)
        rec["metrics"][f"{c}@k"] = pool.column(atk, c) if atk else None
    _final(rec)
    rec["status"] = _status(rec["n_errors"], len(grows), not good)
    return rec


def _overall_record(pool: Pooler, defense: str, adaptation: str, recs: list[dict], columns: list[str]) -> dict:
    o = {"model": "(all)", "defense": defense, "adaptation": adaptation,
         "k": max((r["k"] for r in recs if r["k"] is not None), default=None),
         "n_models": len({r["model"] for r in recs if r["status"] != "error"}),
         "n_seeds": max(r["n_seeds"] for r in recs), "n_errors": sum(r["n_errors"] for r in recs),
         "n_rows": sum(r["n_rows"] for r in recs)}
    for key in ("sr_mask@0", *(f"{c}@k" for c in FINAL_RATES), "crop_yield"):
        o[key] = pool.combine([r[key] for r in recs])
    o["adaptation_gain"] = (pool.difference(o["sr_mask_ctrl@k"], o["sr_mask@k"])
                            or pool.combine([r["adaptation_gain"] for r in recs]))
    # detection is the same for every model: one model's record (the most rows), not their sum
    o["detection"] = {key: max((r["detection"][key] for r in recs if r["detection"].get(key)),
                               key=lambda st: st["n"], default=None) for key in recs[0]["detection"]}
    detectors_ = {r["attacker_detector"] for r in recs}
    o["attacker_detector"] = detectors_.pop() if len(detectors_) == 1 else None
    dropped = [r for r in recs if r["eval_dropped"] is not None]
    o["eval_dropped"] = sum(r["eval_dropped"] for r in dropped) if dropped else None
    o["eval_total"] = sum(r["eval_total"] for r in dropped) if dropped else None
    keeps: Counter = Counter()
    for r in recs:
        keeps.update(r["attacker_keeps"])
    o["attacker_keeps"] = dict(keeps)
    o["metrics"] = {key: pool.combine([r["metrics"].get(key) for r in recs])
                    for key in (f"{c}@{s}" for c in columns for s in ("0", "k"))}
    # the final SR of each model's own basis, pooled over models
    o["final"] = pool.combine([r["final"] for r in recs])
    o["sr_final"] = value(o["final"])
    bases = sorted({r["final_basis"] for r in recs})
    o["final_basis"] = ", ".join(bases)
    o["persistence"] = persistence(value(o["sr_mask@0"]), o["sr_final"]) if o["k"] is not None else None
    model_ranks = [r["rank"] for r in recs if r["rank"] is not None]
    o["rank"] = sum(model_ranks) / len(model_ranks) if model_ranks else None
    o["ranked_models"] = len(model_ranks)
    o["status"] = _status(o["n_errors"], o["n_rows"], all(r["status"] == "error" for r in recs))
    return o


def order(rec):
    """Retraining ("retrain") first, then other adaptations by name; best rank first; errors last."""
    return (rec["model"], rec["adaptation"] != "retrain", rec["adaptation"],
            rec["rank"] if rec["rank"] is not None else math.inf, rec["defense"])


def reference_of(defenses: Iterable[str], reference_defense: str | None) -> str | None:
    """The comparison's reference: ``reference_defense`` (an error if no row has it), else
    ``"tsdf"`` when present, else None (no comparison)."""
    defenses = set(defenses)
    if reference_defense is None:
        return "tsdf" if "tsdf" in defenses else None
    if reference_defense not in defenses:
        raise TsdfBenchError(f"reference defense {reference_defense!r} has no rows; defenses in the rows: "
                             f"{', '.join(sorted(defenses)) or '(none)'}")
    return reference_defense


def compare(pool: Pooler, records: list[dict], reference: str) -> list[dict]:
    """Per (model, adaptation): the reference defense minus each other defense, in final SR and
    in persistence, with paired-bootstrap intervals over the photos both were measured on."""
    slots: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        slots[(rec["model"], rec["adaptation"])][rec["defense"]] = rec
    out = []
    for (model, adaptation), recs in slots.items():
        ref = recs.get(reference)
        if ref is None:
            continue
        for defense in sorted(d for d in recs if d != reference):
            other = recs[defense]
            ref_ok, other_ok = ref["status"] != "error", other["status"] != "error"
            line = {"model": model, "adaptation": adaptation, "reference": reference, "defense": defense,
                    "k": ref["k"], "basis": ref["final_basis"], "sr_final_reference": ref["sr_final"],
                    "sr_final_other": other["sr_final"], "persistence_reference": ref["persistence"],
                    "persistence_other": other["persistence"],
                    "status": "ok" if ref_ok and other_ok else "error"}
            line["d_sr_final"] = pool.difference(ref["final"], other["final"]) if ref_ok and other_ok else None
            retrains = ref["k"] is not None and other["k"] is not None
            line["d_persistence"] = (pool.difference(ref["final"], other["final"], ref["sr_mask@0"],
                                                     other["sr_mask@0"]) if retrains and ref_ok and other_ok else None)
            _compare_poisoning(pool, line, ref, other, retrains and ref_ok and other_ok, ref_ok and other_ok)
            out.append(line)
    out.sort(key=lambda r: (r["model"] != "(all)", r["model"], r["adaptation"] != "retrain", r["adaptation"],
                            r["defense"]))
    return out


def _compare_poisoning(pool: Pooler, line: dict, ref: dict, other: dict, retrains: bool, both_ok: bool) -> None:
    """The crop yield at k and the recall of the attacker's detector at round 0, each side's rate
    and the reference minus the other (a paired bootstrap over the photos both were measured on)."""
    line["crop_yield_reference"], line["crop_yield_other"] = ref["crop_yield"], other["crop_yield"]
    line["d_crop_yield"] = pool.difference(ref["crop_yield"], other["crop_yield"]) if retrains else None
    det = ref["attacker_detector"] if ref["attacker_detector"] == other["attacker_detector"] else None
    line["detector"] = det
    a, b = (r["detection"].get(f"det_recall_{det}") if det else None for r in (ref, other))
    line["det_recall_reference"], line["det_recall_other"] = a, b
    line["d_det_recall"] = pool.difference(a, b) if both_ok else None


def summarize(rows: Iterable[dict], metric_columns=None, registry=None, reference_defense: str | None = None) -> dict:
    """Aggregate rows into ``{"per_model", "overall", "comparison", "errors", "superseded",
    "columns", "reference"}``.

    Per-model record: model, defense, adaptation, k (last retraining round or None), n_seeds,
    n_errors, status; rates ``sr_mask@0`` and, at k, ``sr_mask@k`` (vs the retrained model),
    ``sr_mask_orig@k``, ``sr_mask_ctrl@k``, ``sr_mask_worst@k``; ``adaptation_gain`` (a paired
    difference ctrl - own); ``crop_yield`` (a rate at k), ``detection`` (``{"det_recall_<det>": rate
    at round 0, ...}`` per detector), ``attacker_detector``, ``eval_dropped`` / ``eval_total`` (summed
    over seeds at k), ``attacker_keeps`` counts; ``metrics`` ``{"<col>@0" | "<col>@k": stat}`` for
    the metric plugins' columns; ``final`` / ``sr_final`` / ``final_basis`` (what the rank uses),
    ``persistence`` and ``rank``.  Overall records pool the models' counts (rates) or average
    their values, and carry ``rank`` (the mean of the per-model ranks) and ``n_models``.
    Comparison lines add ``d_crop_yield`` and ``d_det_recall`` (the attacker's ``detector``), with
    each side's rate (``crop_yield_reference`` / ``_other``, ``det_recall_reference`` / ``_other``).
    """
    rows, superseded = dedupe(check_rows(rows))
    columns = shown_columns(rows, metric_columns, registry)
    pool = Pooler()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(str(row["model"]), str(row["defense"]), str(row["adaptation"]))].append(row)
    errors = sorted(({k: row.get(k) for k in KEY_COLUMNS} for row in rows if not ok(row)),
                    key=lambda r: (str(r["model"]), str(r["defense"]), str(r["adaptation"]), int(r["round"]),
                                   str(r.get("seed"))))
    dets = detectors(r for r in rows if ok(r))
    per_model = [_model_record(pool, key, grows, columns, dets) for key, grows in groups.items()]
    by_slot: dict[tuple, dict[str, float]] = defaultdict(dict)
    for rec in per_model:
        if rec["sr_final"] is not None:
            by_slot[(rec["model"], rec["adaptation"])][rec["defense"]] = rec["sr_final"]
    ranks = {slot: rank_desc(values) for slot, values in by_slot.items()}
    for rec in per_model:
        rec["rank"] = ranks.get((rec["model"], rec["adaptation"]), {}).get(rec["defense"])
    per_model.sort(key=order)

    overall_groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in per_model:
        overall_groups[(rec["defense"], rec["adaptation"])].append(rec)
    overall = sorted((_overall_record(pool, d, a, recs, columns) for (d, a), recs in overall_groups.items()),
                     key=order)
    reference = reference_of((r["defense"] for r in per_model), reference_defense)
    comparison = compare(pool, overall + per_model, reference) if reference else []
    return {"per_model": per_model, "overall": overall, "comparison": comparison, "errors": errors,
            "superseded": superseded, "columns": columns, "reference": reference}
