"""Counts and 95% intervals for rates measured on (image, target) pairs.

Pairs are not independent: the targets of one image, and the augmented views of one source photo,
share that photo.  So a rate's interval is a **cluster bootstrap over source photos**: resample
photos with replacement (``n_boot`` times, a fixed seed), pool their pairs, take the 2.5 / 97.5
percentiles.  Seeds of one cell are pooled the same way (a photo's pairs of every seed go
together).  One photo gives no interval (``lo`` / ``hi`` None): resampling a single cluster
always draws it, so the bootstrap would say [rate, rate], a certainty the data cannot give (the
demo's collected photos are views of one person's photo).  :func:`wilson` is for independent
trials only (one pair per photo).

The unit of storage is ``{photo: [successes, pairs]}`` (a row's ``sr_mask_photos``): rates,
differences between defenses on the same photos (:func:`paired_difference`) and ratios
(persistence) are all computed from it.  The same holds for rates whose trials are not pairs:
face boxes (detection recall, precision, F1: :func:`trial_counts`) and collected photos (the
attacker's crop yield).  A row stores every rate as :func:`rate_columns` writes it.
"""
from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
MIN_PHOTOS = 2  # clusters a bootstrap interval needs


def photo_counts(success: np.ndarray, photos) -> dict[str, list[int]]:
    """``{photo: [successes, pairs]}`` from a per-pair 0/1 array ``[N, T]`` and the N photos."""
    success = np.asarray(success, dtype=bool).reshape(len(photos), -1)
    out: dict[str, list[int]] = {}
    for photo, row in zip(photos, success):
        hits, n = out.setdefault(str(photo), [0, 0])
        out[str(photo)] = [hits + int(row.sum()), n + int(row.size)]
    return out


def trial_counts(hits, trials, photos) -> dict[str, list[int]]:
    """``{photo: [successes, trials]}`` from per-unit counts (e.g. per image: true positives and
    clean face boxes) and each unit's source photo; photos without a trial are left out."""
    if not len(hits) == len(trials) == len(photos):
        raise ValueError(f"trial_counts: {len(hits)} hits, {len(trials)} trials and {len(photos)} photos; "
                         "give one of each per unit")
    out: dict[str, list[int]] = {}
    for photo, h, n in zip(photos, hits, trials):
        a, b = out.get(str(photo), [0, 0])
        out[str(photo)] = [a + int(h), b + int(n)]
    return {p: c for p, c in out.items() if c[1] > 0}


def merge_counts(*counts: dict) -> dict[str, list[int]]:
    """Pool several ``{photo: [successes, pairs]}`` (e.g. the seeds of one cell)."""
    out: dict[str, list[int]] = {}
    for c in counts:
        for photo, (hits, n) in (c or {}).items():
            a, b = out.get(photo, [0, 0])
            out[photo] = [a + int(hits), b + int(n)]
    return out


def _arrays(counts: dict, photos=None):
    photos = sorted(counts) if photos is None else photos
    return (np.array([counts[p][0] for p in photos], dtype=float),
            np.array([counts[p][1] for p in photos], dtype=float))


def _draws(n_photos: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_photos]`` resampling weights (how often each photo is drawn)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_photos, size=(n_boot, n_photos))
    return np.stack([np.bincount(row, minlength=n_photos) for row in idx]).astype(float)


def _interval(samples: np.ndarray) -> tuple[float | None, float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    lo, hi = np.percentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def rate(counts: dict, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """``{"rate", "lo", "hi", "successes", "pairs", "photos"}`` of ``{photo: [successes, pairs]}``."""
    hits, n = _arrays(counts)
    total = float(n.sum())
    out = {"rate": float(hits.sum() / total) if total else None, "successes": int(hits.sum()),
           "pairs": int(total), "photos": len(hits), "lo": None, "hi": None}
    if total and len(hits) >= MIN_PHOTOS:
        w = _draws(len(hits), n_boot, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples = (w @ hits) / (w @ n)
        out["lo"], out["hi"] = _interval(samples)
    return out


def rate_columns(name: str, counts: dict, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """How a row stores a rate: ``name`` (the rate), ``name_lo`` / ``name_hi`` (95% cluster-bootstrap
    interval), ``name_n`` (trials), ``name_hits`` (successes) and ``name_photos`` (the counts)."""
    r = rate(counts, n_boot, seed)
    return {name: r["rate"], f"{name}_lo": r["lo"], f"{name}_hi": r["hi"], f"{name}_n": r["pairs"],
            f"{name}_hits": r["successes"], f"{name}_photos": counts}


def paired_difference(a: dict, b: dict, a0: dict | None = None, b0: dict | None = None,
                      n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Rate of ``a`` minus rate of ``b`` measured on the same photos, with a paired bootstrap.

    With ``a0`` / ``b0`` (the round-0 counts), the difference of **persistence**
    (rate / rate at round 0) instead.  Returns ``{"diff", "lo", "hi", "excludes_zero", "photos"}``;
    only photos present in every given count enter.
    """
    given = [c for c in (a, b, a0, b0) if c is not None]
    photos = sorted(set.intersection(*(set(c) for c in given)))
    if not photos:
        return {"diff": None, "lo": None, "hi": None, "excludes_zero": False, "photos": 0}
    arrays = [_arrays(c, photos) for c in given]
    w = np.vstack([np.ones(len(photos)), _draws(len(photos), n_boot, seed)])  # row 0: the point estimate

    def stat(i):
        hits, n = arrays[i]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ hits) / (w @ n)

    with np.errstate(invalid="ignore", divide="ignore"):
        values = stat(0) - stat(1) if a0 is None else stat(0) / stat(2) - stat(1) / stat(3)
    point = float(values[0])
    lo, hi = _interval(values[1:]) if len(photos) >= MIN_PHOTOS else (None, None)
    finite = math.isfinite(point)
    return {"diff": point if finite else None, "lo": lo, "hi": hi, "photos": len(photos),
            "excludes_zero": bool(finite and lo is not None and (lo > 0 or hi < 0))}


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score interval of a binomial rate (independent trials only)."""
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
