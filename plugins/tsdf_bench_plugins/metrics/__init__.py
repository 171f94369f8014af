"""Built-in metrics, registered through the public hook like a third-party plugin."""
from tsdf_bench import MetricEntry, hookimpl, lazy


@hookimpl
def register_metrics(register):
    pass
