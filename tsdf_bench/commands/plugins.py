"""``tsdf-bench plugins``: list every registered plugin."""
import json

from tabulate import tabulate

HELP = "list the registered defenses, models, detectors, adaptations and metrics"


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    parser.add_argument("--kind", choices=["defense", "model", "detector", "adaptation", "metric"])


def main(args, registry):
    rows = [
        {"kind": e.kind, "name": e.name, "description": e.description, "distribution": e.distribution,
         "version": e.version, "source": e.source}
        for e in registry.entries(args.kind)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(tabulate([[r["kind"], r["name"], r["description"], f'{r["distribution"]} {r["version"]}'.strip()]
                        for r in rows], headers=["kind", "name", "description", "from"], tablefmt="github"))
    return 0  # broken plugins were reported on stderr when the registry loaded (cli.load_registry)
