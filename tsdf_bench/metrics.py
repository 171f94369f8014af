"""Metric interface, the evaluation batch, and the pure metric functions the field uses.

Definitions follow ../shared/docs/metrics.md:

* Interruption (CMUA-Watermark, Huang et al., AAAI 2022; TSDF): ``mask`` = pixels where
  ``sum_RGB |G(x) - x| > 0.5``; ``L2_mask = sum(((G(x+W) - G(x)) * mask)^2) / (3 * sum(mask))``
  per (image, target) pair; ``SR_mask`` = share of pairs with ``L2_mask > 0.05``.  Ruiz et al.
  ("Disrupting Deepfakes", 2020) use the unmasked ``MSE(G(x+W), G(x)) > 0.05`` instead.
* Output PSNR / SSIM between ``G(x+W)`` and ``G(x)`` on [0, 1] (scikit-image's definitions; SSIM
  ``win_size=3``, ``data_range=1`` as in TSDF).  Lower means stronger disruption.
* Invisibility: PSNR / SSIM between ``x`` and ``x+W`` on [0, 1]; L-inf and L2 of ``W`` on the
  [-1, 1] scale (the scale ``eps`` is given on).
* Poisoning (TSDF): clean detections with score > 0.7 are pseudo ground truth; protected detections
  with score > 0.7 match them at IoU >= 0.7.  Precision, recall, F1, DUQ = (TP - FP) / #clean boxes.

Conventions decided here (and tested in tests/test_metrics.py):

* **Empty mask** (the model edits no pixel of an image for a target, e.g. the attribute is
  already present): the pair's L2_mask is undefined (NaN from :func:`l2_mask`).  It is *left out*
  of the L2_mask mean and *counted as not successful* in SR_mask (it stays in the denominator).
  This is what CMUA's code does for SR (``nan > 0.05`` is False) without letting the NaN poison
  the mean.  When every pair has an empty mask, the L2_mask mean is ``None``.
* **Identical images** have PSNR = +inf; PSNR is capped at :data:`PSNR_MAX_DB` (100 dB, i.e.
  MSE 1e-10 on [0, 1]) per pair, so means stay finite and results stay valid JSON.
* **Detection** precision is ``None`` when the protected images yield no detection above the
  threshold (nothing to be precise about), recall and DUQ are ``None`` when the clean images have
  no pseudo ground truth; F1 uses ``2TP / (2TP + FP + FN)`` (equal to the harmonic mean where
  both are defined, 0 when protection removes every true face) and is ``None`` only when there
  are no boxes at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .detectors.base import Detections
from .errors import TsdfBenchError

MASK_THRESHOLD = 0.5  # sum over RGB of |G(x) - x| on [-1, 1]
SUCCESS_THRESHOLD = 0.05  # L2_mask / MSE above which a forgery counts as disrupted
PSNR_MAX_DB = 100.0
DET_SCORE_THRESHOLD = 0.7
DET_IOU_THRESHOLD = 0.7


@dataclass
class EvalBatch:
    """Everything one evaluation of (defense, model, adaptation, round) needs.

    ``clean`` / ``protected``: ``[N, 3, H, W]`` model-size inputs in [-1, 1] (``protected`` after
    any purification).  ``fake_clean``: ``[N, T, 3, H, W]`` G(x) per target of the model measured
    (round 0: the original model; a retraining round: the retrained model's own clean forgery);
    ``fake_protected``: G'(x+W) of the possibly retrained model; ``fake_clean_original``: the
    original model's G(x) of the same inputs in a retraining round (None in round 0).  Detections are
    per detector name, one :class:`Detections` per full-size image.  ``crop_kept``: per protected
    image, whether the attacker's pipeline got a usable crop (IoU with the clean crop >= 0.5);
    ``None`` in round 0.  ``eval_photos``: the source photo of each full-size image (the
    detections' images), ``crop_photos``: that of each ``crop_kept`` entry (the attacker's
    collected photos); the clusters of the rates' bootstrap intervals (None: each image is its own).
    """

    clean: Tensor
    protected: Tensor
    fake_clean: Tensor | None = None
    fake_protected: Tensor | None = None
    fake_clean_original: Tensor | None = None
    detections_clean: dict[str, list[Detections]] = field(default_factory=dict)
    detections_protected: dict[str, list[Detections]] = field(default_factory=dict)
    crop_kept: list[bool] | None = None
    eval_photos: list | None = None
    crop_photos: list | None = None


class Metric:
    """Base class of a metric plugin: ``compute(batch)`` returns ``{column: value}``.

    ``columns`` names every column the metric can write (keys of ``compute``'s result are a
    subset; a value is ``None`` when the batch lacks what the metric needs).  Metrics whose
    columns depend on the batch (one set per detector) override :meth:`columns_for`.

    The harness measures a cell in batches of eval photos (:mod:`tsdf_bench.metric_streaming`).
    A metric that overrides :meth:`update` and :meth:`finish` (and :meth:`start` for its state)
    streams: it sees each batch once and keeps what it needs of it; its :meth:`compute` of one
    batch is then start, update, finish.  A metric that overrides only :meth:`compute` gets the
    cell's batches concatenated into one, limited to the fields in :attr:`needs`.
    """

    name: str = ""
    columns: tuple[str, ...] = ()
    #: The EvalBatch fields :meth:`compute` reads when the metric does not stream (None: every
    #: field).  Only these are kept across a cell's batches for it.
    needs: tuple[str, ...] | None = None

    def columns_for(self, batch: EvalBatch) -> tuple[str, ...]:
        """The columns :meth:`compute` fills for this batch (default: :attr:`columns`)."""
        return tuple(self.columns)

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        """The columns of one whole batch; a streaming metric's default: start, update, finish."""
        if type(self).update is Metric.update:
            raise NotImplementedError(f"metric {self.name or type(self).__name__!r} implements neither "
                                      "compute(batch) nor update(state, batch) / finish(state)")
        state = self.start()
        self.update(state, batch)
        return self.finish(state)

    def start(self):
        """A new state for one cell (default: a :class:`~tsdf_bench.metric_streaming.WholeBatch`
        of :attr:`needs`, for a metric that implements only :meth:`compute`)."""
        from .metric_streaming import WholeBatch

        return WholeBatch(self.needs)

    def update(self, state, batch: EvalBatch) -> None:
        """Take one batch of the cell's eval photos into ``state`` (default: keep it for :meth:`finish`)."""
        state.add(batch)

    def finish(self, state) -> dict[str, float | None]:
        """The cell's columns from ``state`` (default: :meth:`compute` of the combined batch)."""
        return self.compute(state.batch())


# -- helpers -----------------------------------------------------------------------------
def _pairs(fake: Tensor, name: str) -> Tensor:
    """Accept ``[N, 3, H, W]`` (one target) or ``[N, T, 3, H, W]``; return the 5-d view."""
    if fake.dim() == 4:
        return fake.unsqueeze(1)
    if fake.dim() != 5 or fake.shape[2] != 3:
        raise TsdfBenchError(f"{name}: expected [N, T, 3, H, W] or [N, 3, H, W], got shape {tuple(fake.shape)}")
    return fake


def _same_shape(a: Tensor, b: Tensor, what: str):
    if a.shape != b.shape:
        raise TsdfBenchError(f"{what}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}); "
                             "pass tensors from the same model at the same size")


def _mean_or_none(values) -> float | None:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(values)) if values else None


# -- interruption ------------------------------------------------------------------------
def edit_mask(fake_clean: Tensor, x: Tensor, threshold: float = MASK_THRESHOLD) -> Tensor:
    """Pixels the manipulation edits: ``sum_RGB |G(x) - x| > threshold`` (CMUA).

    ``fake_clean`` ``[N, T, 3, H, W]`` (or ``[N, 3, H, W]``), ``x`` ``[N, 3, H, W]``; returns a float
    0/1 mask ``[N, T, 1, H, W]``.
    """
    fake = _pairs(fake_clean, "fake_clean")
    if x.dim() != 4 or x.shape[0] != fake.shape[0] or x.shape[1:] != fake.shape[2:]:
        raise TsdfBenchError(f"edit_mask: x has shape {tuple(x.shape)}, expected [N, 3, H, W] matching "
                             f"fake_clean {tuple(fake_clean.shape)}")
    diff = (fake - x.unsqueeze(1)).abs().sum(dim=2, keepdim=True)
    return (diff > threshold).to(fake.dtype)


def l2_mask(fake_protected: Tensor, fake_clean: Tensor, mask: Tensor) -> Tensor:
    """CMUA's masked L2 per (image, target) pair: ``[N, T]``; NaN where the mask is empty."""
    fp, fc = _pairs(fake_protected, "fake_protected"), _pairs(fake_clean, "fake_clean")
    _same_shape(fp, fc, "l2_mask")
    mask = mask if mask.dim() == 5 else mask.unsqueeze(1)
    sq = (((fp - fc) * mask) ** 2).flatten(2).sum(-1).double()
    area = mask.expand(fp.shape[0], fp.shape[1], 1, *fp.shape[3:]).flatten(2).sum(-1).double()
    out = torch.full_like(sq, float("nan"))
    nonempty = area > 0
    out[nonempty] = sq[nonempty] / (3.0 * area[nonempty])
    return out


def success_rate(per_pair: Tensor, threshold: float = SUCCESS_THRESHOLD) -> float | None:
    """Share of pairs with value ``> threshold``; NaN pairs count as not successful."""
    values = per_pair.flatten()
    if values.numel() == 0:
        return None
    return float((values > threshold).double().mean())  # NaN > t is False


def sr_mask(l2_values: Tensor, threshold: float = SUCCESS_THRESHOLD) -> float | None:
    """SR_mask (CMUA, TSDF): share of (image, target) pairs with L2_mask > 0.05."""
    return success_rate(l2_values, threshold)


def mse_unmasked(fake_protected: Tensor, fake_clean: Tensor) -> Tensor:
    """Ruiz et al.'s plain MSE(G(x+W), G(x)) per pair, ``[N, T]``, on [-1, 1]."""
    fp, fc = _pairs(fake_protected, "fake_protected"), _pairs(fake_clean, "fake_clean")
    _same_shape(fp, fc, "mse_unmasked")
    return ((fp - fc) ** 2).flatten(2).mean(-1).double()


def drift_pair_sums(fake_retrained: Tensor, fake_original: Tensor) -> Tensor:
    """Per (image, target) pair: the sum of squared differences between two models' forgeries,
    float64 ``[N, T]`` (the pieces of :func:`clean_drift`, which add up batch by batch)."""
    a, b = _pairs(fake_retrained, "fake_retrained"), _pairs(fake_original, "fake_original")
    _same_shape(a, b, "clean_drift")
    return ((a - b) ** 2).flatten(2).sum(-1, dtype=torch.float64)


def drift_from_sums(pair_sums: Tensor, values_per_pair: int) -> float | None:
    """:func:`clean_drift` from the :func:`drift_pair_sums` of every pair (in any grouping: the sum
    is exactly rounded, ``math.fsum``); None when there are none."""
    if not pair_sums.numel() or not values_per_pair:
        return None
    return math.fsum(pair_sums.flatten().tolist()) / (pair_sums.numel() * values_per_pair)


def clean_drift(fake_retrained: Tensor, fake_original: Tensor) -> float | None:
    """How far retraining moved a model: the mean squared difference, on [-1, 1], between its clean
    forgeries and the original model's of the same inputs (``retrained_clean_mse``); None when
    there are none.  Each pair's squared differences are summed in float64 and the pairs' sums
    exactly (``math.fsum``), so the value does not depend on how the pairs are batched."""
    sums = drift_pair_sums(fake_retrained, fake_original)
    return drift_from_sums(sums, math.prod(_pairs(fake_original, "fake_original").shape[2:]))


def sr_ruiz(mse_values: Tensor, threshold: float = SUCCESS_THRESHOLD) -> float | None:
    """Ruiz's success rate: share of pairs with unmasked MSE > 0.05."""
    return success_rate(mse_values, threshold)


def _unit_pairs(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Flatten ``[..., 3, H, W]`` pairs to float64 ``[P, 3, H, W]`` on [0, 1]."""
    _same_shape(a, b, what)
    if a.dim() < 3 or a.shape[-3] != 3:
        raise TsdfBenchError(f"{what}: expected images [..., 3, H, W], got shape {tuple(a.shape)}")
    def unit(t):
        return ((t.detach().cpu().double() + 1.0) / 2.0).clamp(0.0, 1.0).reshape(-1, *t.shape[-3:])
    return unit(a), unit(b)


def psnr_pairs(a: Tensor, b: Tensor) -> np.ndarray:
    """PSNR in dB between images ``[..., 3, H, W]`` in [-1, 1], computed on [0, 1], capped at 100 dB.

    Same value as ``skimage.metrics.peak_signal_noise_ratio(x, y, data_range=1)`` (tested).
    """
    ua, ub = _unit_pairs(a, b, "psnr")
    mse = ((ua - ub) ** 2).flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse.clamp(min=1e-300)), torch.full_like(mse, math.inf))
    return psnr.clamp(max=PSNR_MAX_DB).numpy()


def ssim_pairs(a: Tensor, b: Tensor, win_size: int = 3) -> np.ndarray:
    """Mean SSIM (Wang et al., TIP 2004) between images ``[..., 3, H, W]`` in [-1, 1], on [0, 1].

    ``skimage.metrics.structural_similarity(x, y, win_size=win_size, data_range=1, channel_axis=-1)``
    per pair: TSDF's setting.
    """
    from skimage.metrics import structural_similarity

    ua, ub = _unit_pairs(a, b, "ssim")
    if min(ua.shape[-2:]) < win_size:
        raise TsdfBenchError(f"ssim: images of {tuple(ua.shape[-2:])} pixels are smaller than the SSIM window "
                             f"({win_size}); SSIM needs images of at least {win_size}x{win_size} pixels")
    xa, xb = ua.permute(0, 2, 3, 1).numpy(), ub.permute(0, 2, 3, 1).numpy()
    return np.asarray([structural_similarity(x, y, win_size=win_size, data_range=1.0, channel_axis=-1)
                       for x, y in zip(xa, xb)], dtype=np.float64)


def forgery_pair_values(fake_protected: Tensor, fake_clean: Tensor, clean: Tensor, *,
                        mask_threshold: float = MASK_THRESHOLD, ssim_win_size: int = 3) -> dict:
    """The interruption values of each (image, target) pair: ``l2_mask`` and ``l2`` (float64
    ``[N, T]``), ``psnr_out`` and ``ssim_out`` (arrays of ``N * T``, pairs in row-major order).
    Each pair's values are its own: the values of a batch of images are those rows of the whole's."""
    mask = edit_mask(fake_clean, clean, mask_threshold)
    l2m = l2_mask(fake_protected, fake_clean, mask)
    del mask
    return {"l2_mask": l2m, "l2": mse_unmasked(fake_protected, fake_clean),
            "psnr_out": psnr_pairs(fake_protected, fake_clean),
            "ssim_out": ssim_pairs(fake_protected, fake_clean, ssim_win_size)}


def forgery_summary(values: dict, *, success_threshold: float = SUCCESS_THRESHOLD) -> dict[str, float | None]:
    """The interruption columns from :func:`forgery_pair_values` (of a whole cell, or its batches'
    concatenated in photo order): l2_mask, sr_mask, l2 (Ruiz MSE), sr_ruiz, psnr_out, ssim_out."""
    l2m, mse = values["l2_mask"], values["l2"]
    return {
        "l2_mask": _mean_or_none(l2m.flatten().tolist()),
        "sr_mask": sr_mask(l2m, success_threshold),
        "l2": _mean_or_none(mse.flatten().tolist()),
        "sr_ruiz": sr_ruiz(mse, success_threshold),
        "psnr_out": _mean_or_none(values["psnr_out"]),
        "ssim_out": _mean_or_none(values["ssim_out"]),
    }


def forgery_scores(fake_protected: Tensor, fake_clean: Tensor, clean: Tensor, *,
                   mask_threshold: float = MASK_THRESHOLD, success_threshold: float = SUCCESS_THRESHOLD,
                   ssim_win_size: int = 3) -> dict[str, float | None]:
    """All interruption columns: l2_mask, sr_mask, l2 (Ruiz MSE), sr_ruiz, psnr_out, ssim_out."""
    return forgery_summary(forgery_pair_values(fake_protected, fake_clean, clean, mask_threshold=mask_threshold,
                                               ssim_win_size=ssim_win_size), success_threshold=success_threshold)


# -- invisibility ------------------------------------------------------------------------
def invisibility_image_values(protected: Tensor, clean: Tensor) -> dict:
    """The invisibility values of each image: ``psnr_in``, ``ssim_in`` (arrays), ``linf`` (max |W|)
    and ``l2`` (||W||_2, float64 tensors), W = protected - clean on [-1, 1]."""
    _same_shape(protected, clean, "invisibility")
    w = (protected - clean).detach().double().flatten(1)
    empty = w.new_zeros(0)
    return {"psnr_in": psnr_pairs(protected, clean), "ssim_in": ssim_pairs(protected, clean),
            "linf": w.abs().amax(dim=1) if w.numel() else empty, "l2": w.norm(dim=1) if w.numel() else empty}


def invisibility_summary(values: dict) -> dict[str, float | None]:
    """psnr_in / ssim_in (x+W vs x on [0, 1]), linf (max |W|) and l2_in (mean per-image ||W||_2)
    from :func:`invisibility_image_values` (of every image, or its batches' concatenated)."""
    linf, l2 = values["linf"], values["l2"]
    return {
        "psnr_in": _mean_or_none(values["psnr_in"]),
        "ssim_in": _mean_or_none(values["ssim_in"]),
        "linf": float(linf.max()) if linf.numel() else None,
        "l2_in": float(l2.mean()) if l2.numel() else None,
    }


def invisibility_scores(protected: Tensor, clean: Tensor) -> dict[str, float | None]:
    """psnr_in / ssim_in (x+W vs x on [0, 1]), linf (max |W|) and l2_in (mean per-image ||W||_2), W on [-1, 1]."""
    return invisibility_summary(invisibility_image_values(protected, clean))


# -- poisoning ---------------------------------------------------------------------------
def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes."""
    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _match(gt: Tensor, pred: Tensor, pred_scores: Tensor, iou_threshold: float) -> int:
    """Greedy one-to-one matching (highest-scoring prediction first); number of true positives."""
    if len(gt) == 0 or len(pred) == 0:
        return 0
    iou = box_iou(pred, gt)
    taken = torch.zeros(len(gt), dtype=torch.bool)
    tp = 0
    for i in torch.argsort(pred_scores, descending=True).tolist():
        cand = iou[i].clone()
        cand[taken] = -1.0
        j = int(cand.argmax())
        if cand[j] >= iou_threshold:
            taken[j] = True
            tp += 1
    return tp


def detection_scores(clean: Sequence[Detections], protected: Sequence[Detections], *,
                     score_threshold: float = DET_SCORE_THRESHOLD,
                     iou_threshold: float = DET_IOU_THRESHOLD) -> dict[str, float | None]:
    """TSDF's poisoning metrics of one detector over a set of images.

    Returns ``precision``, ``recall``, ``f1``, ``duq`` ((TP - FP) / #clean boxes, FacePoison's
    detection-utility quality), ``conf_change`` (mean over pseudo-GT boxes of the best score of a
    protected detection overlapping it at IoU >= ``iou_threshold``, 0 if none, minus the clean
    score) and ``count_change`` (mean per image of #protected boxes - #clean boxes above the
    threshold), plus the raw ``tp``, ``fp``, ``fn``, ``n_clean``.
    """
    if len(clean) != len(protected):
        raise TsdfBenchError(f"detection_scores: {len(clean)} clean vs {len(protected)} protected detection lists; "
                             "pass one Detections per image for both")
    tp = fp = n_clean = 0
    conf_deltas, count_deltas = [], []
    for c, p in zip(clean, protected):
        keep_c, keep_p = c.scores > score_threshold, p.scores > score_threshold
        gt, gt_scores = c.boxes[keep_c], c.scores[keep_c]
        pred, pred_scores = p.boxes[keep_p], p.scores[keep_p]
        t = _match(gt, pred, pred_scores, iou_threshold)
        tp, fp, n_clean = tp + t, fp + len(pred) - t, n_clean + len(gt)
        count_deltas.append(len(pred) - len(gt))
        iou = box_iou(gt, p.boxes) if len(gt) and len(p) else None
        for k in range(len(gt)):
            hits = p.scores[iou[k] >= iou_threshold] if iou is not None else p.scores[:0]
            best = float(hits.max()) if len(hits) else 0.0
            conf_deltas.append(best - float(gt_scores[k]))
    fn = n_clean - tp
    denom_f1 = 2 * tp + fp + fn
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / n_clean if n_clean else None,
        "f1": 2 * tp / denom_f1 if denom_f1 else None,
        "duq": (tp - fp) / n_clean if n_clean else None,
        "conf_change": _mean_or_none(conf_deltas),
        "count_change": _mean_or_none(count_deltas),
        "tp": float(tp), "fp": float(fp), "fn": float(fn), "n_clean": float(n_clean),
    }


# -- data preparation --------------------------------------------------------------------
def crop_yield(crop_kept: Sequence[bool] | None) -> float | None:
    """Share of protected images from which the attacker still got a usable crop; None in round 0."""
    if crop_kept is None or len(crop_kept) == 0:
        return None
    return float(np.mean([bool(k) for k in crop_kept]))
