"""Data-preparation yield: the figure that matters most for the retraining threat model (TSDF).

Column ``crop_yield``: the share of protected images from which the attacker's detect-crop-align
pipeline still extracts a usable face crop (crop IoU with the clean crop >= 0.5, decided by the
runner and passed as ``EvalBatch.crop_kept``).  ``None`` in round 0, where nothing is collected.
"""
from __future__ import annotations

from tsdf_bench.metrics import EvalBatch, Metric, crop_yield


class CropYieldMetric(Metric):
    """Mean of ``batch.crop_kept``; ``None`` when the batch has none (round 0)."""

    name = "crop_yield"
    columns = ("crop_yield",)

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        return {"crop_yield": crop_yield(batch.crop_kept)}
