"""Leaderboards from result rows: round 0 and after retraining side by side, per model and overall.

Input: row dicts as :meth:`tsdf_bench.harness.store.ResultsStore.rows` returns them (keys
``defense, model, adaptation, round, seed, run_id, status, error``, metric columns, the harness's
rate columns with their photo counts, provenance).  Aggregation (:mod:`.aggregate`) is separate
from rendering (:mod:`.render`); the metric columns come from the metric plugins (:mod:`.columns`).

Rules (stated in every rendered header as :data:`RULES`, tested in tests/test_leaderboard.py):

* **Rounds.** ``@0`` is the original model at inference time; ``@k`` the last retraining round
  ``k`` present for that (model, defense, adaptation).  ``SR_mask@k`` is scored against the
  retrained model, ``SR_mask_ctrl@k`` against the clean-retraining control, and
  ``SR_mask_worst@k`` against the attacker's best option (whichever of the original and the
  retrained model the protection disrupts less).
* **Seeds.** A rate pools the ``{photo: [successes, trials]}`` counts of every seed and shows
  ``rate [lo, hi] (successes/trials)``: a 95% cluster bootstrap over source photos
  (:func:`tsdf_bench.stats.rate`).  Rates are SR_mask (trials: (image, target) pairs), the
  detection recall / precision / F1 per detector (face boxes; detection depends on the defense
  and seed only, so one round-0 row per seed) and the crop yield (the attacker's collected photos).
  Rows without counts (older runs) show the bare value, without an interval.  Other values are
  the mean over seeds (``± sample std`` with more than one).  If one (defense, model,
  adaptation, round, seed) appears in several runs, the last row wins (rows come oldest run
  first) and the header counts the superseded rows.
* **Final SR** = ``SR_mask_worst@k`` for an adaptation that retrains (``SR_mask@k`` for rows
  measured before the attacker's best option existed), ``SR_mask@0`` otherwise.  **Persistence**
  = Final SR / SR_mask@0; undefined ("—", ``None`` in CSV/JSON) when SR_mask@0 = 0 or there is
  no retraining round.  **Adaptation gain** = SR_mask_ctrl@k - SR_mask@k (what retraining on
  the protected photos specifically removed), with a paired bootstrap interval.
* **Rank.** Per model and adaptation by Final SR (highest = 1, ties share the average rank), shown
  beside the attacker's crop yield; the overall table averages a defense's ranks over models.
* **Overall** rates pool the counts of every model (a photo's pairs of all models go together);
  other overall values are the mean over models.
* **Comparison.** The reference defense (``reference_defense``, default ``tsdf`` when present)
  minus each other defense, per model and adaptation and pooled: the difference in Final SR and
  in persistence with a paired bootstrap interval over the photos both were measured on
  (:func:`tsdf_bench.stats.paired_difference`), and whether it excludes 0; likewise the crop yield
  at k and the recall of the attacker's detector at round 0, with both sides' counts.
* **Errors** are never dropped: a cell whose every seed failed shows "error", a partly failed one
  says how many failed, and every error row is listed with its message.
"""
from __future__ import annotations

import csv
import json

from pathlib import Path
from typing import Iterable

from ..errors import TsdfBenchError
from .aggregate import check_rows, dedupe, flat_rows, persistence, summarize
from .columns import KEY_COLUMNS, PROVENANCE_COLUMNS, declared_columns, registry_columns, shown_columns
from .render import (detection_table, fmt_stat, latex_escape, render_comparison_json, render_csv, render_latex,
                     render_markdown, render_rows_json)

__all__ = ["DEMO_NOTE", "FORMATS", "RULES", "KEY_COLUMNS", "PROVENANCE_COLUMNS", "declared_columns",
           "detection_table", "flat_rows", "fmt_stat", "latex_escape", "make_header", "persistence",
           "registry_columns", "render", "shown_columns", "summarize", "write_leaderboards"]

FORMATS = ("markdown", "csv", "latex", "json")
TABLES = ("leaderboard", "comparison")
DEMO_NOTE = "demo-scale numbers, not the paper's"
RULES = ("SR_mask: share of (image, target) pairs whose masked L2 > 0.05 (CMUA); @0: original model; @k: after "
         "the attacker's last retraining round k, scored against the retrained model (SR_mask@k), the "
         "clean-retraining control (SR_mask_ctrl@k) and the attacker's best option of original and retrained "
         "model (SR_mask_worst@k; a tie keeps the retrained one). Rates (SR_mask: pairs; detection: face boxes; "
         "crop yield: collected photos): seeds pooled, 'rate [lo, hi] (successes/trials)' with a 95% cluster "
         "bootstrap over source photos; other values: mean over seeds (± sample std if >1 seed). Final SR = "
         "SR_mask_worst@k if the adaptation retrains, else SR_mask@0. Persistence = Final SR / SR_mask@0 "
         "(— when SR_mask@0 = 0 or there is no retraining). Adaptation gain = SR_mask_ctrl@k - SR_mask@k. "
         "Rank: per model and adaptation by Final SR (highest = 1), averaged over models; lower is better. "
         "Overall: rates pool every model's photo counts (detection, the same for every model, is not added up), "
         "other values are the mean over models. Comparison: reference minus other, paired bootstrap over "
         "shared photos. Errors are listed, never dropped.")


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


# -- entry points --------------------------------------------------------------------------
def _render(rows, summary, fmt, header, table, metric_columns, registry) -> str:
    comparison = table == "comparison"
    if fmt == "json":
        if comparison:
            return render_comparison_json(summary, header)
        # the rows the tables use: a superseded row stays in the results store
        return render_rows_json(flat_rows(dedupe(rows)[0], metric_columns, registry), header)
    if fmt == "markdown":
        return render_markdown(summary, header, RULES, rows, only_comparison=comparison)
    if fmt == "latex":
        return render_latex(summary, header, RULES, only_comparison=comparison, rows=rows)
    return render_csv(summary, header, only_comparison=comparison)


def _check(fmt, table):
    if fmt not in FORMATS:
        raise TsdfBenchError(f"unknown leaderboard format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if table not in TABLES:
        raise TsdfBenchError(f"unknown leaderboard table {table!r}; choose one of {', '.join(TABLES)}")


def render(rows: Iterable[dict], fmt: str = "markdown", header: dict | None = None, *, metric_columns=None,
           registry=None, reference_defense: str | None = None, table: str = "leaderboard") -> str:
    """Render a leaderboard of ``rows`` as ``markdown`` (GitHub), ``csv``, ``latex`` or ``json``.

    ``header``: ``scale``, ``data``, ``config_hash`` (and optionally ``title``, ``note``, ``runs``);
    None derives it from the rows' provenance.  When the scale is not ``"paper"`` the note
    "demo-scale numbers, not the paper's" is added.  ``metric_columns``: the metric columns to
    show (names, or ``{metric: columns}``); None asks ``registry`` (default: the process's
    registry) for the columns of the metrics the rows name, else of every registered metric.
    ``reference_defense``: the comparison's reference (default ``"tsdf"`` when present).

    ``table="leaderboard"``: Markdown and LaTeX hold every table (overall, comparison,
    detection, per model, metrics, errors); CSV has one line per (model or "(all)", defense,
    adaptation); JSON is :func:`flat_rows` (one object per row the tables use, each carrying the
    note).  ``table="comparison"``: the comparison alone, in any format.
    """
    _check(fmt, table)
    rows = check_rows(rows)
    header = _complete_header(header, rows)
    summary = None
    if not (fmt == "json" and table == "leaderboard"):
        summary = summarize(rows, metric_columns, registry, reference_defense)
    return _render(rows, summary, fmt, header, table, metric_columns, registry)


EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex", "json": "json"}


def write_leaderboards(rows: Iterable[dict], out_dir, header: dict | None = None, *, metric_columns=None,
                       registry=None, reference_defense: str | None = None) -> dict[str, Path]:
    """Write ``leaderboard.md/.csv/.tex/.json`` into ``out_dir``, and ``comparison.csv/.json``
    when there is a comparison (its Markdown and LaTeX are inside ``leaderboard.md/.tex``).

    Returns ``{format: path}`` plus ``comparison_csv`` / ``comparison_json``.  The rows are
    aggregated once for every file.
    """
    rows = check_rows(rows)
    header = _complete_header(header, rows)
    summary = summarize(rows, metric_columns, registry, reference_defense)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, ext in EXTENSIONS.items():
        path = out_dir / f"leaderboard.{ext}"
        path.write_text(_render(rows, summary, fmt, header, "leaderboard", metric_columns, registry), encoding="utf-8")
        paths[fmt] = path
    from .field import field_lines

    for name, lines in field_lines(rows).items():  # PDB's ROB and TE, when the rows have them
        if lines:
            paths[f"{name}_json"] = out_dir / f"{name}.json"
            paths[f"{name}_json"].write_text(json.dumps(lines, indent=2, default=str) + "\n", encoding="utf-8")
            paths[f"{name}_csv"] = out_dir / f"{name}.csv"
            with paths[f"{name}_csv"].open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for x in lines for k in x)),
                                        lineterminator="\n")
                writer.writeheader()
                writer.writerows(lines)
    if summary["comparison"]:
        for fmt in ("csv", "json"):
            path = out_dir / f"comparison.{EXTENSIONS[fmt]}"
            path.write_text(_render(rows, summary, fmt, header, "comparison", metric_columns, registry),
                            encoding="utf-8")
            paths[f"comparison_{fmt}"] = path
    return paths
