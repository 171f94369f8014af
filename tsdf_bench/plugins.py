"""The plugin manager: loads entry points and plugin files, collects their records.

Broken plugins are warned about and skipped (naming the plugin and the error) unless
strict mode is on (``strict=True``, ``--strict-plugins`` or ``TSDF_BENCH_STRICT_PLUGINS=1``),
where they raise :class:`PluginError`.  Duplicate names are refused naming both sources.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError
from .records import ENTRY_TYPES, HOOK_FOR_KIND, KINDS, PluginEntry

ENTRY_POINT_GROUP = "tsdf_bench"
STRICT_ENV = "TSDF_BENCH_STRICT_PLUGINS"
hookimpl = pluggy.HookimplMarker("tsdf_bench")


class PluginWarning(UserWarning):
    """A plugin was skipped because it is broken."""


def strict_from_env() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """All plugins of one session: ``registry.get("defense", "tsdf").create(eps=0.05)``."""

    def __init__(self, plugins_dirs=(), strict: bool | None = None, entry_points: bool = True):
        self.strict = strict_from_env() if strict is None else strict
        # how to build the same registry in another process (the Ray executor's workers)
        self.spec = {"plugins_dirs": [str(Path(d).resolve()) for d in plugins_dirs or ()], "strict": self.strict,
                     "entry_points": entry_points}
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[str] = []
        self._origin: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._entries: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
        if entry_points:
            self._load_entry_points()
        for directory in plugins_dirs or ():
            self.load_dir(directory)
        self._collect()

    # -- loading -------------------------------------------------------------------------
    def _fail(self, message: str, exc: BaseException | None = None):
        self.problems.append(message)
        if self.strict:
            raise PluginError(message) from exc
        warnings.warn(message + f" (skipped; set {STRICT_ENV}=1 to make this fatal)", PluginWarning, stacklevel=3)

    def _load_entry_points(self):
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            name = f"{dist}:{ep.name}"
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import error of a third-party plugin
                self._fail(f"plugin {name!r} (entry point {ep.value!r}) failed to import: {type(exc).__name__}: {exc}", exc)
                continue
            self.register_plugin(module, name, dist, version)

    def load_dir(self, directory):
        """Load every ``*.py`` file of ``directory`` as an unpackaged plugin."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PluginError(f"--plugins-dir {directory}: not a directory; pass a folder of plugin .py files")
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            # a stable name (not hash(), which differs per process) so pickled plugin objects load elsewhere
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            mod_name = f"tsdf_bench_dir_plugin_{digest}_{path.stem}"
            try:
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001
                sys.modules.pop(mod_name, None)
                self._fail(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}", exc)
                continue
            self.register_plugin(module, str(path), "(plugins-dir)", "")

    def register_plugin(self, module, name, distribution="", version=""):
        try:
            self.pm.register(module, name=name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - pluggy validation errors, misspelt hooks
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(f"plugin {name!r} is invalid: {type(exc).__name__}: {exc}", exc)
            return
        self._origin[name] = (distribution, version)

    # -- collecting ----------------------------------------------------------------------
    def _collect(self):
        for kind in KINDS:
            hook = getattr(self.pm.hook, HOOK_FOR_KIND[kind])
            for impl in reversed(hook.get_hookimpls()):  # registration order
                self._call_impl(kind, impl)

    def _call_impl(self, kind, impl):
        source = impl.plugin_name
        dist, version = self._origin.get(source, ("", ""))
        expected = ENTRY_TYPES[kind]
        accepted: list[PluginEntry] = []

        def register(entry):
            if not isinstance(entry, expected):
                raise PluginError(f"registered {entry!r} from {HOOK_FOR_KIND[kind]}; expected a {expected.__name__}")
            if not isinstance(entry.name, str) or not entry.name or not callable(entry.factory):
                raise PluginError(f"{expected.__name__} needs a non-empty str name and a callable factory, got {entry!r}")
            if not isinstance(entry.description, str) or not entry.description.strip():
                raise PluginError(f"{expected.__name__} {entry.name!r} needs a one-line description")
            accepted.append(entry.__class__(entry.name, entry.description.strip().splitlines()[0], entry.factory,
                                            source=source, distribution=dist, version=version))

        try:
            impl.function(register=register)
        except Exception as exc:  # noqa: BLE001 - a plugin hook that raises
            self._fail(f"plugin {source!r} raised in {HOOK_FOR_KIND[kind]}: {type(exc).__name__}: {exc}", exc)
            return
        for entry in accepted:
            known = self._entries[kind].get(entry.name)
            if known is not None:
                # Duplicates are always an error: silently shadowing a defense would falsify results.
                raise PluginError(
                    f"duplicate {kind} name {entry.name!r}: registered by {known.source!r} and by {entry.source!r}; "
                    "rename one of them or uninstall one plugin"
                )
            self._entries[kind][entry.name] = entry

    # -- lookup --------------------------------------------------------------------------
    def names(self, kind) -> list[str]:
        return sorted(self._entries[self._kind(kind)])

    def entries(self, kind=None) -> list[PluginEntry]:
        kinds = KINDS if kind is None else (self._kind(kind),)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def get(self, kind, name) -> PluginEntry:
        kind = self._kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownNameError(kind, name, self._entries[kind]) from None

    def create(self, kind, name, **options):
        return self.get(kind, name).create(**options)

    @staticmethod
    def _kind(kind):
        if kind not in KINDS:
            raise UnknownNameError("plugin kind", kind, KINDS)
        return kind


_default: dict[tuple, Registry] = {}


def get_registry(plugins_dirs=(), strict=None) -> Registry:
    """A cached registry for the given plugin folders (one per process and folder set)."""
    key = (tuple(str(Path(d).resolve()) for d in plugins_dirs or ()), strict, strict_from_env())
    if key not in _default:
        _default[key] = Registry(plugins_dirs, strict)
    return _default[key]
