"""The Proactive Defense Benchmark's aggregate scores: ROB (robustness) and TE (transferability).

Pure functions over already-measured metric means, so the runner and the leaderboard can compute
them from stored cells.  Definitions follow PDB's released code (Baek et al., "Proactive Defense
Benchmark against Deepfake Generation", ICML 2026; ``robustness_evaluation.py`` and
``transferability_evaluation.py``), which its README states as formulas:

**ROB** of one (defense, generator) over a set of input transforms (JPEG 70/90, blur 1/3, noise,
salt-and-pepper 0.01/0.03 in PDB)::

    ROB = mean over transforms t of mean(
              min(1, mse_t     / (mse_0     + 1e-10)),
              min(1, lpips_t   / (lpips_0   + 1e-10)),
              min(1, brisque_t / (brisque_0 + 1e-10)),
              min(1, cidr_t / cidr_0) )          # the identity term only when cidr_0 is non-zero

where ``_0`` is the protected image's result without any transform and every metric compares the
forgery of the (transformed) protected image with the clean forgery (``mse`` and ``lpips`` between
them, ``brisque`` of the protected forgery, ``cidr`` the identity disruption
``max(0, 1 - ID(x, G(x)) / ID(x, G(x_adv)))``).  Edge cases, as in PDB's code: a baseline of 0
makes a quality ratio 1 if the transformed value is positive, else 0 (the 1e-10); when the
baseline CIDR is 0 or missing the identity term is dropped for *every* transform; a transform
without a CIDR value counts its identity term as 0; a transform missing one of the quality metrics
is left out (PDB reads all three from one CSV row).  One departure: a baseline with no disruption
at all (every quality metric <= 1e-10 and no identity disruption, e.g. the ``none`` defense) has
no protection to keep, so its ROB is undefined (``None``) rather than PDB's formula's value there
(1 for a transform that changes the output, 0 for one that does not, such as a 1-pixel blur).

**TE** of one defense crafted on a *source* generator, over the other (*target*) generators::

    pair(s, t) = mean( min(1, mse_st / mse_tt) if mse_tt > 0 else 0,
                       min(1, lpips_st / lpips_tt) if lpips_tt > 0 else 0,
                       min(1, brisque_st / brisque_tt) if brisque_tt > 0 else 0,
                       min(1, cidr_st / cidr_tt) )    # only when both CIDRs exist and cidr_tt > 0
    TE(s) = mean over targets t != s of pair(s, t)

``_st``: the perturbation fitted on ``s`` measured on ``t`` (black box); ``_tt``: the defense's
white-box result on ``t`` (fitted on ``t`` itself).  Note the quality ratios here have no 1e-10
and give 0 for a zero white-box value, unlike ROB.  When CIDR is used (``id_metric`` set), a
target whose white-box CIDR is missing is left out entirely (PDB does not cache it), and so is a
pair or a white-box result missing any quality metric.  PDB also reports, per source, the mean
*raw* transfer CIDR over the targets (``cidr`` in :func:`te_scores`).

This suite has no BRISQUE (its model downloads SVR weights); pass the metric names that exist,
e.g. ``metrics=("l2", "lpips")``: ``l2`` (the ``forgery`` metric's unmasked MSE on [-1, 1]) is
PDB's ``mse``, ``lpips`` (the ``lpips`` metric, AlexNet) its ``alex_lpips``, ``cidr`` (the
``identity`` metric) its ``relative_id``.  The scores are then PDB's formulas over fewer terms.
"""
from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

#: PDB's quality metrics, in its order; the identity metric is separate (``id_metric``).
PDB_METRICS = ("mse", "lpips", "brisque")
#: The names of the same quantities in this suite's metric columns (BRISQUE is not computed here).
SUITE_METRICS = ("l2", "lpips")
ROB_EPS = 1e-10

Metrics = Mapping[str, "float | None"]


def _value(metrics: Metrics | None, key: str) -> float | None:
    if metrics is None:
        return None
    v = metrics.get(key)
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _has_all(metrics: Metrics | None, keys: Sequence[str]) -> bool:
    return all(_value(metrics, k) is not None for k in keys)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- ROB ---------------------------------------------------------------------------------
def rob_per_transform(baseline: Metrics, transformed: Mapping[str, Metrics], *,
                      metrics: Sequence[str] = PDB_METRICS, id_metric: str | None = "cidr") -> dict[str, float]:
    """Each transform's term of ROB: the mean of its clipped ratios to ``baseline``.

    ``baseline``: metric means of the protected images without a transform, e.g.
    ``{"l2": 0.08, "lpips": 0.3, "cidr": 0.4}``; ``transformed``: the same per transform name.
    ``metrics``: the quality metrics to use (PDB: mse, lpips, brisque); ``id_metric``: the identity
    metric (PDB: CIDR) or None for a quality-only ROB.  Returns ``{transform: term}`` for the
    transforms that have every quality metric; empty when the baseline lacks one.
    """
    metrics = tuple(metrics)
    if not _has_all(baseline, metrics):
        return {}
    base_id = _value(baseline, id_metric) if id_metric else None
    use_id = bool(base_id)  # PDB: `if not base: return None` -> the 3-metric ROB
    if not use_id and all(_value(baseline, k) <= ROB_EPS for k in metrics):
        return {}  # nothing disrupted, nothing to keep: undefined (see the module doc)
    out: dict[str, float] = {}
    for name, m in transformed.items():
        if not _has_all(m, metrics):
            continue
        parts = [min(1.0, _value(m, k) / (_value(baseline, k) + ROB_EPS)) for k in metrics]
        if use_id:
            v = _value(m, id_metric)
            parts.append(min(1.0, (v if v is not None else 0.0) / base_id))
        if parts:
            out[name] = sum(parts) / len(parts)
    return out


def rob_score(baseline: Metrics, transformed: Mapping[str, Metrics], *,
              metrics: Sequence[str] = PDB_METRICS, id_metric: str | None = "cidr") -> float | None:
    """PDB's ROB of one (defense, generator): the mean of :func:`rob_per_transform`'s terms.

    ``None`` when no transform has a term, the baseline lacks a quality metric or disrupts nothing.
    Higher is better for the defense: 1 means every transform leaves its disruption intact.
    """
    return _mean(list(rob_per_transform(baseline, transformed, metrics=metrics, id_metric=id_metric).values()))


# -- TE ----------------------------------------------------------------------------------
def te_pair_score(transfer: Metrics, white_box: Metrics, *, metrics: Sequence[str] = PDB_METRICS,
                  id_metric: str | None = "cidr") -> float | None:
    """One (source, target) cell of the TE matrix: transfer results normalised by the target's white box.

    ``None`` when the pair cannot be scored as PDB would skip it: a quality metric missing on
    either side, or (with ``id_metric``) no white-box identity value.
    """
    metrics = tuple(metrics)
    if not _has_all(transfer, metrics) or not _has_all(white_box, metrics):
        return None
    wb_id = _value(white_box, id_metric) if id_metric else None
    if id_metric and wb_id is None:
        return None
    parts = []
    for k in metrics:
        wb = _value(white_box, k)
        parts.append(min(1.0, _value(transfer, k) / wb) if wb > 0 else 0.0)
    if id_metric:
        bb_id = _value(transfer, id_metric)
        if bb_id is not None and wb_id > 0:
            parts.append(min(1.0, bb_id / wb_id))
    return sum(parts) / len(parts) if parts else None


def te_matrix(white_box: Mapping[Hashable, Metrics], transfer: Mapping[tuple, Metrics], *,
              metrics: Sequence[str] = PDB_METRICS, id_metric: str | None = "cidr") -> dict[tuple, float | None]:
    """The normalised source x target matrix (the heat map): ``{(source, target): pair score}``.

    ``white_box``: per target, the defense's metrics when fitted on that target;
    ``transfer``: per ``(source, target)``, the metrics of the perturbation fitted on ``source``
    measured on ``target``.  A diagonal entry (source == target), if given, is scored like any other
    (it is 1 when it equals the white-box result and every metric is positive); pairs without a
    white-box result for their target are ``None``.
    """
    return {(s, t): (te_pair_score(m, white_box[t], metrics=metrics, id_metric=id_metric)
                     if t in white_box else None)
            for (s, t), m in transfer.items()}


def te_scores(white_box: Mapping[Hashable, Metrics], transfer: Mapping[tuple, Metrics], *,
              metrics: Sequence[str] = PDB_METRICS, id_metric: str | None = "cidr") -> dict[Hashable, dict]:
    """PDB's TE per source generator, over the targets other than the source.

    Returns ``{source: {"te": mean pair score or None, "n_targets_te": pairs scored,
    "cidr": mean raw transfer identity value or None, "n_targets_cidr": pairs with one}}`` for every
    source that has at least one off-diagonal pair.
    """
    scores: dict[Hashable, list[float]] = {}
    cidrs: dict[Hashable, list[float]] = {}
    sources = []
    for (s, t), m in transfer.items():
        if s == t:
            continue
        if s not in sources:
            sources.append(s)
        scores.setdefault(s, [])
        cidrs.setdefault(s, [])
        raw = _value(m, id_metric) if id_metric else None
        if raw is not None:
            cidrs[s].append(raw)
        if t not in white_box:
            continue
        p = te_pair_score(m, white_box[t], metrics=metrics, id_metric=id_metric)
        if p is not None:
            scores[s].append(p)
    return {s: {"te": _mean(scores[s]), "n_targets_te": len(scores[s]),
                "cidr": _mean(cidrs[s]), "n_targets_cidr": len(cidrs[s])} for s in sources}
