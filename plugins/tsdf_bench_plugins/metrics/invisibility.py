"""Invisibility: is the protected image acceptable to its owner?

Columns: ``psnr_in`` / ``ssim_in`` (x+W vs x on [0, 1], PSNR capped at 100 dB, SSIM
``win_size=3``), ``linf`` (max |W| on the [-1, 1] scale, comparable to ``eps``) and ``l2_in``
(mean per-image ||W||_2 on [-1, 1]).  LPIPS/FID need backbone weights that are not shipped;
they are not computed here.
"""
from __future__ import annotations

from tsdf_bench.metrics import EvalBatch, Metric, invisibility_scores


class InvisibilityMetric(Metric):
    """PSNR, SSIM, L-inf and L2 of the perturbation (on the model-size inputs)."""

    name = "invisibility"
    columns = ("psnr_in", "ssim_in", "linf", "l2_in")

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        return invisibility_scores(batch.protected, batch.clean)
