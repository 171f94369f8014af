"""Black-box cascade detectors for transfer evaluation (no gradients).

* ``haar``: Viola & Jones, "Rapid Object Detection using a Boosted Cascade of Simple Features",
  CVPR 2001 -- OpenCV's ``haarcascade_frontalface_default.xml`` (ships in opencv-python < 5).
  Scores are OpenCV's level weights (a confidence, not a probability).
* ``lbp``: Liao et al., "Learning Multi-scale Block Local Binary Patterns for Face Recognition",
  ICB 2007 -- scikit-image's LBP frontal-face cascade (no confidence: scores are 1).
"""
from __future__ import annotations

import numpy as np
import torch

from tsdf_bench.detectors.base import Detections, FaceDetector
from tsdf_bench.detectors.boxes import box_area
from tsdf_bench.detectors.common import check_images
from tsdf_bench.errors import CheckpointError


def _gray_uint8(images: torch.Tensor) -> list[np.ndarray]:
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    gray = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    return [g.round().clamp(0, 255).to(torch.uint8).cpu().numpy() for g in gray]


class _BlackBox(FaceDetector):
    differentiable = False

    def forward_attack(self, images):
        raise NotImplementedError(
            f"detector {self.name!r} is a black-box cascade with no differentiable path; use it only for "
            "transfer evaluation and attack a differentiable detector instead (mtcnn, retinaface, s3fd, dsfd)")


class HaarDetector(_BlackBox):
    """OpenCV Haar cascade.  Args: ``scale_factor=1.1``, ``min_neighbors=5``, ``min_size=20``."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 20):
        super().__init__()
        import cv2

        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise CheckpointError(f"haar: cannot load {path}; install opencv-python-headless<5 "
                                  "(OpenCV 5 wheels ship no Haar cascades)")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, int(min_size)

    @torch.no_grad()
    def detect(self, images):
        images = check_images(images, self.name)
        out = []
        for gray in _gray_uint8(images):
            rects, _, weights = self.cascade.detectMultiScale3(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=(self.min_size, self.min_size), outputRejectLevels=True)
            rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
            boxes = torch.from_numpy(np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], 1))
            scores = torch.from_numpy(np.asarray(weights, dtype=np.float32).reshape(-1))
            order = torch.argsort(scores, descending=True)
            out.append(Detections(boxes=boxes[order], scores=scores[order], landmarks=None))
        return out


class LBPDetector(_BlackBox):
    """scikit-image LBP cascade (its own grouping of raw windows).  Args: ``scale_factor=1.2``,
    ``step_ratio=1``, ``min_size=24`` pixels and ``min_fraction=0.1`` (smallest face side as a
    share of the image's short side; the larger of the two applies -- the cascade fires on small
    texture patches otherwise).  It has no confidence: every detection scores 1."""

    name = "lbp"

    def __init__(self, scale_factor: float = 1.2, step_ratio: float = 1.0, min_size: int = 24,
                 min_fraction: float = 0.1):
        super().__init__()
        from skimage import data
        from skimage.feature import Cascade

        self.cascade = Cascade(data.lbp_frontal_face_cascade_filename())
        self.scale_factor, self.step_ratio = scale_factor, step_ratio
        self.min_size, self.min_fraction = int(min_size), float(min_fraction)

    @torch.no_grad()
    def detect(self, images):
        images = check_images(images, self.name)
        out = []
        for gray in _gray_uint8(images):
            h, w = gray.shape
            side = max(self.min_size, int(self.min_fraction * min(h, w)))
            found = self.cascade.detect_multi_scale(
                img=gray, scale_factor=self.scale_factor, step_ratio=self.step_ratio,
                min_size=(side, side), max_size=(h, w))
            boxes = torch.tensor([[f["c"], f["r"], f["c"] + f["width"], f["r"] + f["height"]] for f in found],
                                 dtype=torch.float32).reshape(-1, 4)
            order = torch.argsort(box_area(boxes), descending=True)
            out.append(Detections(boxes=boxes[order], scores=torch.ones(len(boxes)), landmarks=None))
        return out
