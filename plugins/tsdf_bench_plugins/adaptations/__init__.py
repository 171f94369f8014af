"""Built-in adaptations, registered through the public hook like a third-party plugin."""
from tsdf_bench import AdaptationEntry, hookimpl, lazy


@hookimpl
def register_adaptations(register):
    pass
