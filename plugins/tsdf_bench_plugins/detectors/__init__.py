"""Built-in detectors, registered through the public hook like a third-party plugin."""
from tsdf_bench import DetectorEntry, hookimpl, lazy


@hookimpl
def register_detectors(register):
    pass
