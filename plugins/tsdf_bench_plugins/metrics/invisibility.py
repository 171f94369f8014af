"""Invisibility: is the protected image acceptable to its owner?

Columns: ``psnr_in`` / ``ssim_in`` (x+W vs x on [0, 1], PSNR capped at 100 dB, SSIM
``win_size=3``, ``data_range=1``), ``linf`` (max |W| on the [-1, 1] scale, comparable to ``eps``)
and ``l2_in`` (mean per-image ||W||_2 on [-1, 1]).  ``ssim_in_paper``: SSIM as TSDF's evaluation
code computes it (``evaluate_fid.py``'s ``compare``: ``win_size=3``, ``data_range`` = max - min of
the *first* image, here the clean one), reported beside ours because it is not the same number.
LPIPS/FID need backbone weights that are not shipped; they are not computed here.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.metric_streaming import PairValues
from tsdf_bench.metrics import (EvalBatch, Metric, _mean_or_none, _unit_pairs, invisibility_image_values,
                                invisibility_summary)


def ssim_pairs_paper(first: Tensor, second: Tensor, win_size: int = 3) -> np.ndarray:
    """TSDF's SSIM per pair of images ``[..., 3, H, W]`` in [-1, 1]: both mapped to [0, 1] (clamped),
    ``skimage.metrics.structural_similarity(first, second, win_size=win_size, data_range=first.max()
    - first.min(), channel_axis=-1)``.  NaN for a pair whose first image is constant (no range).
    The order matters: TSDF passes the clean image first for invisibility and the protected
    image's forgery first for the output SSIM."""
    from skimage.metrics import structural_similarity

    ua, ub = _unit_pairs(first, second, "ssim_paper")
    if min(ua.shape[-2:]) < win_size:
        raise TsdfBenchError(f"ssim_paper: images of {tuple(ua.shape[-2:])} pixels are smaller than the SSIM "
                             f"window ({win_size})")
    out = []
    for x, y in zip(ua.permute(0, 2, 3, 1).numpy(), ub.permute(0, 2, 3, 1).numpy()):
        data_range = float(x.max() - x.min())
        out.append(structural_similarity(x, y, win_size=win_size, data_range=data_range, channel_axis=-1)
                   if data_range > 0 else float("nan"))
    return np.asarray(out, dtype=np.float64)


class InvisibilityMetric(Metric):
    """PSNR, SSIM, L-inf and L2 of the perturbation (on the model-size inputs), and TSDF's SSIM;
    computed batch by batch (each image's values kept)."""

    name = "invisibility"
    columns = ("psnr_in", "ssim_in", "linf", "l2_in", "ssim_in_paper")

    def start(self) -> PairValues:
        return PairValues()

    def update(self, state: PairValues, batch: EvalBatch) -> None:
        state.add({**invisibility_image_values(batch.protected, batch.clean),
                   "ssim_in_paper": ssim_pairs_paper(batch.clean, batch.protected)})

    def finish(self, state: PairValues) -> dict[str, float | None]:
        values = state.values()
        out = invisibility_summary(values)
        out["ssim_in_paper"] = _mean_or_none(values["ssim_in_paper"])
        return out
