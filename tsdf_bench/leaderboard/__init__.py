"""Leaderboards from result rows: round 0 and after retraining side by side, per model and overall.

Input: row dicts as :meth:`tsdf_bench.harness.store.ResultsStore.rows` returns them (keys
``defense, model, adaptation, round, seed, run_id, status, error``, metric columns, provenance).

Rules (stated in every rendered header, tested in tests/test_leaderboard.py):

* **Rounds.** ``@0`` is the original model at inference time; ``@k`` the last retraining round
  ``k`` present for that (model, defense, adaptation).  Adaptations that do not retrain show
  only ``@0``.
* **Seeds.** Values are the mean over seeds; with more than one seed, ``mean ± std`` (sample
  standard deviation, ddof=1).  If one (defense, model, adaptation, round, seed) appears in
  several runs, the last row wins (rows come oldest run first) and the header counts the
  superseded rows.
* **Persistence** = SR_mask@k / SR_mask@0 of the seed means.  Undefined (shown as "—", ``None``
  in CSV/JSON) when SR_mask@0 = 0 (the defense never broke the original model, so there is
  nothing to persist) or when there is no retraining round.
* **Rank.** Per model and adaptation, defenses are ranked by their final SR_mask (@k if the
  adaptation retrains, else @0): the highest gets rank 1, ties share the average rank.  The
  overall table averages a defense's ranks over the models it was evaluated on (lower is better).
* **Overall** numbers are the mean over models of the per-model seed means.
* **Errors** are never dropped: a cell whose every seed failed shows "error", a partly failed one
  says how many failed, and every error row is listed with its message.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from tabulate import tabulate

from ..errors import TsdfBenchError

FORMATS = ("markdown", "csv", "latex", "json")
DEMO_NOTE = "demo-scale numbers, not the paper's"
KEY_COLUMNS = ("defense", "model", "adaptation", "round", "seed", "run_id", "status", "error")
METRIC_COLUMNS = ("l2_mask", "sr_mask", "l2", "sr_ruiz", "psnr_out", "ssim_out", "psnr_in", "ssim_in", "linf",
                  "l2_in", "det_f1", "crop_yield")
PROVENANCE_COLUMNS = ("config_hash", "versions", "device", "checkpoint_sha256", "perturbation_sha256", "git_commit",
                      "scale", "data")
# metrics shown at round 0 and at round k
ROUND_METRICS = ("sr_mask", "l2_mask", "ssim_out", "psnr_out", "sr_ruiz")
# metrics of the protected images themselves (taken at round 0, else the first round present)
IMAGE_METRICS = ("det_f1", "psnr_in", "ssim_in", "linf")
RULES = ("SR_mask: share of (image, target) pairs whose masked L2 > 0.05 (CMUA); @0: original model, "
         "@k: after the attacker's last retraining round k. Persistence = SR_mask@k / SR_mask@0 "
         "(— when SR_mask@0 = 0 or there is no retraining). Rank: per model and adaptation by final SR_mask "
         "(highest = 1), averaged over models; lower is better. Values: mean over seeds (± sample std if >1 seed); "
         "overall = mean over models.")


# -- row hygiene ---------------------------------------------------------------------------
def _finite(value):
    """JSON-safe scalar: NaN/inf floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _check_rows(rows) -> list[dict]:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TsdfBenchError(f"leaderboard row {i} is a {type(row).__name__}, expected a dict from ResultsStore.rows()")
        missing = [k for k in ("defense", "model", "adaptation", "round") if k not in row]
        if missing:
            raise TsdfBenchError(f"leaderboard row {i} lacks {missing}; rows must come from ResultsStore.rows() "
                                 "(keys defense, model, adaptation, round, seed, status ...)")
    return rows


def _dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the last row per (defense, model, adaptation, round, seed)."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row["defense"], row["model"], row["adaptation"], int(row["round"]), row.get("seed", 0))] = row
    return list(latest.values()), len(rows) - len(latest)


def _ok(row) -> bool:
    return (row.get("status") or "ok") == "ok"


def flat_rows(rows: Iterable[dict]) -> list[dict]:
    """One JSON-ready dict per row: keys, every metric (missing -> None), provenance, the rest.

    Sorted by model, defense, adaptation, seed, round.  NaN/inf become None; ``crop_yield`` is
    None in round 0.  Error rows are kept with ``status == "error"`` and their message.
    """
    out = []
    for row in _check_rows(rows):
        flat = {k: row.get(k) for k in KEY_COLUMNS}
        flat["status"] = flat["status"] or "ok"
        for k in METRIC_COLUMNS + PROVENANCE_COLUMNS:
            flat[k] = _finite(row.get(k))
        for k, v in row.items():
            if k not in flat:
                flat[k] = _finite(v)
        if int(flat["round"]) == 0:
            flat["crop_yield"] = None
        out.append(flat)
    out.sort(key=lambda r: (str(r["model"]), str(r["defense"]), str(r["adaptation"]), str(r.get("seed")),
                            int(r["round"]), str(r.get("run_id"))))
    return out


# -- aggregation ---------------------------------------------------------------------------
def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _mean(stats: dict | None) -> float | None:
    return None if stats is None else stats["mean"]


def persistence(sr_before: float | None, sr_after: float | None) -> float | None:
    """SR_mask(after) / SR_mask(before); None when before is 0 or missing, or after is missing."""
    if sr_before is None or sr_after is None or sr_before <= 0:
        return None
    return sr_after / sr_before


def _rank_desc(values: dict[str, float]) -> dict[str, float]:
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


def summarize(rows: Iterable[dict]) -> dict:
    """Aggregate rows into ``{"per_model": [...], "overall": [...], "errors": [...], "superseded": n}``.

    Each per-model record: model, defense, adaptation, k (last round or None), n_seeds, n_errors,
    status, ``<metric>@0`` / ``<metric>@k`` stats dicts (mean, std, n) for :data:`ROUND_METRICS`,
    ``crop_yield`` (@k), :data:`IMAGE_METRICS`, ``persistence`` (float or None), ``sr_final`` and
    ``rank``.  Overall records average the per-model means and carry ``avg_rank`` and ``n_models``.
    """
    rows, superseded = _dedupe(_check_rows(rows))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(str(row["model"]), str(row["defense"]), str(row["adaptation"]))].append(row)
    errors = sorted(({k: row.get(k) for k in KEY_COLUMNS} for row in rows if not _ok(row)),
                    key=lambda r: (str(r["model"]), str(r["defense"]), str(r["adaptation"]), int(r["round"]),
                                   str(r.get("seed"))))

    per_model = []
    for (model, defense, adaptation), grows in groups.items():
        ok = [r for r in grows if _ok(r)]
        rounds = sorted({int(r["round"]) for r in ok})
        k = max((r for r in rounds if r > 0), default=None)
        at = {rnd: [r for r in ok if int(r["round"]) == rnd] for rnd in rounds}
        rec = {"model": model, "defense": defense, "adaptation": adaptation, "k": k,
               "n_seeds": len({r.get("seed") for r in ok}), "n_errors": len(grows) - len(ok),
               "n_rows": len(grows)}
        for m in ROUND_METRICS:
            rec[f"{m}@0"] = _stats([_num(r.get(m)) for r in at.get(0, [])])
            rec[f"{m}@k"] = _stats([_num(r.get(m)) for r in at.get(k, [])]) if k is not None else None
        rec["crop_yield"] = _stats([_num(r.get("crop_yield")) for r in at.get(k, [])]) if k is not None else None
        image_round = 0 if 0 in at else (rounds[0] if rounds else None)
        for m in IMAGE_METRICS:
            rec[m] = _stats([_num(r.get(m)) for r in at.get(image_round, [])])
        rec["persistence"] = persistence(_mean(rec["sr_mask@0"]), _mean(rec["sr_mask@k"]))
        rec["sr_final"] = _mean(rec["sr_mask@k"]) if k is not None else _mean(rec["sr_mask@0"])
        rec["status"] = ("error" if not ok else "ok" if not rec["n_errors"]
                         else f"{rec['n_errors']} of {len(grows)} rows failed")
        per_model.append(rec)

    # ranks per (model, adaptation)
    by_slot: dict[tuple, dict[str, float]] = defaultdict(dict)
    for rec in per_model:
        if rec["sr_final"] is not None:
            by_slot[(rec["model"], rec["adaptation"])][rec["defense"]] = rec["sr_final"]
    ranks = {slot: _rank_desc(values) for slot, values in by_slot.items()}
    for rec in per_model:
        rec["rank"] = ranks.get((rec["model"], rec["adaptation"]), {}).get(rec["defense"])
    per_model.sort(key=_order)

    overall_groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in per_model:
        overall_groups[(rec["defense"], rec["adaptation"])].append(rec)
    overall = []
    for (defense, adaptation), recs in overall_groups.items():
        o = {"model": "(all)", "defense": defense, "adaptation": adaptation,
             "k": max((r["k"] for r in recs if r["k"] is not None), default=None),
             "n_models": len({r["model"] for r in recs if r["status"] != "error"}),
             "n_seeds": max(r["n_seeds"] for r in recs), "n_errors": sum(r["n_errors"] for r in recs),
             "n_rows": sum(r["n_rows"] for r in recs)}
        for col in [f"{m}@0" for m in ROUND_METRICS] + [f"{m}@k" for m in ROUND_METRICS] + ["crop_yield",
                                                                                               *IMAGE_METRICS]:
            o[col] = _stats([_mean(r[col]) for r in recs])
            if o[col] is not None:
                o[col]["std"] = None  # spread over models is not a seed spread: not shown
        o["persistence"] = persistence(_mean(o["sr_mask@0"]), _mean(o["sr_mask@k"]))
        model_ranks = [r["rank"] for r in recs if r["rank"] is not None]
        o["rank"] = sum(model_ranks) / len(model_ranks) if model_ranks else None
        o["ranked_models"] = len(model_ranks)
        o["sr_final"] = _mean(o["sr_mask@k"]) if o["k"] is not None else _mean(o["sr_mask@0"])
        failed = sum(r["status"] == "error" for r in recs)
        o["status"] = ("error" if failed == len(recs) else "ok" if not o["n_errors"]
                       else f"{o['n_errors']} of {o['n_rows']} rows failed")
        overall.append(o)
    overall.sort(key=_order)
    return {"per_model": per_model, "overall": overall, "errors": errors, "superseded": superseded}


def _order(rec):
    """Retraining ("retrain") first, then other adaptations by name; best rank first; errors last."""
    return (rec["model"], rec["adaptation"] != "retrain", rec["adaptation"],
            rec["rank"] if rec["rank"] is not None else math.inf, rec["defense"])


def _fmt_rank(rank: float | None, missing: str) -> str:
    if rank is None:
        return missing
    return str(int(rank)) if float(rank).is_integer() else f"{rank:.2f}"


# -- header --------------------------------------------------------------------------------
def make_header(rows: Iterable[dict], **overrides) -> dict:
    """Header fields from the rows' provenance: scale, data, config_hash (distinct values joined)."""
    rows = list(rows)
    header = {}
    for key in ("scale", "data", "config_hash"):
        values = sorted({str(r[key]) for r in rows if r.get(key) not in (None, "")})
        header[key] = ", ".join(values) if values else "unknown"
    runs = sorted({str(r["run_id"]) for r in rows if r.get("run_id")})
    header["runs"] = ", ".join(runs) if runs else "unknown"
    header.update({k: v for k, v in overrides.items() if v is not None})
    return header


def _complete_header(header: dict | None, rows: list[dict]) -> dict:
    header = dict(make_header(rows) if header is None else header)
    header.setdefault("title", "tsdf-bench leaderboard")
    for key in ("scale", "data", "config_hash"):
        header.setdefault(key, "unknown")
    if header["scale"] != "paper" and not header.get("note"):
        header["note"] = DEMO_NOTE
    return header


# -- rendering -----------------------------------------------------------------------------
def _fmt(stats: dict | float | None, digits: int, pm: str, missing: str) -> str:
    if stats is None:
        return missing
    if not isinstance(stats, dict):
        return f"{stats:.{digits}f}"
    text = f"{stats['mean']:.{digits}f}"
    if stats.get("std") is not None:
        text += f"{pm}{stats['std']:.{digits}f}"
    return text


DISPLAY = (  # (header, record key, digits)
    ("SR_mask@0", "sr_mask@0", 3), ("SR_mask@k", "sr_mask@k", 3), ("Persistence", "persistence", 2),
    ("L2_mask@0", "l2_mask@0", 4), ("L2_mask@k", "l2_mask@k", 4), ("SSIM_out@0", "ssim_out@0", 3),
    ("SSIM_out@k", "ssim_out@k", 3), ("Crop yield", "crop_yield", 3), ("Det F1", "det_f1", 3),
    ("PSNR_in", "psnr_in", 2), ("SSIM_in", "ssim_in", 3),
)


def _table(records: list[dict], overall: bool, pm: str, missing: str, text=lambda s: s):
    headers = ["Defense", "Adaptation", "Avg rank" if overall else "Rank", "k"]
    headers += [h for h, _, _ in DISPLAY] + (["Models"] if overall else ["Seeds"]) + ["Status"]
    body = []
    for rec in records:
        err = rec["status"] == "error"
        line = [text(rec["defense"]), text(rec["adaptation"]), _fmt_rank(rec["rank"], missing),
                missing if rec["k"] is None else str(rec["k"])]
        line += ["error" if err else _fmt(rec[key], digits, pm, missing) for _, key, digits in DISPLAY]
        line += [str(rec["n_models"] if overall else rec["n_seeds"]), text(rec["status"])]
        body.append(line)
    return headers, body


def _header_lines(header: dict, superseded: int) -> list[tuple[str, str]]:
    lines = [("scale", header["scale"]), ("data", header["data"]), ("config hash", header["config_hash"])]
    if header.get("runs"):
        lines.append(("runs", header["runs"]))
    if header.get("note"):
        lines.append(("note", header["note"]))
    if superseded:
        lines.append(("superseded", f"{superseded} rows replaced by newer runs of the same cell"))
    return lines


def _models(summary) -> list[str]:
    return sorted({r["model"] for r in summary["per_model"]})


def detection_table(rows: Iterable[dict]) -> tuple[list[str], list[list[str]]]:
    """Poisoning at a glance: per defense, each detector's recall and F1 on the protected eval
    images (round-0 rows; detection does not depend on the model, so rows are averaged), and the
    attacker's crop yield after retraining (mean over models)."""
    rows = [r for r in _dedupe(_check_rows(rows))[0] if _ok(r)]
    detectors = sorted({k[len("det_recall_"):] for r in rows for k in r if k.startswith("det_recall_")})
    headers = ["Defense"] + [f"{kind} {d}" for d in detectors for kind in ("Recall", "F1")] + ["Crop yield@k"]
    body = []
    for defense in sorted({str(r["defense"]) for r in rows}):
        mine = [r for r in rows if str(r["defense"]) == defense]
        r0 = [r for r in mine if int(r["round"]) == 0]
        line = [defense]
        for d in detectors:
            for key in (f"det_recall_{d}", f"det_f1_{d}"):
                line.append(_fmt(_mean(_stats([_num(r.get(key)) for r in r0])), 3, "", "—"))
        kmax = max((int(r["round"]) for r in mine), default=0)
        line.append(_fmt(_mean(_stats([_num(r.get("crop_yield")) for r in mine if int(r["round"]) == kmax and kmax > 0])),
                         3, "", "—"))
        body.append(line)
    return headers, body


def _render_markdown(summary, header, rows=()) -> str:
    out = [f"# {header['title']}", ""]
    for key, value in _header_lines(header, summary["superseded"]):
        out.append(f"- **{key}**: {value}" if key != "note" else f"- **{value}**")
    out += [f"- {RULES}", "", "## Overall (mean over models)", ""]
    h, b = _table(summary["overall"], True, " ± ", "—")
    out += [tabulate(b, headers=h, tablefmt="github", disable_numparse=True), ""]
    h, b = detection_table(rows)
    if b and len(h) > 2:
        out += ["## Poisoning: face detection on protected images (round 0) and the attacker's crop yield", "",
                tabulate(b, headers=h, tablefmt="github", disable_numparse=True), ""]
    for model in _models(summary):
        h, b = _table([r for r in summary["per_model"] if r["model"] == model], False, " ± ", "—")
        out += [f"## Model: {model}", "", tabulate(b, headers=h, tablefmt="github", disable_numparse=True), ""]
    if summary["errors"]:
        out += ["## Errors", ""]
        rows = [[e["defense"], e["model"], e["adaptation"], e["round"], e.get("seed"), e.get("run_id"),
                 (e.get("error") or "").replace("\n", " ").replace("|", "\\|")] for e in summary["errors"]]
        out += [tabulate(rows, headers=["Defense", "Model", "Adaptation", "Round", "Seed", "Run", "Error"],
                         tablefmt="github", disable_numparse=True), ""]
    return "\n".join(out)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _render_latex(summary, header) -> str:
    out = [f"% {header['title']}"]
    out += [f"% {k}: {v}" for k, v in _header_lines(header, summary["superseded"])]
    out += [f"% {RULES}"]
    note = f" ({latex_escape(header['note'])})" if header.get("note") else ""
    sections = [("Overall (mean over models)", summary["overall"], True)]
    sections += [(f"Model: {m}", [r for r in summary["per_model"] if r["model"] == m], False) for m in _models(summary)]
    for title, records, overall in sections:
        h, b = _table(records, overall, r" $\pm$ ", "--", text=latex_escape)
        h = [latex_escape(c) for c in h]
        out += [r"\begin{table}[t]", r"\centering", r"\scriptsize",
                rf"\caption{{{latex_escape(title)}; scale {latex_escape(header['scale'])}{note}}}",
                tabulate(b, headers=h, tablefmt="latex_raw", disable_numparse=True), r"\end{table}", ""]
    if summary["errors"]:
        out.append("% errors:")
        out += [f"% {e['defense']} / {e['model']} / {e['adaptation']} round {e['round']} seed {e.get('seed')}: "
                f"{(e.get('error') or '').splitlines()[0] if e.get('error') else ''}" for e in summary["errors"]]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ("model", "defense", "adaptation", "k", "rank", "sr_mask@0", "sr_mask@k", "persistence",
               "l2_mask@0", "l2_mask@k", "ssim_out@0", "ssim_out@k", "psnr_out@0", "psnr_out@k",
               "sr_ruiz@0", "sr_ruiz@k", "crop_yield", "det_f1", "psnr_in", "ssim_in", "linf")


def _render_csv(summary, header) -> str:
    """One line per (model or "(all)", defense, adaptation); mean and ``_std`` columns; header fields repeated."""
    buf = io.StringIO()
    fields = []
    for c in CSV_COLUMNS:
        fields.append(c)
        if c not in ("model", "defense", "adaptation", "k", "rank", "persistence"):
            fields.append(f"{c}_std")
    fields += ["n_seeds", "n_models", "n_errors", "status", "scale", "data", "config_hash", "note"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for rec in summary["overall"] + summary["per_model"]:
        line = {"model": rec["model"], "defense": rec["defense"], "adaptation": rec["adaptation"],
                "k": rec["k"], "rank": rec["rank"], "persistence": rec["persistence"],
                "n_seeds": rec["n_seeds"], "n_models": rec.get("n_models", 1), "n_errors": rec["n_errors"],
                "status": rec["status"], "scale": header["scale"], "data": header["data"],
                "config_hash": header["config_hash"], "note": header.get("note", "")}
        for c in CSV_COLUMNS:
            if f"{c}_std" in fields:
                stats = rec.get(c)
                line[c] = None if stats is None else stats["mean"]
                line[f"{c}_std"] = None if stats is None else stats["std"]
        writer.writerow({k: ("" if v is None else v) for k, v in line.items()})
    return buf.getvalue()


def _render_json(rows, header) -> str:
    flat = flat_rows(_dedupe(rows)[0])  # the rows the tables use: a superseded row stays in the results store
    if header.get("note"):
        for row in flat:
            row.setdefault("note", header["note"])
    return json.dumps(flat, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


def render(rows: Iterable[dict], fmt: str = "markdown", header: dict | None = None) -> str:
    """Render a leaderboard of ``rows`` as ``markdown`` (GitHub), ``csv``, ``latex`` or ``json``.

    ``header``: ``scale``, ``data``, ``config_hash`` (and optionally ``title``, ``note``, ``runs``);
    None derives it from the rows' provenance.  When the scale is not ``"paper"`` the note
    "demo-scale numbers, not the paper's" is added.  JSON is :func:`flat_rows` (one object per
    row the tables use, each carrying the note: a row superseded by a newer run of the same cell
    is left out, as in the tables); the other formats show :func:`summarize`'s tables.
    """
    if fmt not in FORMATS:
        raise TsdfBenchError(f"unknown leaderboard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows = _check_rows(rows)
    header = _complete_header(header, rows)
    if fmt == "json":
        return _render_json(rows, header)
    summary = summarize(rows)
    if fmt == "markdown":
        return _render_markdown(summary, header, rows)
    return {"csv": _render_csv, "latex": _render_latex}[fmt](summary, header)


EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex", "json": "json"}


def write_leaderboards(rows: Iterable[dict], out_dir, header: dict | None = None) -> dict[str, Path]:
    """Write ``leaderboard.md/.csv/.tex/.json`` into ``out_dir``; returns ``{format: path}``."""
    rows = _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, ext in EXTENSIONS.items():
        path = out_dir / f"leaderboard.{ext}"
        path.write_text(render(rows, fmt, header), encoding="utf-8")
        paths[fmt] = path
    return paths
