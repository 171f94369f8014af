"""Built-in defenses, registered through the public hook like a third-party plugin."""
from tsdf_bench import DefenseEntry, hookimpl, lazy


@hookimpl
def register_defenses(register):
    pass
