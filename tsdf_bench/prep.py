"""The attacker's data preparation: detect, pick one face per image, crop or align, resize.

This is the step TSDF poisons (the attacker's face detector runs before any retraining): a
protected image that yields no face, or a crop in the wrong place, never reaches the
deepfake model's training set.  ``DataPreparation`` is one component so that defenses,
adaptations and metrics all see the same preparation.

Example::

    prep = DataPreparation(registry.create("detector", "mtcnn"), output_size=64, crop="margin")
    result = prep(images)            # images [B, 3, H, W] in [-1, 1]
    result.crops                     # [K, 3, 64, 64], for the K images in result.kept
    result.failures                  # {index: "no face detected", ...}
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .detectors.align import bilinear_crops, similarity_matrix, warp_affine, warped_region_box
from .detectors.base import FaceDetector
from .detectors.boxes import box_area, box_iou, square_boxes
from .detectors.common import check_images
from .errors import ConfigError

CROPS = ("margin", "align", "frame")
# "frame": the framing of aligned CelebA after CenterCrop(170), which the embedded demo faces copy
# (tsdf_bench.data.embedded): the box height is FRAME_FRACTION of the side, and the image centre
# sits FRAME_SHIFT of the side above the box centre (measured with MTCNN on the framed demo faces:
# box height 0.58-0.60 of the side, box centre 0.60 down).
FRAME_FRACTION = 0.6
FRAME_SHIFT = 0.09
PICKS = ("largest", "most_confident")


@dataclass
class PrepResult:
    """What the preparation kept.

    ``crops [K, 3, S, S]`` in [-1, 1]; ``kept`` (LongTensor [K]) indices into the batch;
    ``boxes [K, 4]`` the chosen face's detection box; ``crop_boxes [K, 4]`` the source region
    each crop shows (xyxy pixels; for "align", the box around the rotated region);
    ``scores [K]``; ``landmarks [K, 5, 2]`` or None; ``attrs`` the rows of the given attrs for
    the kept images (or None); ``failures`` {batch index: reason} for the others.
    """

    crops: torch.Tensor
    kept: torch.Tensor
    boxes: torch.Tensor
    crop_boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor | None = None
    attrs: torch.Tensor | None = None
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        total = len(self.kept) + len(self.failures)
        return len(self.kept) / total if total else 0.0


class DataPreparation:
    """Detect faces and turn each image into one face crop (or a recorded failure).

    Args:
        detector: a :class:`~tsdf_bench.detectors.base.FaceDetector`.
        output_size: side S of the square crops.
        crop: ``"margin"`` (square around the box, enlarged by ``margin`` of its side, resized),
            ``"align"`` (5-landmark similarity alignment to the ArcFace template; needs a
            detector with landmarks: mtcnn or retinaface) or ``"frame"`` (the framing the models
            expect: side = box height / ``FRAME_FRACTION``, centre ``FRAME_SHIFT`` of the side above
            the box centre, so an already framed face maps to itself within a few pixels).
        margin: extra side fraction for ``"margin"`` (default 0.2).
        min_score: faces scoring below are ignored (default 0.0: the detector's own threshold).
        min_face: faces whose box side (max of width, height) is below this many pixels are
            ignored (default 0).
        pick: ``"largest"`` (default) or ``"most_confident"`` face when several are found.

    Crops are differentiable in the images (the boxes are constants).
    """

    def __init__(self, detector: FaceDetector, output_size: int, crop: str = "margin", margin: float = 0.2,
                 min_score: float = 0.0, min_face: float = 0.0, pick: str = "largest"):
        if not isinstance(detector, FaceDetector):
            raise ConfigError(f"DataPreparation: detector must be a FaceDetector, got {type(detector).__name__}; "
                              "create one with registry.create('detector', NAME)")
        if crop not in CROPS:
            raise ConfigError(f"DataPreparation: crop must be one of {CROPS}, got {crop!r}")
        if pick not in PICKS:
            raise ConfigError(f"DataPreparation: pick must be one of {PICKS}, got {pick!r}")
        if int(output_size) < 8:
            raise ConfigError(f"DataPreparation: output_size must be >= 8 pixels, got {output_size}")
        if margin < 0:
            raise ConfigError(f"DataPreparation: margin must be >= 0, got {margin}")
        self.detector, self.output_size, self.crop, self.margin = detector, int(output_size), crop, float(margin)
        self.min_score, self.min_face, self.pick = float(min_score), float(min_face), pick

    def _choose(self, det):
        """Index of the chosen face in ``det`` or a failure reason."""
        if len(det) == 0:
            return None, "no face detected"
        side = torch.maximum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
        ok = det.scores >= self.min_score
        if not ok.any():
            return None, f"no face scores >= min_score {self.min_score:g} (best {float(det.scores.max()):.3f})"
        ok &= side >= self.min_face
        if not ok.any():
            return None, f"face too small (largest side {float(side.max()):.1f} px < min_face {self.min_face:g})"
        key = box_area(det.boxes) if self.pick == "largest" else det.scores.float()
        key = torch.where(ok, key, torch.full_like(key, -float("inf")))
        return int(torch.argmax(key)), None

    def __call__(self, images: torch.Tensor, attrs: torch.Tensor | None = None) -> PrepResult:
        images = check_images(images, self.detector.name)
        if attrs is not None and len(attrs) != len(images):
            raise ValueError(f"DataPreparation: attrs has {len(attrs)} rows for {len(images)} images")
        detections = self.detector.detect(images.detach())
        kept, boxes, scores, lms, failures = [], [], [], [], {}
        for i, det in enumerate(detections):
            j, reason = self._choose(det)
            if reason is None and self.crop == "align" and det.landmarks is None:
                raise ConfigError(f"DataPreparation: crop='align' needs landmarks but detector "
                                  f"{self.detector.name!r} gives none; use crop='margin' or mtcnn/retinaface")
            if reason is not None:
                failures[i] = reason
                continue
            kept.append(i)
            boxes.append(det.boxes[j].float())
            scores.append(det.scores[j].float())
            lms.append(det.landmarks[j].float() if det.landmarks is not None else None)
        s = self.output_size
        if not kept:
            empty = torch.zeros(0, 4)
            return PrepResult(images.new_zeros(0, 3, s, s), torch.zeros(0, dtype=torch.long), empty, empty.clone(),
                              torch.zeros(0), None, None if attrs is None else attrs[:0], failures)
        kept_t = torch.tensor(kept, dtype=torch.long)
        boxes_t = torch.stack(boxes)
        landmarks = torch.stack(lms) if lms[0] is not None else None
        result = PrepResult(crops=None, kept=kept_t, boxes=boxes_t, crop_boxes=None, scores=torch.stack(scores),
                            landmarks=landmarks, attrs=None if attrs is None else attrs[kept_t.to(attrs.device)],
                            failures=failures)
        result.crops, result.crop_boxes = self._crop(images, result)
        return result

    def _crop(self, images, result: PrepResult):
        """``(crops, crop_boxes)`` of ``result``'s kept faces, cut from ``images``."""
        s, kept = self.output_size, result.kept
        if self.crop == "align":
            crops, crop_boxes = [], []
            for i, pts in zip(kept.tolist(), result.landmarks):
                matrix = similarity_matrix(pts.numpy(), s)
                crops.append(warp_affine(images[i], matrix, s))
                crop_boxes.append(warped_region_box(matrix, s))
            return torch.stack(crops), torch.stack(crop_boxes)
        crop_boxes = frame_boxes(result.boxes) if self.crop == "frame" else square_boxes(result.boxes, self.margin)
        rois = torch.cat([kept[:, None].float(), crop_boxes], 1)
        return bilinear_crops(images, rois, s, supersample=2), crop_boxes

    def crop_like(self, images: torch.Tensor, result: PrepResult) -> torch.Tensor:
        """Cut ``images`` (another version of the batch ``result`` came from, e.g. the clean photos)
        with ``result``'s geometry: the same faces, boxes and landmarks."""
        images = check_images(images, self.detector.name)
        if result.kept.numel() == 0:
            return images.new_zeros(0, 3, self.output_size, self.output_size)
        return self._crop(images, result)[0]

    def in_batches(self, images: torch.Tensor, batch_size: int, new_crops=torch.empty) -> PrepResult:
        """``self(images)`` one batch of ``batch_size`` images at a time: the detector's activations
        and one batch's crops are in memory at once, whatever the number of images.  The kept
        faces' crops are written into ``new_crops(shape)`` (e.g. a memory-mapped tensor,
        :func:`tsdf_bench.harness.mapped.new_images`).  One batch (``batch_size >= len(images)``)
        gives exactly ``self(images)``; indices and failures are those of the whole set."""
        n, step = images.shape[0], max(1, int(batch_size))
        if n == 0:
            return self(images)
        s = self.output_size
        crops, filled, parts = new_crops((n, 3, s, s)), 0, []
        for start in range(0, n, step):
            res = self(images[start:start + step])
            k = res.kept.numel()
            crops[filled:filled + k] = res.crops.detach().float().cpu()
            filled += k
            parts.append((start, res))
        kept = [(start, r) for start, r in parts if r.kept.numel()]
        failures = {start + i: why for start, r in parts for i, why in r.failures.items()}
        if not kept:  # no face anywhere: the empty result, with every photo's failure
            return replace(parts[0][1], crops=crops[:0], failures=failures)
        cat = lambda name: torch.cat([getattr(r, name) for _, r in kept])  # noqa: E731
        landmarks = [r.landmarks for _, r in kept]
        return PrepResult(crops[:filled], torch.cat([r.kept + start for start, r in kept]), cat("boxes"),
                          cat("crop_boxes"), cat("scores"),
                          None if any(lm is None for lm in landmarks) else torch.cat(landmarks), failures=failures)

    def crop_like_in_batches(self, images: torch.Tensor, result: PrepResult, batch_size: int,
                             new_crops=torch.empty) -> torch.Tensor:
        """:meth:`crop_like` one batch of ``batch_size`` images at a time (``result`` made of the
        whole set, e.g. by :meth:`in_batches`), written into ``new_crops(shape)``."""
        step, kept = max(1, int(batch_size)), result.kept
        if kept.numel() == 0:
            return self.crop_like(images, result)
        out = new_crops((kept.numel(), 3, self.output_size, self.output_size))
        for start in range(0, images.shape[0], step):
            rows = ((kept >= start) & (kept < start + step)).nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = PrepResult(None, kept[rows] - start, result.boxes[rows], result.crop_boxes[rows],
                              result.scores[rows], None if result.landmarks is None else result.landmarks[rows])
            out[rows[0]:rows[-1] + 1] = self.crop_like(images[start:start + step], part).detach().float().cpu()
        return out


def frame_boxes(boxes: torch.Tensor, fraction: float = FRAME_FRACTION, shift: float = FRAME_SHIFT) -> torch.Tensor:
    """The ``"frame"`` crop square of each detection box (see :class:`DataPreparation`)."""
    side = (boxes[..., 3] - boxes[..., 1]) / fraction
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 - shift * side
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=-1)


def crop_ious(clean: PrepResult, protected: PrepResult) -> dict[int, float]:
    """IoU between the crop region on each clean image and on its protected version, for every
    image the clean preparation kept (0.0 where the protected image failed)."""
    out = {}
    pos = {int(k): n for n, k in enumerate(protected.kept)}
    for n, k in enumerate(clean.kept.tolist()):
        out[k] = float(box_iou(clean.crop_boxes[n], protected.crop_boxes[pos[k]])[0, 0]) if k in pos else 0.0
    return out
