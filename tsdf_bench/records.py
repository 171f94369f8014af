"""Typed records that plugins hand to the ``register`` callback of a hook."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

KINDS = ("defense", "model", "detector", "adaptation", "metric")


@dataclass(frozen=True)
class PluginEntry:
    """One registered thing: a unique ``name``, a one-line ``description`` and a ``factory``.

    ``factory(**options)`` builds the object; options come from the run config.
    ``source`` (plugin name), ``distribution`` and ``version`` are filled in by the
    plugin manager, not by the plugin.
    """

    name: str
    description: str
    factory: Callable[..., Any]
    source: str = field(default="", compare=False)
    distribution: str = field(default="", compare=False)
    version: str = field(default="", compare=False)
    kind: ClassVar[str] = ""

    def create(self, **options):
        return self.factory(**options)


@dataclass(frozen=True)
class DefenseEntry(PluginEntry):
    kind: ClassVar[str] = "defense"


@dataclass(frozen=True)
class ModelEntry(PluginEntry):
    kind: ClassVar[str] = "model"


@dataclass(frozen=True)
class DetectorEntry(PluginEntry):
    kind: ClassVar[str] = "detector"


@dataclass(frozen=True)
class AdaptationEntry(PluginEntry):
    kind: ClassVar[str] = "adaptation"


@dataclass(frozen=True)
class MetricEntry(PluginEntry):
    kind: ClassVar[str] = "metric"


ENTRY_TYPES = {cls.kind: cls for cls in (DefenseEntry, ModelEntry, DetectorEntry, AdaptationEntry, MetricEntry)}
HOOK_FOR_KIND = {
    "defense": "register_defenses",
    "model": "register_models",
    "detector": "register_detectors",
    "adaptation": "register_adaptations",
    "metric": "register_metrics",
}


def lazy(target: str) -> Callable[..., Any]:
    """A factory that imports ``"package.module:Class"`` only when first called.

    Keeps ``tsdf-bench plugins`` fast and lets a plugin with a missing optional dependency
    still be listed (the import error surfaces, with its name, when it is used).
    """
    module_name, _, attr = target.partition(":")

    def factory(**options):
        import importlib

        return getattr(importlib.import_module(module_name), attr)(**options)

    factory.__qualname__ = factory.__name__ = f"lazy({target})"
    factory.target = target
    return factory


def resolve_factory(factory):
    """The class or function behind a plugin factory (a :func:`lazy` target is imported); None
    when it cannot be imported."""
    target = getattr(factory, "target", None)
    if target:
        import importlib

        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001
            return None
    return factory
