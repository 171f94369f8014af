"""The toy world of the defense tests: re-exported from tsdf_bench.testing (one copy)."""
from tsdf_bench.testing import BlackBoxDetector, ToyDetector, ToyGAN, toy_attrs, toy_images  # noqa: F401
