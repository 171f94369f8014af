"""How far retraining moved the model on clean inputs: ``retrained_clean_mse``.

The mean squared difference, over every pixel, channel, target and image on the [-1, 1] scale,
between the retrained model's forgeries of the clean eval inputs and the original model's
forgeries of the same inputs (``EvalBatch.fake_clean`` vs ``EvalBatch.fake_clean_original``; in
a retraining round the clean inputs are the attacker's clean crops).  ``None`` in round 0, where
nothing was retrained.  The attacker keeps its retrained model only while this drift is at most
the success threshold (``docs/threat-model.md``: ``sr_mask_worst``, ``attacker_keeps``).
"""
from __future__ import annotations

import math

import torch

from tsdf_bench.metrics import EvalBatch, Metric, _pairs, drift_from_sums, drift_pair_sums


class RetrainedCleanMseMetric(Metric):
    """``retrained_clean_mse``: :func:`tsdf_bench.metrics.clean_drift` of the retrained and the
    original model's clean forgeries; ``None`` when the batch lacks either (round 0).  Computed
    batch by batch: each pair's sum of squared differences is kept, not the forgeries."""

    name = "retrained_clean_mse"
    columns = ("retrained_clean_mse",)

    def start(self) -> dict:
        return {"sums": [], "per_pair": 0}

    def update(self, state: dict, batch: EvalBatch) -> None:
        if batch.fake_clean is None or batch.fake_clean_original is None:
            return
        state["sums"].append(drift_pair_sums(batch.fake_clean, batch.fake_clean_original))
        state["per_pair"] = math.prod(_pairs(batch.fake_clean_original, "fake_clean_original").shape[2:])

    def finish(self, state: dict) -> dict[str, float | None]:
        if not state["sums"]:
            return {"retrained_clean_mse": None}
        return {"retrained_clean_mse": drift_from_sums(torch.cat(state["sums"]), state["per_pair"])}
