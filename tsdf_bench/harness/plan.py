"""Planning a run: its cells, and the plugin options checked against each factory before any work.

A **cell** is one (defense, model, adaptation, round, seed): one stored row.  ``plan_cells`` lists
them in run order; a chain of rounds (0..k of one defense, model, adaptation, seed) is what the
runner and the Ray executor advance round by round.
"""
from __future__ import annotations

import difflib
import inspect
import re
from ..config import RunConfig
from ..errors import ConfigError
from ..records import resolve_factory
from ..schema import CellKey


Cell = CellKey  # one cell of the plan (tsdf_bench.schema.CellKey)


def plan_cells(cfg: RunConfig, retrains: dict[str, bool]) -> list[Cell]:
    """Every cell of a config, in run order (seed, defense, model, adaptation, round); an adaptation
    with ``defenses = [...]`` in its table only for those defenses."""
    cells = []
    only = {a: cfg.adaptations.defenses_for(a) for a in cfg.adaptations.names}
    for seed in cfg.run.seeds:
        for d in cfg.defenses.names:
            for m in cfg.models.names:
                for a in cfg.adaptations.names:
                    if only[a] is not None and d not in only[a]:
                        continue
                    rounds = range(cfg.run.rounds + 1) if retrains[a] else range(1)
                    cells.extend(Cell(d, m, a, k, seed) for k in rounds)
    return cells


SECTION_OF = {"defense": "defenses", "adaptation": "adaptations", "metric": "metrics", "model": "models",
              "detector": "detectors"}


def create_checked(registry, kind: str, name: str, options: dict, table: str | None = None, **extra):
    """``registry.create`` that turns a misspelt option into a :class:`ConfigError` naming the table
    (``table``, default ``name``), the bad key, the closest valid one and the valid ones (read from
    the plugin's signature)."""
    try:
        return registry.create(kind, name, **extra, **options)
    except TypeError as exc:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if not match:
            raise
        bad = match.group(1)
        valid = _parameters(registry.get(kind, name).factory) - set(extra)
        hint = ""
        if valid:
            close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.4)
            hint = (f" Did you mean {close[0]!r}?" if close else "") + f" Valid options: {', '.join(sorted(valid))}."
        raise ConfigError(f"[{SECTION_OF[kind]}.{table or name}]: {kind} {name!r} has no option {bad!r}.{hint}") from exc


def check_options(cfg: RunConfig, registry) -> None:
    """Create every defense, adaptation and metric once (cheap; models and detectors are not built),
    so a misspelt plugin option fails before any work starts."""
    for name in cfg.defenses.names:
        create_checked(registry, "defense", cfg.defenses.plugin_for(name), cfg.defenses.options_for(name), table=name,
                       seed=0, device="cpu")
    for name in cfg.adaptations.names:
        create_checked(registry, "adaptation", cfg.adaptations.plugin_for(name), cfg.adaptations.options_for(name),
                       table=name)
    for name in cfg.metrics.names:
        create_checked(registry, "metric", name, cfg.metrics.options_for(name))
    for kind, section in (("model", cfg.models), ("detector", cfg.detectors)):
        for name in section.names:
            check_keys(registry, kind, name, section.options_for(name))


def check_keys(registry, kind: str, name: str, options: dict) -> None:
    """A misspelt option of a plugin that is expensive to build (models, detectors) fails here,
    from the factory's signature, without building it."""
    entry = registry.get(kind, name)
    valid = _parameters(entry.factory)
    if not valid or _takes_kwargs(entry.factory):
        return  # a factory taking **kwargs (StarGAN's architecture overrides) checks its own
    if kind == "model":  # the model zoo's options and random_init (tsdf_bench.models.checkpoints)
        from ..models.zoo import get_model

        valid |= _parameters(get_model) | {"random_init", "discriminator_checkpoint"}
    for bad in sorted(set(options) - valid):
        close = difflib.get_close_matches(bad, sorted(valid), n=1, cutoff=0.4)
        hint = (f" Did you mean {close[0]!r}?" if close else "") + f" Valid options: {', '.join(sorted(valid))}."
        raise ConfigError(f"[{SECTION_OF[kind]}.{name}]: {kind} {name!r} has no option {bad!r}.{hint}")


def _takes_kwargs(factory) -> bool:
    factory = resolve_factory(factory)
    if factory is None:
        return True
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return True


def default_metrics(registry) -> list[str]:
    """The metrics a config without ``[metrics] names`` runs: every registered metric except those
    whose class says ``default = False`` (slow ones, or ones that need local weights: identity, lpips)."""
    return [n for n in registry.names("metric")
            if getattr(resolve_factory(registry.get("metric", n).factory), "default", True) is not False]


def _parameters(factory) -> set[str]:
    """Keyword parameters of a plugin factory (a class, a function or a ``lazy(...)`` target)."""
    factory = resolve_factory(factory)
    if factory is None:
        return set()
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def groups(cfg, cells: list[Cell]) -> list[tuple[int, str, list[Cell]]]:
    """``cells`` as ``(seed, defense, cells)`` groups in run order (seeds outer): the unit that
    shares one fitted defense."""
    out = []
    for seed in cfg.run.seeds:
        for dname in cfg.defenses.names:
            group = [c for c in cells if c.seed == seed and c.defense == dname]
            if group:
                out.append((seed, dname, group))
    return out
