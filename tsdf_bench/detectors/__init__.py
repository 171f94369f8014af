"""Face detector interface (the plugins live in ``tsdf_bench_plugins.detectors``)."""
from .base import Detections, DetectorOutput, FaceDetector

__all__ = ["Detections", "DetectorOutput", "FaceDetector"]
