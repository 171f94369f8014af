"""Rendering: :func:`.aggregate.summarize`'s records as Markdown, CSV, LaTeX and JSON.

Rates are shown as ``value [lo, hi] (successes/trials)`` (95% interval; ``n=trials`` when only the
total is known), means as ``value ± std`` (std over seeds, only with more than one), differences
as ``+d [lo, hi]``; CSV and JSON keep the numbers.
"""
from __future__ import annotations

import csv
import io
import json

from tabulate import tabulate

from .aggregate import FINAL_RATES, Pooler, check_rows, dedupe, detection_rows, detectors, ok, value

MISSING = {"markdown": "—", "latex": "--"}
PM = {"markdown": " ± ", "latex": r" $\pm$ "}


# -- cells ---------------------------------------------------------------------------------
def fmt_number(v: float | None, missing: str = "—", sign: bool = False) -> str:
    """3 decimals (4 below 0.01, 2 from 10 up); a sign when asked."""
    if v is None:
        return missing
    a = abs(v)
    digits = 2 if a >= 10 else 3 if a >= 0.01 or a == 0 else 4
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _interval_text(stat: dict, spec: str) -> str:
    """`` [lo, hi]``, or why there is none (one source photo: stats.MIN_PHOTOS), or nothing."""
    if stat.get("lo") is not None:
        return f" [{stat['lo']:{spec}}, {stat['hi']:{spec}}]"
    return " [no interval: 1 photo]" if stat.get("photos") == 1 else ""


def fmt_stat(stat, missing: str = "—", pm: str = " ± ") -> str:
    """One cell: a rate ``0.420 [0.300, 0.550] (50/120)``, a mean ``0.800 ± 0.014``, a difference
    ``+0.100 [-0.020, +0.210]`` (rates and differences: 3 decimals), or a plain number."""
    if stat is None:
        return missing
    if not isinstance(stat, dict):
        return fmt_number(stat, missing)
    kind, v = stat.get("kind"), stat.get("value")
    if v is None:
        return missing
    if kind == "rate":
        text = f"{v:.3f}" + _interval_text(stat, ".3f")
        if stat.get("successes") is not None and stat.get("pairs") is not None:
            text += f" ({stat['successes']}/{stat['pairs']})"
        elif stat.get("pairs") is not None:
            text += f" n={stat['pairs']}"
        return text
    if kind == "diff":
        return f"{v:+.3f}" + _interval_text(stat, "+.3f")
    text = fmt_number(v, missing)
    if stat.get("std") is not None:
        text += f"{pm}{fmt_number(stat['std'], missing)}"
    return text


def fmt_rank(rank: float | None, missing: str) -> str:
    if rank is None:
        return missing
    return str(int(rank)) if float(rank).is_integer() else f"{rank:.2f}"


def _dropped(rec, missing):
    if rec.get("eval_dropped") is None:
        return missing
    return f"{rec['eval_dropped']}/{rec['eval_total']}"


def _excludes(d, missing):
    if d is None or d.get("lo") is None:
        return missing
    return "yes" if d["excludes_zero"] else "no"


def _counted_diff(d, a, b, missing, label=None) -> str:
    """A difference with both sides' counts: ``+0.100 [-0.020, +0.210] (40/72 vs 33/72)``."""
    if d is None:
        return missing
    text = fmt_stat(d, missing)
    if all(s and s.get("successes") is not None for s in (a, b)):
        text += f" ({a['successes']}/{a['pairs']} vs {b['successes']}/{b['pairs']})"
    return f"{label}: {text}" if label else text


def _table_rate(stat, missing="—") -> str:
    """A rate with its interval and count; a mean of old rows (no counts) as its bare value."""
    return fmt_stat(stat, missing) if stat and stat.get("kind") == "rate" else fmt_number(value(stat), missing)


# -- tables (headers, body) ----------------------------------------------------------------
# (header, getter(rec, missing, pm)) of the main table: the harness's own columns
MAIN = (
    ("Final SR", lambda r, m, pm: fmt_stat(r["final"], m, pm)),
    ("Crop yield", lambda r, m, pm: fmt_stat(r["crop_yield"], m, pm)),
    ("Persistence", lambda r, m, pm: fmt_number(r["persistence"], m)),
    ("SR_mask@0", lambda r, m, pm: fmt_stat(r["sr_mask@0"], m, pm)),
    ("SR_mask@k (retrained)", lambda r, m, pm: fmt_stat(r["sr_mask@k"], m, pm)),
    ("SR_mask_ctrl@k", lambda r, m, pm: fmt_stat(r["sr_mask_ctrl@k"], m, pm)),
    ("Adaptation gain", lambda r, m, pm: fmt_stat(r["adaptation_gain"], m, pm)),
    ("Eval dropped", lambda r, m, pm: _dropped(r, m)),
)


def main_table(records: list[dict], overall: bool, missing="—", pm=" ± ", text=str):
    headers = ["Avg rank" if overall else "Rank", "Defense", "Adaptation", "k"] + [h for h, _ in MAIN]
    headers += ["Models" if overall else "Seeds", "Status"]
    body = []
    for rec in records:
        err = rec["status"] == "error"
        line = [fmt_rank(rec["rank"], missing), text(rec["defense"]), text(rec["adaptation"]),
                missing if rec["k"] is None else str(rec["k"])]
        line += ["error" if err else get(rec, missing, pm) for _, get in MAIN]  # numbers: nothing to escape
        line += [str(rec["n_models"] if overall else rec["n_seeds"]), text(rec["status"])]
        body.append(line)
    return headers, body


def metrics_table(records: list[dict], columns: list[str], missing="—", pm=" ± ", text=str):
    """The metric plugins' columns: one line per (defense, adaptation, round 0 / round k)."""
    headers = ["Defense", "Adaptation", "Round"] + [text(c) for c in columns]
    body = []
    for rec in records:
        for label, suffix in (("0", "@0"), (f"k={rec['k']}", "@k")):
            if suffix == "@k" and rec["k"] is None:
                continue
            cells = ["error" if rec["status"] == "error" else fmt_stat(rec["metrics"].get(c + suffix), missing, pm)
                     for c in columns]
            body.append([text(rec["defense"]), text(rec["adaptation"]), label] + cells)
    return headers, body


def comparison_table(lines: list[dict], missing="—", text=str):
    headers = ["Model", "Adaptation", "Defense", "Δ final SR", "SR excl. 0", "Δ persistence", "Persistence excl. 0",
               "Photos", "Δ crop yield@k", "Crop yield excl. 0", "Δ attacker's recall@0", "Recall excl. 0", "Status"]
    body = []
    for c in lines:
        photos = next((d["photos"] for d in (c["d_sr_final"], c["d_persistence"]) if d and d.get("photos")), None)
        body.append([text(c["model"]), text(c["adaptation"]), text(c["defense"]),
                     text(fmt_stat(c["d_sr_final"], missing)), _excludes(c["d_sr_final"], missing),
                     text(fmt_stat(c["d_persistence"], missing)), _excludes(c["d_persistence"], missing),
                     missing if photos is None else str(photos),
                     text(_counted_diff(c.get("d_crop_yield"), c.get("crop_yield_reference"), c.get("crop_yield_other"),
                                        missing)), _excludes(c.get("d_crop_yield"), missing),
                     text(_counted_diff(c.get("d_det_recall"), c.get("det_recall_reference"), c.get("det_recall_other"),
                                        missing, c.get("detector"))), _excludes(c.get("d_det_recall"), missing),
                     text(c["status"])])
    return headers, body


def detection_table(rows) -> tuple[list[str], list[list[str]]]:
    """Poisoning at a glance: per defense, each detector's recall and F1 on the protected eval
    images and the attacker's crop yield after retraining, as rates ``value [lo, hi] (hits/trials)``.
    Detection does not depend on the model: one round-0 row per seed, seeds pooled (face boxes,
    bootstrap over source photos).  The crop yield pools every model's and seed's collected photos
    at the last round.  Rows without counts (older runs) give the bare mean."""
    rows = [r for r in dedupe(check_rows(rows))[0] if ok(r)]
    dets = detectors(rows)
    headers = ["Defense"] + [f"{kind} {d}" for d in dets for kind in ("Recall", "F1")] + ["Crop yield@k"]
    body, pool = [], Pooler()
    per_seed = detection_rows(rows)
    for defense in sorted({str(r["defense"]) for r in rows}):
        mine = [r for r in rows if str(r["defense"]) == defense]
        r0 = [r for r in per_seed if str(r["defense"]) == defense]
        line = [defense]
        for d in dets:
            for key in (f"det_recall_{d}", f"det_f1_{d}"):
                line.append(_table_rate(pool.column(r0, key)))
        kmax = max((int(r["round"]) for r in mine), default=0)
        at_k = [r for r in mine if kmax > 0 and int(r["round"]) == kmax]
        line.append(_table_rate(pool.column(at_k, "crop_yield")))
        body.append(line)
    return headers, body


# -- documents -----------------------------------------------------------------------------
def header_lines(header: dict, superseded: int) -> list[tuple[str, str]]:
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


def _md(headers, body) -> str:
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _comparison_title(summary) -> str:
    return (f"{summary['reference']} against each other defense (reference minus other; 95% paired bootstrap "
            "over source photos)")


def render_markdown(summary, header, rules: str, rows=(), only_comparison: bool = False) -> str:
    out = [f"# {header['title']}", ""]
    for key, val in header_lines(header, summary["superseded"]):
        out.append(f"- **{key}**: {val}" if key != "note" else f"- **{val}**")
    out += [f"- {rules}", ""]
    if not only_comparison:
        out += ["## Overall (all models pooled)", "", _md(*main_table(summary["overall"], True)), ""]
    if summary["comparison"]:
        out += [f"## {_comparison_title(summary)}", "", _md(*comparison_table(summary["comparison"])), ""]
    if only_comparison:
        return "\n".join(out)
    h, b = detection_table(rows)
    if b and len(h) > 2:
        out += ["## Poisoning: face detection on protected images (round 0) and the attacker's crop yield", "",
                _md(h, b), ""]
    from .field import field_tables

    for title, headers, body in field_tables(rows):
        out += [f"## {title}", "", _md(headers, body), ""]
    if summary["columns"]:
        out += ["## Metrics (all models pooled)", "", _md(*metrics_table(summary["overall"], summary["columns"])), ""]
    for model in _models(summary):
        recs = [r for r in summary["per_model"] if r["model"] == model]
        out += [f"## Model: {model}", "", _md(*main_table(recs, False)), ""]
        if summary["columns"]:
            out += [f"### Metrics: {model}", "", _md(*metrics_table(recs, summary["columns"])), ""]
    if summary["errors"]:
        errs = [[e["defense"], e["model"], e["adaptation"], e["round"], e.get("seed"), e.get("run_id"),
                 (e.get("error") or "").replace("\n", " ").replace("|", "\\|")] for e in summary["errors"]]
        out += ["## Errors", "", _md(["Defense", "Model", "Adaptation", "Round", "Seed", "Run", "Error"], errs), ""]
    return "\n".join(out)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _latex_table(title, headers, body, header) -> list[str]:
    note = f" ({latex_escape(header['note'])})" if header.get("note") else ""
    headers = [latex_escape(h).replace("Δ", r"$\Delta$") for h in headers]
    return [r"\begin{table}[t]", r"\centering", r"\scriptsize",
            rf"\caption{{{latex_escape(title)}; scale {latex_escape(header['scale'])}{note}}}",
            tabulate(body, headers=headers, tablefmt="latex_raw", disable_numparse=True), r"\end{table}", ""]


def render_latex(summary, header, rules: str, only_comparison: bool = False, rows=()) -> str:
    miss, pm, esc = MISSING["latex"], PM["latex"], latex_escape
    out = [f"% {header['title']}"] + [f"% {k}: {v}" for k, v in header_lines(header, summary["superseded"])]
    out += [f"% {rules}"]
    if not only_comparison:
        out += _latex_table("Overall (all models pooled)", *main_table(summary["overall"], True, miss, pm, esc),
                            header)
    if summary["comparison"]:
        out += _latex_table(_comparison_title(summary), *comparison_table(summary["comparison"], miss, esc), header)
    if only_comparison:
        return "\n".join(out) + "\n"
    from .field import field_tables

    for title, headers, body in field_tables(rows):
        out += _latex_table(title, headers, [[esc(c) for c in line] for line in body], header)
    if summary["columns"]:
        out += _latex_table("Metrics (all models pooled)",
                            *metrics_table(summary["overall"], summary["columns"], miss, pm, esc), header)
    for model in _models(summary):
        recs = [r for r in summary["per_model"] if r["model"] == model]
        out += _latex_table(f"Model: {model}", *main_table(recs, False, miss, pm, esc), header)
        if summary["columns"]:
            out += _latex_table(f"Metrics: {model}", *metrics_table(recs, summary["columns"], miss, pm, esc), header)
    if summary["errors"]:
        out.append("% errors:")
        out += [f"% {e['defense']} / {e['model']} / {e['adaptation']} round {e['round']} seed {e.get('seed')}: "
                f"{(e.get('error') or '').splitlines()[0] if e.get('error') else ''}" for e in summary["errors"]]
    return "\n".join(out) + "\n"


# -- CSV and JSON (numbers) ----------------------------------------------------------------
STAT_PARTS = ("", "_lo", "_hi", "_hits", "_pairs", "_std")


def _stat_fields(line: dict, key: str, stat) -> None:
    stat = stat or {}
    line[key] = stat.get("value")
    line[f"{key}_lo"], line[f"{key}_hi"] = stat.get("lo"), stat.get("hi")
    line[f"{key}_hits"], line[f"{key}_pairs"] = stat.get("successes"), stat.get("pairs")
    line[f"{key}_std"] = stat.get("std")


def _header_fields(header) -> dict:
    return {"scale": header["scale"], "data": header["data"], "config_hash": header["config_hash"],
            "note": header.get("note", "")}


def _csv(lines: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for line in lines for k in line))
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        writer.writerow({k: ("" if v is None else v) for k, v in line.items()})
    return buf.getvalue()


SUMMARY_STATS = ("final", "crop_yield", "sr_mask@0", *(f"{c}@k" for c in FINAL_RATES), "adaptation_gain")


def summary_lines(summary, header) -> list[dict]:
    """One dict per (model or "(all)", defense, adaptation): numbers only (see :data:`STAT_PARTS`)."""
    lines = []
    for rec in summary["overall"] + summary["per_model"]:
        line = {k: rec.get(k) for k in ("model", "defense", "adaptation", "k", "rank", "final_basis", "persistence")}
        for key in SUMMARY_STATS:
            _stat_fields(line, key, rec.get(key))
        gain = rec.get("adaptation_gain") or {}
        line["adaptation_gain_excludes_zero"] = gain.get("excludes_zero") if gain.get("lo") is not None else None
        line.update(eval_dropped=rec.get("eval_dropped"), eval_total=rec.get("eval_total"),
                    attacker_detector=rec.get("attacker_detector"))
        for key, stat in (rec.get("detection") or {}).items():  # per detector, round 0
            _stat_fields(line, f"{key}@0", stat)
        for c in summary["columns"]:
            for suffix in ("@0", "@k"):
                _stat_fields(line, c + suffix, rec["metrics"].get(c + suffix))
        line.update(n_seeds=rec["n_seeds"], n_models=rec.get("n_models", 1), n_errors=rec["n_errors"],
                    status=rec["status"], **_header_fields(header))
        lines.append(line)
    return lines


def comparison_lines(summary, header) -> list[dict]:
    """One dict per comparison line: numbers, the intervals and whether they exclude 0."""
    lines = []
    for c in summary["comparison"]:
        line = {k: c[k] for k in ("model", "adaptation", "reference", "defense", "k", "basis", "sr_final_reference",
                                  "sr_final_other", "persistence_reference", "persistence_other")}
        for key in ("d_sr_final", "d_persistence", "d_crop_yield", "d_det_recall"):
            d = c.get(key) or {}
            line.update({key: d.get("value"), f"{key}_lo": d.get("lo"), f"{key}_hi": d.get("hi"),
                         f"{key}_excludes_zero": d.get("excludes_zero") if d.get("lo") is not None else None,
                         f"{key}_photos": d.get("photos")})
        line["detector"] = c.get("detector")
        for key in ("crop_yield_reference", "crop_yield_other", "det_recall_reference", "det_recall_other"):
            _stat_fields(line, key, c.get(key))
            line.pop(f"{key}_std")
        line.update(status=c["status"], **_header_fields(header))
        lines.append(line)
    return lines


def render_csv(summary, header, only_comparison: bool = False) -> str:
    return _csv(comparison_lines(summary, header) if only_comparison else summary_lines(summary, header))


def render_comparison_json(summary, header) -> str:
    return json.dumps(comparison_lines(summary, header), indent=2, allow_nan=False) + "\n"


def render_rows_json(flat: list[dict], header) -> str:
    if header.get("note"):
        for row in flat:
            row.setdefault("note", header["note"])
    return json.dumps(flat, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"

