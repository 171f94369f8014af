"""Poisoning of the attacker's face detectors (TSDF stage 1; FacePoison, Li et al., ICME 2023).

Per detector ``<det>`` present in the batch: ``det_precision_<det>``, ``det_recall_<det>``,
``det_f1_<det>``, ``duq_<det>``, ``det_conf_change_<det>``, ``det_count_change_<det>``; plus
``det_f1``, the mean F1 over the detectors that have one.  Clean detections with score > 0.7
are pseudo ground truth, protected detections with score > 0.7 match them at IoU >= 0.7 (TSDF).
FacePoison's protocol (confidence 0.9, IoU 0.5) is ``score_threshold=0.9, iou_threshold=0.5``.
"""
from __future__ import annotations

from typing import Sequence

from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.metrics import DET_IOU_THRESHOLD, DET_SCORE_THRESHOLD, EvalBatch, Metric, detection_scores

PER_DETECTOR = (("det_precision", "precision"), ("det_recall", "recall"), ("det_f1", "f1"), ("duq", "duq"),
                ("det_conf_change", "conf_change"), ("det_count_change", "count_change"))


class DetectionMetric(Metric):
    """Detection precision/recall/F1/DUQ per detector on protected vs clean full-size images.

    Args: ``score_threshold`` (0.7), ``iou_threshold`` (0.7), ``detectors`` (names to report;
    default: every detector the batch carries).  :attr:`columns` lists the per-detector columns
    of ``detectors`` when given, else those of the detectors seen so far.
    """

    name = "detection"

    def __init__(self, score_threshold: float = DET_SCORE_THRESHOLD, iou_threshold: float = DET_IOU_THRESHOLD,
                 detectors: Sequence[str] | None = None):
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.detectors = tuple(detectors) if detectors is not None else None
        self._seen: list[str] = []

    @staticmethod
    def detector_columns(detector: str) -> tuple[str, ...]:
        return tuple(f"{prefix}_{detector}" for prefix, _ in PER_DETECTOR)

    def _names(self, batch: EvalBatch | None) -> list[str]:
        if self.detectors is not None:
            return list(self.detectors)
        if batch is None:
            return list(self._seen)
        return sorted(set(batch.detections_clean) & set(batch.detections_protected))

    @property
    def columns(self) -> tuple[str, ...]:
        return ("det_f1",) + tuple(c for d in self._names(None) for c in self.detector_columns(d))

    def columns_for(self, batch: EvalBatch) -> tuple[str, ...]:
        return ("det_f1",) + tuple(c for d in self._names(batch) for c in self.detector_columns(d))

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        names = self._names(batch)
        out: dict[str, float | None] = {}
        f1s = []
        for det in names:
            if det not in batch.detections_clean or det not in batch.detections_protected:
                raise TsdfBenchError(f"detection metric: detector {det!r} has no detections in this batch; "
                                     f"the batch has {sorted(batch.detections_clean)}")
            s = detection_scores(batch.detections_clean[det], batch.detections_protected[det],
                                 score_threshold=self.score_threshold, iou_threshold=self.iou_threshold)
            for column, key in PER_DETECTOR:
                out[f"{column}_{det}"] = s[key]
            if s["f1"] is not None:
                f1s.append(s["f1"])
            if det not in self._seen:
                self._seen.append(det)
        out["det_f1"] = sum(f1s) / len(f1s) if f1s else None
        return out
