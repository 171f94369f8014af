"""Forgery interruption: does G(x+W) differ from G(x)?  (CMUA-Watermark, Huang et al., AAAI 2022; TSDF)

Columns: ``l2_mask`` / ``sr_mask`` (CMUA's masked L2 and its success rate, threshold 0.05),
``l2`` / ``sr_ruiz`` (Ruiz et al. 2020's unmasked MSE and its success rate), ``psnr_out`` /
``ssim_out`` (G(x+W) vs G(x) on [0, 1], SSIM ``win_size=3``).  Empty masks and PSNR of
identical images: see :mod:`tsdf_bench.metrics`.
"""
from __future__ import annotations

from tsdf_bench.metric_streaming import PairValues
from tsdf_bench.metrics import (MASK_THRESHOLD, SUCCESS_THRESHOLD, EvalBatch, Metric, forgery_pair_values,
                                forgery_summary)


class ForgeryMetric(Metric):
    """Interruption of the forgery, computed batch by batch (each pair's values kept, not its images).

    Args: ``mask_threshold`` (0.5, on the RGB-summed |G(x) - x|), ``success_threshold`` (0.05),
    ``ssim_win_size`` (3).  All columns are ``None`` when the batch carries no forgeries.
    """

    name = "forgery"
    columns = ("l2_mask", "sr_mask", "l2", "sr_ruiz", "psnr_out", "ssim_out")

    def __init__(self, mask_threshold: float = MASK_THRESHOLD, success_threshold: float = SUCCESS_THRESHOLD,
                 ssim_win_size: int = 3):
        self.mask_threshold = float(mask_threshold)
        self.success_threshold = float(success_threshold)
        self.ssim_win_size = int(ssim_win_size)

    def start(self) -> PairValues:
        return PairValues()

    def update(self, state: PairValues, batch: EvalBatch) -> None:
        if batch.fake_clean is None or batch.fake_protected is None:
            return
        state.add(forgery_pair_values(batch.fake_protected, batch.fake_clean, batch.clean,
                                      mask_threshold=self.mask_threshold, ssim_win_size=self.ssim_win_size))

    def finish(self, state: PairValues) -> dict[str, float | None]:
        if not len(state):
            return dict.fromkeys(self.columns)
        return forgery_summary(state.values(), success_threshold=self.success_threshold)
