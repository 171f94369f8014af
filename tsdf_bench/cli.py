"""The ``tsdf-bench`` command line.

Each sub-command lives in ``tsdf_bench/commands/<name>.py`` with ``HELP``,
``add_arguments(parser)`` and ``main(args, registry) -> int``.  Options common to every
command (``--plugins-dir``, ``--strict-plugins``) are accepted before or after the sub-command.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import TsdfBenchError

COMMANDS = ("plugins", "run", "leaderboard", "train", "protect", "detect")


def _common(parser, top):
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--plugins-dir", action="append", default=[] if top else argparse.SUPPRESS, metavar="DIR",
                        help="load unpackaged plugin .py files from DIR (repeatable)")
    parser.add_argument("--strict-plugins", action="store_true", default=default,
                        help="make plugin errors fatal (also TSDF_BENCH_STRICT_PLUGINS=1)")


def build_parser():
    parser = argparse.ArgumentParser(prog="tsdf-bench", description=__doc__.splitlines()[0].strip("`. "))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tsdf-bench {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        _common(p, top=False)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def load_registry(plugins_dirs, strict):
    """The session's registry; each broken-plugin warning goes to stderr once, as one plain line.

    (Python's warnings format would add the warning's source line, and stdout must stay clean
    for ``--json``.)  Other warnings raised while plugins import are passed on unchanged.
    """
    from .plugins import PluginWarning, get_registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginWarning)
        registry = get_registry(plugins_dirs, strict=strict)
    for w in caught:
        if issubclass(w.category, PluginWarning):
            print(f"tsdf-bench: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return registry


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        registry = load_registry(args.plugins_dir, True if args.strict_plugins else None)
        return int(args._module.main(args, registry) or 0)
    except TsdfBenchError as exc:
        print(f"tsdf-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tsdf-bench {args.command}: interrupted; finished results are kept (rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
