"""What a config expands before it is validated: paths (relative to the config file, ``~`` and
``$VAR``), parameter sweeps into named variants, and the ``[transfer]`` variants (see
:mod:`tsdf_bench.config` for the layout)."""
from __future__ import annotations

import copy
import itertools
import os
import re

from .errors import ConfigError

PLUGIN_TABLES = ("models", "defenses", "detectors", "adaptations", "metrics")  # tables with per-plugin options

PATH_KEYS = ("checkpoint", "reference", "path")
PATH_SUFFIXES = ("_checkpoint", "_path", "_file", "_dir")
_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def is_path_option(key: str) -> bool:
    """Whether a plugin option named ``key`` is a path (resolved as the module docstring says)."""
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def expand_path(value: str, base_dir, what: str) -> str:
    """``value`` with ``$VAR``/``${VAR}`` and ``~`` expanded, made absolute against ``base_dir``;
    ``""`` stays ``""``.  An unset variable is a :class:`ConfigError` naming ``what``."""
    if not value:
        return value
    unset = [m.group(1).strip("{}") for m in _VAR.finditer(value) if m.group(1).strip("{}") not in os.environ]
    if unset:
        raise ConfigError(f"{what} = {value!r} uses ${unset[0]}, which is not set in the environment; "
                          f"set it (export {unset[0]}=...) or write the path out")
    path = os.path.expanduser(os.path.expandvars(value))
    if not os.path.isabs(path):
        path = os.path.join(os.fspath(base_dir), path)
    return os.path.normpath(path)


def resolve_paths(data: dict, base_dir, where: str) -> dict:
    """A copy of the parsed document with every path option resolved (see the module docstring)."""
    data = copy.deepcopy(data)
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("path", "attr_csv"):
            value = section.get(key)
            if isinstance(value, str) and value:
                resolved = expand_path(value, base_dir, f"{where}: [data] {key}")
                if key == "attr_csv" and not os.path.isabs(os.path.expanduser(os.path.expandvars(value))) \
                        and not os.path.exists(resolved) and section.get("path"):
                    # the older meaning: a name inside the image folder ([data] path, already resolved)
                    resolved = os.path.normpath(os.path.join(section["path"], os.path.expandvars(value)))
                section[key] = resolved
    for table in PLUGIN_TABLES:
        section = data.get(table)
        if not isinstance(section, dict):
            continue
        for name, options in section.items():
            if not isinstance(options, dict):
                continue
            for key, value in options.items():
                if is_path_option(key) and isinstance(value, str) and value:
                    options[key] = expand_path(value, base_dir, f"{where}: [{table}.{name}] {key}")
    return data


def transfer_variant(defense: str, model: str) -> str:
    return f"{defense}-from-{model}"


def expand_transfer(cfg, where: str) -> None:
    """Add the ``[transfer]`` variants to ``[defenses]`` (in place; already present ones are kept)."""
    t = cfg.transfer
    if not t.sources:
        return
    sources = list(cfg.models.names) if t.sources == "all" else list(t.sources)
    unknown = [m for m in sources if m not in cfg.models.names]
    if unknown or isinstance(t.sources, str) and t.sources != "all":
        raise ConfigError(f"{where}: [transfer] sources {unknown or t.sources!r} must be \"all\" or models of "
                          f"[models] names ({', '.join(cfg.models.names)})")
    base = list(t.defenses) if t.defenses else list(cfg.defenses.names)
    for d in base:
        if d not in cfg.defenses.names:
            raise ConfigError(f"{where}: [transfer] defenses names {d!r}, which is not in [defenses] names")
        for m in sources:
            name = transfer_variant(d, m)
            if name in cfg.defenses.names:
                continue
            cfg.defenses.names.append(name)
            cfg.defenses.options[name] = {**cfg.defenses.options.get(d, {}), "plugin": cfg.defenses.plugin_for(d),
                                          "fit_models": [m], "transfer_of": d}


def _label(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)


def expand_sweeps(names: list, options: dict, table: str, where: str) -> tuple[list, dict]:
    """Each table with ``sweep = {param = [values]}`` becomes one variant per value combination
    (see :class:`VariantsMixin`); other tables are kept as they are."""
    out_names, out_options = [], {k: v for k, v in options.items() if "sweep" not in v}
    for name in names:
        opts = options.get(name, {})
        if "sweep" not in opts:
            out_names.append(name)
            continue
        sweep = opts["sweep"]
        if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
            raise ConfigError(f"{where}: [{table}.{name}] sweep must be a table of non-empty value lists, "
                              f"e.g. sweep = {{quality = [70, 90]}}; got {sweep!r}")
        base = {k: v for k, v in opts.items() if k != "sweep"}
        base.setdefault("plugin", name)
        keys = sorted(sweep)
        for combo in itertools.product(*(sweep[k] for k in keys)):
            label = "-".join([name, *(f"{k}{_label(v)}" for k, v in zip(keys, combo))])
            out_names.append(label)
            out_options[label] = {**base, **dict(zip(keys, combo))}
    return out_names, out_options


