"""Poisoning of the attacker's face detectors (TSDF stage 1; FacePoison, Li et al., ICME 2023).

Per detector ``<det>`` present in the batch: ``det_precision_<det>``, ``det_recall_<det>``,
``det_f1_<det>``, ``duq_<det>``, ``det_conf_change_<det>``, ``det_count_change_<det>``; plus
``det_f1``, the mean F1 over the detectors that have one.  Clean detections with score > 0.7
are pseudo ground truth, protected detections with score > 0.7 match them at IoU >= 0.7 (TSDF).
FacePoison's protocol (confidence 0.9, IoU 0.5) is ``score_threshold=0.9, iou_threshold=0.5``.
Ours pools TP / FP / FN over the images.

The paper's form, beside ours: ``det_precision_paper_<det>``, ``det_recall_paper_<det>``,
``det_f1_paper_<det>`` and ``det_f1_paper``, as TSDF's ``evaluate_perturbation.py`` computes them:
per image, precision = TP / #protected boxes (1 when there is none) and recall = TP / #clean boxes
(1 when there is none), each clean box matched in turn to the unmatched protected box of highest
IoU (>= the threshold); precision and recall are averaged over the images (and, for
``det_f1_paper``, over the detectors too) and F1 is the harmonic mean of the averages (0 when both
are 0).  It differs from ours: an image that loses its face counts as precision 1, and a
detector's F1 is not the F1 of its pooled counts.

Ours are rates with counts, stored like the forgery rates (:func:`tsdf_bench.schema.rate_family`:
``det_recall_<det>_hits`` / ``_n``, ``_lo`` / ``_hi``, ``_photos``): recall is true positives of
the clean face boxes, precision true positives of the protected boxes, F1 ``2TP`` of
``2TP + FP + FN``.  The unit is a face box on an image; the views of one source photo are not
independent, so the 95% interval is a bootstrap over source photos (``EvalBatch.eval_photos``;
without them, over images).
"""
from __future__ import annotations

from typing import Sequence

from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.metrics import (DET_IOU_THRESHOLD, DET_SCORE_THRESHOLD, EvalBatch, Metric, box_iou,
                                detection_scores)
from tsdf_bench.schema import rate_family
from tsdf_bench.stats import rate_columns, trial_counts

PER_DETECTOR = (("det_precision", "precision"), ("det_recall", "recall"), ("det_f1", "f1"), ("duq", "duq"),
                ("det_conf_change", "conf_change"), ("det_count_change", "count_change"),
                ("det_precision_paper", "precision_paper"), ("det_recall_paper", "recall_paper"),
                ("det_f1_paper", "f1_paper"))
#: The per-detector columns that are rates with counts (hits, trials) per image.
RATES = {"det_precision": lambda tp, fp, fn, n: (tp, tp + fp), "det_recall": lambda tp, fp, fn, n: (tp, n),
         "det_f1": lambda tp, fp, fn, n: (2 * tp, 2 * tp + fp + fn)}


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rate_counts(clean: Sequence, protected: Sequence, photos: Sequence, *, score_threshold: float = DET_SCORE_THRESHOLD,
                iou_threshold: float = DET_IOU_THRESHOLD) -> dict[str, dict]:
    """``{"det_precision" | "det_recall" | "det_f1": {photo: [hits, trials]}}`` of one detector:
    each image matched on its own (as :func:`~tsdf_bench.metrics.detection_scores` matches them),
    its counts added to its source photo's."""
    per_image = [detection_scores([c], [p], score_threshold=score_threshold, iou_threshold=iou_threshold)
                 for c, p in zip(clean, protected)]
    out = {}
    for column, counts in RATES.items():
        pairs = [counts(int(s["tp"]), int(s["fp"]), int(s["fn"]), int(s["n_clean"])) for s in per_image]
        out[column] = trial_counts([h for h, _ in pairs], [n for _, n in pairs], photos)
    return out


def paper_detection_scores(clean: Sequence, protected: Sequence, *, score_threshold: float = DET_SCORE_THRESHOLD,
                           iou_threshold: float = DET_IOU_THRESHOLD) -> dict[str, float | None]:
    """TSDF's per-image detection precision and recall of one detector, averaged over the images,
    and the F1 of the averages: ``precision_paper``, ``recall_paper``, ``f1_paper`` (None for no
    image), plus the per-image lists ``precisions`` / ``recalls``."""
    if len(clean) != len(protected):
        raise TsdfBenchError(f"paper_detection_scores: {len(clean)} clean vs {len(protected)} protected "
                             "detection lists; pass one Detections per image for both")
    precisions, recalls = [], []
    for c, p in zip(clean, protected):
        gt = c.boxes[c.scores > score_threshold]
        pred = p.boxes[p.scores > score_threshold]
        iou = box_iou(gt, pred) if len(gt) and len(pred) else None
        taken: set[int] = set()
        tp = 0
        for i in range(len(gt)):
            best, best_iou = -1, 0.0
            for j in range(len(pred)):
                v = float(iou[i, j])
                if j not in taken and v > best_iou and v >= iou_threshold:
                    best, best_iou = j, v
            if best >= 0:
                tp += 1
                taken.add(best)
        precisions.append(tp / len(pred) if len(pred) else 1.0)
        recalls.append(tp / len(gt) if len(gt) else 1.0)
    if not precisions:
        return {"precision_paper": None, "recall_paper": None, "f1_paper": None, "precisions": [], "recalls": []}
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return {"precision_paper": p, "recall_paper": r, "f1_paper": _f1(p, r), "precisions": precisions,
            "recalls": recalls}


class DetectionMetric(Metric):
    """Detection precision/recall/F1/DUQ per detector on protected vs clean full-size images.

    Args: ``score_threshold`` (0.7), ``iou_threshold`` (0.7), ``detectors`` (names to report;
    default: every detector the batch carries).  :attr:`columns` lists the per-detector columns
    of ``detectors`` when given, else those of the detectors seen so far.
    """

    name = "detection"
    needs = ("detections_clean", "detections_protected", "eval_photos")  # no image: nothing per eval photo kept

    def __init__(self, score_threshold: float = DET_SCORE_THRESHOLD, iou_threshold: float = DET_IOU_THRESHOLD,
                 detectors: Sequence[str] | None = None):
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.detectors = tuple(detectors) if detectors is not None else None
        self._seen: list[str] = []

    @staticmethod
    def detector_columns(detector: str) -> tuple[str, ...]:
        """Every column of one detector: :data:`PER_DETECTOR`, the :data:`RATES` with their counts."""
        return tuple(c for prefix, _ in PER_DETECTOR
                     for c in (rate_family(f"{prefix}_{detector}") if prefix in RATES else (f"{prefix}_{detector}",)))

    def _names(self, batch: EvalBatch | None) -> list[str]:
        if self.detectors is not None:
            return list(self.detectors)
        if batch is None:
            return list(self._seen)
        return sorted(set(batch.detections_clean) & set(batch.detections_protected))

    @property
    def columns(self) -> tuple[str, ...]:
        return ("det_f1", "det_f1_paper") + tuple(c for d in self._names(None) for c in self.detector_columns(d))

    def columns_for(self, batch: EvalBatch) -> tuple[str, ...]:
        return ("det_f1", "det_f1_paper") + tuple(c for d in self._names(batch) for c in self.detector_columns(d))

    def compute(self, batch: EvalBatch) -> dict[str, float | None]:
        names = self._names(batch)
        out: dict[str, float | None] = {}
        f1s, all_p, all_r = [], [], []
        photos = batch.eval_photos
        for det in names:
            if det not in batch.detections_clean or det not in batch.detections_protected:
                raise TsdfBenchError(f"detection metric: detector {det!r} has no detections in this batch; "
                                     f"the batch has {sorted(batch.detections_clean)}")
            s = detection_scores(batch.detections_clean[det], batch.detections_protected[det],
                                 score_threshold=self.score_threshold, iou_threshold=self.iou_threshold)
            paper = paper_detection_scores(batch.detections_clean[det], batch.detections_protected[det],
                                           score_threshold=self.score_threshold, iou_threshold=self.iou_threshold)
            s = {**s, **paper}
            n_images = len(batch.detections_clean[det])
            units = [str(i) for i in range(n_images)] if photos is None else list(photos)
            if len(units) != n_images:
                raise TsdfBenchError(f"detection metric: {n_images} images of detector {det!r} but "
                                     f"{len(units)} eval_photos; give one source photo per image")
            for column, counts in rate_counts(batch.detections_clean[det], batch.detections_protected[det], units,
                                              score_threshold=self.score_threshold,
                                              iou_threshold=self.iou_threshold).items():
                out.update(rate_columns(f"{column}_{det}", counts))
            all_p.extend(paper["precisions"])
            all_r.extend(paper["recalls"])
            for column, key in PER_DETECTOR:
                out[f"{column}_{det}"] = s[key]
            if s["f1"] is not None:
                f1s.append(s["f1"])
            if det not in self._seen:
                self._seen.append(det)
        out["det_f1"] = sum(f1s) / len(f1s) if f1s else None
        # TSDF's overall F1: precision and recall averaged over images and detectors, then F1
        out["det_f1_paper"] = _f1(sum(all_p) / len(all_p), sum(all_r) / len(all_r)) if all_p else None
        return out
