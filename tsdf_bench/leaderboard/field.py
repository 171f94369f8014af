"""The Proactive Defense Benchmark's scores from stored rows: ROB (robustness) and TE (transferability).

The formulas are :mod:`tsdf_bench.field_scores`; this module picks the cells they need:

* **ROB** per (defense, model): the baseline is the round-0 cell of an adaptation that does not
  transform its input (``purifies`` false in the row), the transformed results are the round-0
  cells of the purification adaptations (``jpeg``, ``blur``, ``noise``, ``salt-pepper``,
  ``resize`` and their sweep variants, ``purifies`` true), each a mean over seeds.
* **TE** per (defense, source model): the ``[transfer]`` variants ``<defense>-from-<source>``
  (``transfer_of`` in the row) measured at round 0 on every model; the white-box result of a
  target is the variant fitted on that target alone, as in PDB.

Quality metrics are those of ``SUITE_METRICS`` the rows have (``l2``: PDB's mse; ``lpips``), the
identity term is ``cidr`` when the ``identity`` metric ran.  BRISQUE is not computed (its model
would be downloaded), so the scores are PDB's formulas over fewer terms: the table says which.
"""
from __future__ import annotations

from collections import defaultdict

from ..field_scores import SUITE_METRICS, rob_per_transform, rob_score, te_matrix, te_scores
from .aggregate import num, ok


def _means(rows: list[dict], columns) -> dict:
    out = {}
    for c in columns:
        values = [num(r.get(c)) for r in rows]
        values = [v for v in values if v is not None]
        out[c] = sum(values) / len(values) if values else None
    return out


def _terms(rows: list[dict]) -> tuple[tuple, str | None]:
    quality = tuple(c for c in SUITE_METRICS if any(num(r.get(c)) is not None for r in rows))
    identity = "cidr" if any(num(r.get("cidr")) is not None for r in rows) else None
    return quality, identity


def robustness(rows) -> list[dict]:
    """One line per (defense, model) that has both a baseline and at least one transform."""
    rows = [r for r in rows if ok(r) and int(r.get("round", 0)) == 0 and r.get("purifies") is not None]
    quality, identity = _terms(rows)
    base, moved = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (str(r["defense"]), str(r["model"]))
        if r["purifies"]:
            moved[key][str(r["adaptation"])].append(r)
        else:
            base[key].append(r)
    columns = (*quality, *((identity,) if identity else ()))
    lines = []
    for key in sorted(set(base) & set(moved)):
        baseline = _means(base[key], columns)
        transformed = {a: _means(rs, columns) for a, rs in sorted(moved[key].items())}
        lines.append({"defense": key[0], "model": key[1],
                      "rob": rob_score(baseline, transformed, metrics=quality, id_metric=identity),
                      "per_transform": rob_per_transform(baseline, transformed, metrics=quality, id_metric=identity),
                      "terms": [*quality, *([identity] if identity else [])]})
    return lines


def transferability(rows) -> tuple[list[dict], dict]:
    """``(lines, matrices)``: TE per (defense, source) and the normalised source x target matrix
    per (defense, adaptation)."""
    rows = [r for r in rows if ok(r) and int(r.get("round", 0)) == 0 and r.get("transfer_of")
            and not r.get("purifies")]
    quality, identity = _terms(rows)
    columns = (*quality, *((identity,) if identity else ()))
    cells = defaultdict(list)
    for r in rows:
        source = (r.get("fit_models") or [None])[0]
        cells[(str(r["transfer_of"]), str(r["adaptation"]), source, str(r["model"]))].append(r)
    lines, matrices = [], {}
    for d, a in sorted({(k[0], k[1]) for k in cells}):
        measured = {(s, t): _means(rs, columns) for (dd, aa, s, t), rs in cells.items() if (dd, aa) == (d, a)}
        white = {t: m for (s, t), m in measured.items() if s == t}
        matrices[(d, a)] = te_matrix(white, measured, metrics=quality, id_metric=identity)
        scores = te_scores(white, measured, metrics=quality, id_metric=identity)
        for source, score in sorted(scores.items(), key=lambda item: str(item[0])):
            lines.append({"defense": d, "adaptation": a, "source": source, **score,
                          "terms": [*quality, *([identity] if identity else [])]})
    return lines, matrices


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def field_tables(rows) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, headers, body)`` of the ROB and TE tables (empty when the rows have neither)."""
    out = []
    rob = robustness(rows)
    if rob:
        transforms = list(dict.fromkeys(t for line in rob for t in line["per_transform"]))
        body = [[line["defense"], line["model"], _fmt(line["rob"]),
                 *(_fmt(line["per_transform"].get(t)) for t in transforms)] for line in rob]
        terms = ", ".join(rob[0]["terms"])
        out.append((f"Robustness (PDB's ROB over {len(transforms)} transforms; terms: {terms}; 1 = the "
                    "protection survives every transform)", ["Defense", "Model", "ROB", *transforms], body))
    te, matrices = transferability(rows)
    if te:
        terms = ", ".join(te[0]["terms"])
        body = [[line["defense"], line["adaptation"], str(line["source"]), _fmt(line["te"]),
                 str(line["n_targets_te"])] for line in te]
        out.append((f"Transferability (PDB's TE; terms: {terms}; black-box result / white-box result, "
                    "mean over the other targets)", ["Defense", "Adaptation", "Source", "TE", "Targets"], body))
        for (d, a), matrix in matrices.items():
            sources = sorted({s for s, _ in matrix}, key=str)
            targets = sorted({t for _, t in matrix}, key=str)
            body = [[str(s), *(_fmt(matrix.get((s, t))) for t in targets)] for s in sources]
            out.append((f"TE matrix: {d} ({a}); rows: fitted on, columns: measured on", ["Source", *targets], body))
    return out


def field_lines(rows) -> dict[str, list[dict]]:
    """Numbers for CSV/JSON: ``{"robustness": [...], "transfer": [...]}`` (empty lists when absent)."""
    rob = [{"defense": line["defense"], "model": line["model"], "rob": line["rob"],
            **{f"rob_{t}": v for t, v in line["per_transform"].items()}, "terms": "+".join(line["terms"])}
           for line in robustness(rows)]
    te, matrices = transferability(rows)
    te_rows = [{k: (("+".join(v)) if k == "terms" else v) for k, v in line.items()} for line in te]
    te_rows += [{"defense": d, "adaptation": a, "source": s, "target": t, "pair_score": v}
                for (d, a), matrix in matrices.items() for (s, t), v in matrix.items()]
    return {"robustness": rob, "transfer": te_rows}
