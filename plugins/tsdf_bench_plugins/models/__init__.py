"""Built-in models, registered through the public hook like a third-party plugin."""
from tsdf_bench import ModelEntry, hookimpl, lazy


@hookimpl
def register_models(register):
    pass
