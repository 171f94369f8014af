"""``tsdf-bench run``: run a benchmark config (or resume one) and write tables and figures."""
from __future__ import annotations

from pathlib import Path

HELP = "run a benchmark config: defenses x models x attacker adaptations x retraining rounds x seeds"
DEFAULT_CONFIG = "configs/demo.toml"


def add_arguments(parser):
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                        help=f"TOML run config (default {DEFAULT_CONFIG}; with --resume: the run's stored config)")
    parser.add_argument("--resume", metavar="RUN_ID|latest",
                        help="continue an interrupted run, skipping its finished cells (same config required)")
    parser.add_argument("--output", metavar="DIR", help="output folder (default: the config's [run] output, 'runs')")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override [run] device")
    parser.add_argument("--no-optimize", action="store_true",
                        help="turn the speed optimisations off (shared clean outputs, batched targets, bf16 and "
                             "channels_last on CUDA): the papers' straightforward loops; rows agree either way "
                             "(same as [run] optimize = false or TSDF_BENCH_OPTIMIZE=0)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="where cells run: this process (default) or Ray, one task per cell")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --executor ray: connect to this cluster (default: $RAY_ADDRESS, else start a "
                             "local Ray instance for the run)")
    parser.add_argument("--ray-cpus-per-task", type=float, default=1, metavar="N", help="CPUs per Ray task (default 1)")
    parser.add_argument("--ray-gpus-per-task", type=float, metavar="N",
                        help="GPUs per Ray task (default: 1 when the config's device is cuda, or auto on a cluster "
                             "with GPUs; else 0)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="override [run] workers: N local processes, one torch thread each (the local executor)")
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="override [run] seeds, e.g. --seeds 3,4,5 to replicate a run on new seeds (a new config hash)")
    parser.add_argument("--publish", metavar="DIR",
                        help="override [run] publish: copy the tables to DIR instead ('' publishes nowhere)")
    parser.add_argument("--check", action="store_true",
                        help="preflight only: load every model, detector and data entry the config names, push one "
                             "batch through each, verify checkpoint files (sha256), estimate memory and disk for the "
                             "grid, print one table; exit 1 on any hard error (nothing is fitted or stored)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")


def main(args, registry) -> int:
    from ..config import load_config
    from ..errors import ConfigError
    from ..harness.session import run_config, stored_config, DB_NAME
    from ..harness.store import ResultsStore

    config_path = args.config
    if config_path is None and args.resume is None:
        config_path = DEFAULT_CONFIG
    cfg = load_config(config_path) if config_path is not None else None
    overrides = {}
    if args.device:
        overrides["run__device"] = args.device
    if getattr(args, "no_optimize", False):
        overrides["run__optimize"] = False  # not hashed: a resume may switch it
    if args.seeds is not None:
        if args.resume is not None:
            raise ConfigError("--seeds cannot change a run being resumed; start a new run with --seeds")
        try:
            overrides["run__seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. --seeds 3,4,5") from None
    if args.publish is not None:
        overrides["run__publish"] = args.publish  # not hashed
    if args.workers is not None:
        overrides["run__workers"] = args.workers  # not hashed either
    if cfg is None and overrides:  # resuming from the stored config with an override
        output = Path(args.output or "runs")
        store = ResultsStore(output / DB_NAME)
        cfg = stored_config(store, store.resolve(args.resume))
    if cfg is not None and overrides:
        cfg = cfg.replace(**overrides)
    if getattr(args, "check", False):
        return check(cfg, registry, output=args.output)
    ray_options = {"address": args.ray_address, "cpus_per_task": args.ray_cpus_per_task,
                   "gpus_per_task": args.ray_gpus_per_task}
    outputs = run_config(cfg, registry, output=args.output, resume=args.resume, progress=not args.no_progress,
                         figures=not args.no_figures, executor=args.executor, ray_options=ray_options)
    s = outputs.summary
    print(f"\nrun {s.run_id}: {s.ok}/{s.total} cells ok"
          + (f", {s.skipped} finished earlier (resumed)" if s.skipped else "")
          + (f", {len(s.errors)} failed" if s.errors else ""))
    for err in s.errors[:10]:
        print(f"  error {err['defense']}/{err['model']}/{err['adaptation']}/round {err['round']}/seed {err['seed']}: "
              f"{(err['error'] or '').splitlines()[0][:200]}")
    if len(s.errors) > 10:
        print(f"  ... and {len(s.errors) - 10} more (see results.csv; tracebacks in results.json)")
    for kind, paths in outputs.files.items():
        if paths:
            folders = sorted({str(p.parent) for p in paths})
            print(f"{kind}: {', '.join(folders)} ({len(paths)} file(s))")
    for warning in outputs.warnings:
        print(f"warning: {warning}")
    if s.errors:
        print(f"failed cells are retried by: tsdf-bench run --resume {s.run_id} --output {s.run_dir.parent}")
    return 1 if s.errors else 0


def check(cfg, registry, output=None) -> int:
    """``--check``: run :func:`tsdf_bench.harness.preflight.preflight`, print its table; 0 if no hard error."""
    from ..errors import ConfigError
    from ..harness.preflight import preflight

    if cfg is None:
        raise ConfigError("tsdf-bench run --check needs a CONFIG: pass the config file (a resumed run's config "
                          "is checked by giving the same file)")
    report = preflight(cfg, registry, output=output)
    print(report.table())
    errors = report.errors
    warnings = [c for c in report.checks if c.status == "warn"]
    print(f"\npreflight of {cfg.source}: {len(report.checks)} checks, {len(errors)} error(s), "
          f"{len(warnings)} warning(s)")
    for c in errors:
        print(f"  error: {c.kind} {c.name}: {c.detail}")
    return 1 if errors else 0
