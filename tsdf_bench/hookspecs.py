"""Hook specifications: the whole plugin API of tsdf-bench.

Every hook receives a ``register`` callback.  A plugin calls it once per thing it
provides, with a typed record from :mod:`tsdf_bench.records`::

    from tsdf_bench import hookimpl, DefenseEntry

    @hookimpl
    def register_defenses(register):
        register(DefenseEntry("my-defense", "One line saying what it does.", MyDefense))

Built-in plugins (package ``tsdf_bench_plugins``) come in through exactly this API and the
``tsdf_bench`` entry-point group, like a third party's.
"""
import pluggy

hookspec = pluggy.HookspecMarker("tsdf_bench")


@hookspec
def register_defenses(register):
    """Register defenses: ``register(DefenseEntry(name, description, factory))``."""


@hookspec
def register_models(register):
    """Register deepfake models: ``register(ModelEntry(name, description, factory))``."""


@hookspec
def register_detectors(register):
    """Register face detectors: ``register(DetectorEntry(name, description, factory))``."""


@hookspec
def register_adaptations(register):
    """Register attacker adaptations: ``register(AdaptationEntry(name, description, factory))``."""


@hookspec
def register_metrics(register):
    """Register metrics: ``register(MetricEntry(name, description, factory))``."""
