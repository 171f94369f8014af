"""Run configs: a TOML file resolved into dataclasses, validated, and hashed.

A config names *what* to run (defenses x models x adaptations x seeds, for how many retraining
rounds) and on *which* data.  Every key is checked: a typo is a :class:`ConfigError` naming the
key, its table and the closest valid key, so a misspelt option never silently falls back to a
default.  Plugin names are checked against the registry by :func:`check_names` (an unknown name
raises the registry's :class:`UnknownNameError`, which lists the valid names).

Layout (every table but ``[models]`` and ``[defenses]`` is optional)::

    [run]          name, scale ("paper"|"demo"|"smoke"), seeds, device ("auto"|"cpu"|"cuda"),
                   output (default "runs"), rounds (0 = inference only; 1 = round 0 + one
                   retraining round; ...), publish (a folder that also gets the leaderboard
                   tables, e.g. "leaderboards/demo"; default none), optimize (default true:
                   shared clean outputs, batched targets, bf16/channels_last on CUDA; false:
                   the papers' straightforward loops -- see tsdf_bench.speed), workers
                   (default 1: this process; N > 1: N local processes, one torch thread each,
                   one (seed, defense) group at a time -- tsdf_bench.harness.pool)
    [data]         source ("embedded"|"celeba"|"folder"|"synthetic"), path, image_size,
                   n_train_defense (images the defense is fitted on), n_collect (protected
                   images the attacker collects to retrain), n_eval (held-out protected images
                   measured), batch_size, protocol (CelebA: "cmua"|"stargan"|"official"),
                   attributes (label columns; default AttGAN's 13), attr_csv (folder labels)
    [models]       names, train (default true: demo/smoke models without a checkpoint are trained
                   on first use by tsdf_bench.models.zoo; false: the plugin's model as created);
                   [models.<name>] options passed to the model (checkpoint = "...")
    [defenses]     names, eps (default budget for all); [defenses.<name>] options
    [detectors]    names (measured), attacker (the detector of the attacker's data preparation,
                   default "mtcnn"), crop (the data preparation's crop mode: "frame", "margin" or
                   "align"; see tsdf_bench.prep), white_box (the
                   detectors the defenses are fitted against; default: the differentiable ones
                   of names + attacker); [detectors.<name>] options
    [adaptations]  names (default ["retrain"]), g_steps (the attacker's budget per retraining
                   round in generator updates; D steps follow the model's n_critic);
                   [adaptations.<name>] options
    [metrics]      names (default: every registered metric); [metrics.<name>] options

Paths.  Every option that names a file or folder -- ``[data] path`` and ``attr_csv``, and in any
plugin table the keys ``checkpoint``, ``reference``, ``path`` and those ending in
``_checkpoint``, ``_path``, ``_file`` or ``_dir`` (``[models.stargan] checkpoint``,
``[models.hisd] reference``, ``[detectors.s3fd] checkpoint``) -- has ``~`` and ``$VAR`` /
``${VAR}`` expanded (an unset variable is an error) and, when still relative, is resolved
against the folder of the config file (:func:`load_config`), or against the current directory
for a config given as a dict (:func:`from_dict`).  The resolved config holds absolute paths, so
the copy stored with a run reads back the same from anywhere.  A relative ``attr_csv`` that is
not in the config's folder is looked up in ``[data] path`` (its older meaning: a name inside the
image folder).  ``[run] output`` and ``publish`` are where results are written, not inputs: they
stay relative to the current directory.

``[data] check_files`` ("used", default, or "all"; CelebA only, see
:mod:`tsdf_bench.data.celeba`) decides which images must exist; like ``output`` it is not hashed.

``source = "synthetic"`` is seeded random smooth images with random attributes: it exists for
tests of the harness only and says nothing about faces.

The config hash is the sha256 of the canonical JSON of the resolved config *without*
``data.check_files``, ``run.output`` and ``run.publish`` (where results are written does not change them) and
``run.optimize`` (the optimised and straightforward paths compute the same rows up to float
rounding, so their rows are comparable; each row records the path in its ``optimize``
provenance field); ``--resume`` requires it to match.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config_expand import expand_sweeps, expand_transfer, resolve_paths  # noqa: F401 - re-exported
from .errors import ConfigError

SCALES = ("paper", "demo", "smoke")
DEVICES = ("auto", "cpu", "cuda")
SOURCES = ("embedded", "celeba", "folder", "synthetic")


@dataclass
class RunSection:
    name: str = "run"
    scale: str = "demo"
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    output: str = "runs"
    rounds: int = 1
    publish: str = ""  # a folder that also receives the leaderboard tables (demo: leaderboards/demo)
    optimize: bool = True  # speed optimisations (tsdf_bench.speed); not hashed: rows agree either way
    workers: int = 1  # local worker processes, one torch thread each (tsdf_bench.harness.pool); not hashed


@dataclass
class DataSection:
    source: str = "embedded"
    path: str = ""
    image_size: int = 128
    n_train_defense: int = 16
    n_collect: int = 64
    n_eval: int = 16
    batch_size: int = 8
    protocol: str = "cmua"  # CelebA split protocol: "cmua", "stargan" or "official"
    attributes: list[str] = field(default_factory=list)  # label columns to load (default: AttGAN's 13)
    attr_csv: str = ""  # folder source: a CSV of 0/1 labels (path, or a name relative to path)
    check_files: str = "used"  # CelebA: "used" (only the images read must exist) or "all"; not hashed


@dataclass
class PluginSection:
    """``names`` plus one options table per plugin (``[defenses.tsdf] passes = 2``)."""

    names: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def options_for(self, name: str) -> dict[str, Any]:
        return dict(self.options.get(name, {}))


@dataclass
class ModelsSection(PluginSection):
    train: bool = True  # demo/smoke models without a checkpoint are trained on first use (models.zoo)


class VariantsMixin:
    """A table may name the plugin it configures, so variants of one plugin (an ablation, a
    parameter sweep) run side by side under their own names::

        names = ["tsdf", "tsdf-poison-only"]
        [defenses.tsdf-poison-only]
        plugin = "tsdf"
        interruption = false

    ``sweep = {param = [v1, v2]}`` in a table expands it into one variant per value (per
    combination, with several parameters), named ``<table>-<param><value>``::

        [adaptations.jpeg]
        sweep = {quality = [70, 90]}      # -> jpeg-quality70, jpeg-quality90
    """

    kind = "plugin"

    def plugin_for(self, name: str) -> str:
        """The registered plugin that ``name`` configures (``plugin = ...`` in its table, else itself)."""
        plugin = self.options.get(name, {}).get("plugin", name)
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(f"[{self.table}.{name}] plugin must be a {self.kind} name (a string), got {plugin!r}")
        return plugin

    def _options(self, name: str) -> dict[str, Any]:
        options = dict(self.options.get(name, {}))
        options.pop("plugin", None)
        return options


@dataclass
class DefensesSection(VariantsMixin, PluginSection):
    """Defenses; variants and sweeps as in :class:`VariantsMixin`."""

    eps: float = 0.05
    table = "defenses"
    kind = "defense"

    def options_for(self, name: str) -> dict[str, Any]:
        options = {"eps": self.eps, **self._options(name)}
        for key in ("fit_models", "transfer_of"):  # the runner's and the leaderboard's, not the plugin's
            options.pop(key, None)
        return options

    def fit_models_for(self, name: str) -> list[str] | None:
        """The models ``name`` is fitted against (``fit_models = [...]`` in its table; None: all)."""
        models = self.options.get(name, {}).get("fit_models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            raise ConfigError(f"[defenses.{name}] fit_models must be a list of model names, got {models!r}")
        return models


@dataclass
class DetectorsSection(PluginSection):
    attacker: str = "mtcnn"
    crop: str = "margin"
    white_box: list[str] | None = None
    # a measured detector that fails to load (or to detect) leaves its columns out of the rows,
    # named in ``detectors_missing``, instead of failing the preflight and every cell
    allow_missing_detectors: bool = False


@dataclass
class AdaptationsSection(VariantsMixin, PluginSection):
    """Adaptations; variants and sweeps as in :class:`VariantsMixin`."""

    names: list[str] = field(default_factory=lambda: ["retrain"])
    g_steps: int = 100  # the attacker's budget per retraining round, in generator updates
    table = "adaptations"
    kind = "adaptation"

    def options_for(self, name: str) -> dict[str, Any]:
        options = self._options(name)
        for key in ("compare_to", "attacker_detector", "defenses"):  # the runner's (see their methods)
            options.pop(key, None)
        return options

    def defenses_for(self, name: str) -> list[str] | None:
        """The defenses this adaptation is run on (``defenses = [...]`` in its table; None: every
        one).  A robustness transform need not run on the defenses no table reads it for (``none``,
        whose ROB is undefined; the transfer variants, which only the TE table reads)."""
        names = self.options.get(name, {}).get("defenses")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise ConfigError(f"[adaptations.{name}] defenses must be a list of defense names, got {names!r}")
        return names

    def attacker_detector(self, name: str) -> str | None:
        """The detector of this adaptation's attacker (``attacker_detector`` in its table), None:
        ``[detectors] attacker``.  Lets one run compare attackers that use different detectors."""
        return self.options.get(name, {}).get("attacker_detector")

    def compare_to(self, name: str) -> str:
        """What a purification's forgeries are compared with: ``"purified"`` (default: G(T(x)), so
        only the defense is measured) or ``"clean"`` (G(x), the Proactive Defense Benchmark's)."""
        value = self.options.get(name, {}).get("compare_to", "purified")
        if value not in ("purified", "clean"):
            raise ConfigError(f"[adaptations.{name}] compare_to must be \"purified\" or \"clean\", got {value!r}")
        return value


@dataclass
class MetricsSection(PluginSection):
    pass


@dataclass
class TransferSection:
    """Transferability (PDB's TE): each defense in ``defenses`` (default: all) is also fitted on
    each model in ``sources`` alone (``"all"``: every model) as a variant ``<defense>-from-<model>``
    (``fit_models = [model]``) and measured on every model; the leaderboard's TE table normalises
    the black-box results by the white-box one (fitted on the target itself)."""

    sources: list[str] | str = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)


SECTIONS = {
    "run": RunSection, "data": DataSection, "models": ModelsSection, "defenses": DefensesSection,
    "detectors": DetectorsSection, "adaptations": AdaptationsSection, "metrics": MetricsSection,
    "transfer": TransferSection,
}
PLUGIN_KIND = {"models": "model", "defenses": "defense", "detectors": "detector",
               "adaptations": "adaptation", "metrics": "metric"}
REQUIRED = {"models": "names", "defenses": "names"}


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    defenses: DefensesSection = field(default_factory=DefensesSection)
    detectors: DetectorsSection = field(default_factory=DetectorsSection)
    adaptations: AdaptationsSection = field(default_factory=AdaptationsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    source: str = ""  # the file it came from (not hashed)

    def to_dict(self) -> dict:
        """The resolved config as plain data (the form stored with every run)."""
        data = {name: asdict(getattr(self, name)) for name in SECTIONS}
        return json.loads(json.dumps(data))  # plain lists/dicts, a deep copy

    @property
    def hash(self) -> str:
        """sha256 of the canonical resolved config (``run.output``, ``run.publish``,
        ``run.optimize`` and ``run.workers`` excluded: none of them changes what a row means)."""
        data = self.to_dict()
        for key in ("output", "publish", "optimize", "workers"):
            data["run"].pop(key, None)
        data["data"].pop("check_files", None)  # which files are checked does not change a row
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def white_box_detectors(self, differentiable: dict[str, bool]) -> list[str]:
        """The detectors defenses are fitted against (see :class:`DetectorsSection`)."""
        if self.detectors.white_box is not None:
            return list(self.detectors.white_box)
        names = list(dict.fromkeys([*self.detectors.names, self.detectors.attacker]))
        return [n for n in names if differentiable.get(n, False)]

    def replace(self, **overrides) -> "RunConfig":
        """A copy with ``section__key=value`` overrides (``run__device="cpu"``), validated again."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition("__")
            data[section][name] = value
        return from_dict(_unresolve(data), source=self.source)


def _unresolve(data: dict) -> dict:
    """Turn ``options`` back into sub-tables so :func:`from_dict` can re-read a resolved config."""
    out = copy.deepcopy(data)
    for section in PLUGIN_KIND:
        if section in out:
            options = out[section].pop("options", {}) or {}
            for name, opts in options.items():
                out[section][name] = opts
            if out[section].get("white_box", "") is None:
                out[section].pop("white_box")
    return out


def _closest(name, valid):
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.4)
    return f" Did you mean {match[0]!r}?" if match else ""


def _unknown(key, table, valid, where):
    valid = sorted(valid)
    return ConfigError(f"{where}: unknown key {key!r} in [{table}].{_closest(key, valid)} "
                       f"Valid keys of [{table}]: {', '.join(valid)}.")


def _check_type(value, key, table, where, annotation):
    """Check one value against its field's default/annotation; return it (ints become floats where needed)."""
    bad = ConfigError
    ann = str(annotation)
    if ann.startswith("list"):
        if not isinstance(value, list):
            raise bad(f"{where}: [{table}] {key} must be a list, got {value!r}")
        inner = int if "int" in ann else str
        for item in value:
            if not isinstance(item, inner) or isinstance(item, bool):
                raise bad(f"{where}: [{table}] {key} must hold {inner.__name__}s, got {item!r}")
        return list(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise bad(f"{where}: [{table}] {key} must be true or false, got {value!r}")
        return value
    if ann == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{where}: [{table}] {key} must be an integer, got {value!r}")
        return value
    if ann == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"{where}: [{table}] {key} must be a number, got {value!r}")
        return float(value)
    if ann == "str":
        if not isinstance(value, str):
            raise bad(f"{where}: [{table}] {key} must be a string, got {value!r}")
        return value
    return value


def from_dict(data: dict, source: str = "<dict>", base_dir=None) -> RunConfig:
    """Resolve and validate a parsed TOML document (see the module docstring for the layout).

    Relative paths resolve against ``base_dir`` (default: the current directory)."""
    where = source
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a run config is a TOML document of tables")
    data = resolve_paths(data, Path.cwd() if base_dir is None else Path(base_dir), where)
    for table in data:
        if table not in SECTIONS:
            raise ConfigError(f"{where}: unknown table [{table}].{_closest(table, SECTIONS)} "
                              f"Valid tables: {', '.join(SECTIONS)}.")
    for table, key in REQUIRED.items():
        if not data.get(table, {}).get(key):
            raise ConfigError(f"{where}: [{table}] needs a non-empty {key} list, e.g. {key} = [\"...\"]")
    resolved = {}
    for table, cls in SECTIONS.items():
        raw = data.get(table, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {table} must be a table ([{table}]), got {raw!r}")
        kwargs, options = {}, {}
        valid = {f.name: f for f in fields(cls) if f.name != "options"}
        for key, value in raw.items():
            if table == "transfer" and key == "sources" and value == "all":
                kwargs[key] = value
            elif key in valid:
                f = valid[key]
                annotation = "list[str]" if key == "white_box" else f.type
                kwargs[key] = _check_type(value, key, table, where, annotation)
            elif table in PLUGIN_KIND and isinstance(value, dict):
                options[key] = dict(value)
            else:
                raise _unknown(key, table, valid, where)
        if table in PLUGIN_KIND:
            listed = set(kwargs.get("names", cls().names))
            if table == "detectors":
                listed |= {kwargs.get("attacker", "mtcnn")} | set(kwargs.get("white_box") or [])
            for name in options:
                if name not in listed:
                    raise ConfigError(
                        f"{where}: options table [{table}.{name}] is for {name!r}, which is not in "
                        f"[{table}] names.{_closest(name, listed)} Add it to names or fix the table name.")
            if table in ("defenses", "adaptations"):
                kwargs["names"], options = expand_sweeps(kwargs.get("names", cls().names), options, table, where)
            kwargs["options"] = options
        resolved[table] = cls(**kwargs)
    cfg = RunConfig(**resolved, source=str(source))
    expand_transfer(cfg, where)
    _check_values(cfg, where)
    return cfg


def _check_values(cfg: RunConfig, where: str):
    r, d = cfg.run, cfg.data
    if r.scale not in SCALES:
        raise ConfigError(f"{where}: [run] scale = {r.scale!r}; use one of {', '.join(SCALES)}."
                          f"{_closest(r.scale, SCALES)}")
    if r.device not in DEVICES:
        raise ConfigError(f"{where}: [run] device = {r.device!r}; use one of {', '.join(DEVICES)}")
    if not r.seeds:
        raise ConfigError(f"{where}: [run] seeds is empty; give at least one seed, e.g. seeds = [0]")
    if len(set(r.seeds)) != len(r.seeds):
        raise ConfigError(f"{where}: [run] seeds has duplicates: {r.seeds}")
    if not isinstance(r.workers, int) or r.workers < 1:
        raise ConfigError(f"{where}: [run] workers = {r.workers!r}; use 1 (this process) or more, e.g. workers = 2")
    if r.rounds < 0:
        raise ConfigError(f"{where}: [run] rounds = {r.rounds}; use 0 (inference only) or more")
    if d.source not in SOURCES:
        raise ConfigError(f"{where}: [data] source = {d.source!r}; use one of {', '.join(SOURCES)}."
                          f"{_closest(d.source, SOURCES)}")
    if d.source in ("celeba", "folder") and not d.path:
        raise ConfigError(f"{where}: [data] source = {d.source!r} needs path = \"/path/to/images\"")
    for key in ("image_size", "n_train_defense", "n_eval", "batch_size"):
        if getattr(d, key) < 1:
            raise ConfigError(f"{where}: [data] {key} must be >= 1, got {getattr(d, key)}")
    if d.n_collect < 0:
        raise ConfigError(f"{where}: [data] n_collect must be >= 0, got {d.n_collect}")
    if d.check_files not in ("used", "all"):
        raise ConfigError(f"{where}: [data] check_files = {d.check_files!r}; use \"used\" (only the images the "
                          "run reads must exist, the default) or \"all\" (every image of the CelebA splits)")
    from .prep import CROPS

    if cfg.detectors.crop not in CROPS:
        raise ConfigError(f"{where}: [detectors] crop = {cfg.detectors.crop!r}; use \"frame\" (the models' framing), "
                          "\"margin\" (a square around the box) or \"align\" (5-landmark alignment)")
    for name in cfg.adaptations.names:
        cfg.adaptations.compare_to(name)  # a bad value fails at load, not mid-run
        unknown = [d for d in cfg.adaptations.defenses_for(name) or () if d not in cfg.defenses.names]
        if unknown:
            raise ConfigError(f"{where}: [adaptations.{name}] defenses {unknown} are not in [defenses] names "
                              f"({', '.join(cfg.defenses.names)}){_closest(unknown[0], cfg.defenses.names)}")
    for name in cfg.defenses.names:
        unknown = [m for m in cfg.defenses.fit_models_for(name) or () if m not in cfg.models.names]
        if unknown:
            raise ConfigError(f"{where}: [defenses.{name}] fit_models {unknown} are not in [models] names "
                              f"({', '.join(cfg.models.names)})")
    if not 0 <= cfg.defenses.eps <= 2:
        raise ConfigError(f"{where}: [defenses] eps = {cfg.defenses.eps} is outside [0, 2] (the [-1, 1] scale)")
    if cfg.adaptations.g_steps < 0:
        raise ConfigError(f"{where}: [adaptations] g_steps must be >= 0, got {cfg.adaptations.g_steps}")
    for section in PLUGIN_KIND:
        names = getattr(cfg, section).names
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: [{section}] names has duplicates: {names}")


def load_config(path) -> RunConfig:
    """Read and validate a TOML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a TOML run config such as configs/demo.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file: {exc}") from exc
    return from_dict(data, source=str(path), base_dir=path.resolve().parent)


def check_names(cfg: RunConfig, registry) -> None:
    """Every plugin name of the config must be registered (raises :class:`UnknownNameError`)."""
    for section, kind in PLUGIN_KIND.items():
        for name in getattr(cfg, section).names:
            plugin = getattr(cfg, section).plugin_for(name) if kind in ("defense", "adaptation") else name
            registry.get(kind, plugin)
    registry.get("detector", cfg.detectors.attacker)
    for name in cfg.adaptations.names:
        if cfg.adaptations.attacker_detector(name):
            registry.get("detector", cfg.adaptations.attacker_detector(name))
    for name in cfg.detectors.white_box or ():
        registry.get("detector", name)


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (written next to a run's results)."""
    data = _unresolve(cfg.to_dict())
    lines = [f"# resolved run config (config hash {cfg.hash})", f"# from {cfg.source}", ""]

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    for table, body in data.items():
        lines.append(f"[{table}]")
        subs = {}
        for key, v in body.items():
            if table in PLUGIN_KIND and isinstance(v, dict):
                subs[key] = v
            elif v is not None:
                lines.append(f"{key} = {value(v)}")
        lines.append("")
        for name, opts in subs.items():
            bare = name.replace("-", "").replace("_", "").isalnum()
            lines.append(f"[{table}.{name if bare else json.dumps(name)}]")
            lines.extend(f"{k} = {value(v)}" for k, v in opts.items())
            lines.append("")
    return "\n".join(lines)
