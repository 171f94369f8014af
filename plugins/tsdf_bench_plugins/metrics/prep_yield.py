"""Data-preparation yield: the figure that matters most for the retraining threat model (TSDF).

Column ``crop_yield``: the share of protected images from which the attacker's detect-crop-align
pipeline still extracts a usable face crop (crop IoU with the clean crop >= 0.5, decided by the
runner and passed as ``EvalBatch.crop_kept``).  ``None`` in round 0, where nothing is collected.

It is a rate over the attacker's collected photos, stored with its count and 95% interval like
the forgery rates (:func:`tsdf_bench.schema.rate_family`): ``crop_yield_hits`` / ``crop_yield_n``
usable crops of collected photos, ``crop_yield_lo`` / ``crop_yield_hi`` from a bootstrap over the
collected photos' source photos (``EvalBatch.crop_photos``), ``crop_yield_photos`` the counts.
"""
from __future__ import annotations

import numpy as np

from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.metrics import EvalBatch, Metric, crop_yield
from tsdf_bench.schema import rate_family
from tsdf_bench.stats import photo_counts, rate_columns


class CropYieldMetric(Metric):
    """Share of ``batch.crop_kept`` that is usable, with its count and interval; ``None`` when the
    batch has none (round 0)."""

    name = "crop_yield"
    columns = rate_family("crop_yield")
    needs = ("crop_kept", "crop_photos")  # no image: nothing per eval photo kept

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        kept = batch.crop_kept
        if kept is None or len(kept) == 0:
            return {"crop_yield": crop_yield(kept)}
        photos = batch.crop_photos if batch.crop_photos is not None else [str(i) for i in range(len(kept))]
        if len(photos) != len(kept):
            raise TsdfBenchError(f"crop_yield: {len(kept)} collected photos in crop_kept but {len(photos)} "
                                 "crop_photos; give one source photo per collected photo")
        out = rate_columns("crop_yield", photo_counts(np.array([[bool(k)] for k in kept]), photos))
        out["crop_yield"] = crop_yield(kept)
        return out
