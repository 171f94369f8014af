"""``tsdf-bench train``: train the demo (or smoke) deepfake models on the embedded faces.

Each model is trained with its own objective (see :mod:`tsdf_bench.models.zoo`), cached under
``cache_dir("models", scale)`` with a manifest, and an edit grid PNG (held-out inputs + every
target's edit) is written beside it (and copied to ``--output`` if given).  An interrupted run
resumes where it stopped; a model already trained with the same settings is just loaded.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import ConfigError, TsdfBenchError

HELP = "train the demo deepfake models on the embedded faces (resumable; saves edit grids)"


def add_arguments(parser):
    parser.add_argument("--scale", default="demo", choices=["demo", "smoke"], help="model scale (default demo)")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every model plugin with a demo_recipe)")
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default: the demo recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="ignore cached weights and train afresh")
    parser.add_argument("--output", default=None, help="also copy weights, manifests and grids into this folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while training (default 1, as the shipped weights were trained; "
                             "the weights depend on it)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write each model as a shipped checkpoint (float32 G, float16 D, manifest) into DIR, "
                             "e.g. plugins/tsdf_bench_plugins/models/weights (implies not using shipped weights)")
    parser.add_argument("--curve-every", type=int, default=None,
                        help="train in increments of this many steps, measuring a curve point after each "
                             "(tsdf_bench.models.curve; needs --steps)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def trainable_models(registry) -> list[str]:
    """The model plugins that declare a ``demo_recipe`` (the ones the demo trains)."""
    from ..records import resolve_factory

    return [n for n in registry.names("model")
            if getattr(resolve_factory(registry.get("model", n).factory), "demo_recipe", None)]


def main(args, registry):
    from ..models import zoo

    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    threads = args.threads or zoo.TRAIN_THREADS
    use_shipped = not (args.retrain or args.export or args.curve_every)
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models is not None \
        else trainable_models(registry)
    if not names:
        raise ConfigError("--models is empty; name at least one model, e.g. --models stargan")
    for n in names:
        registry.get("model", n)  # unknown names fail before any training
    failures = []
    for n in names:
        start = time.time()
        try:
            if args.curve_every:
                from ..models.curve import curve_table, train_with_curve

                if not args.steps:
                    raise ConfigError("--curve-every needs --steps (the final number of joint steps)")
                points = train_with_curve(n, args.steps, args.curve_every, scale=args.scale, seed=args.seed,
                                          progress=not args.no_progress, threads=threads)
                print(curve_table(points))  # then get_model loads the result
            model = zoo.get_model(n, scale=args.scale, registry=registry, steps=args.steps, seed=args.seed,
                                  progress=not args.no_progress, retrain=args.retrain, shipped=use_shipped,
                                  threads=threads)
            path = model.weights_file
            print(f"{n}: {model.weights_source} {path} ({time.time() - start:.1f} s)")
            if model.weights_source != "shipped":
                _compare_with_shipped(model, path)
            if args.export:
                _export(model, path, args.export, args.seed)
        except (TsdfBenchError, ImportError) as exc:
            failures.append(f"{n}: {exc}")
            print(f"{n}: FAILED: {exc}")
            continue
        grid = path.with_suffix(".grid.png")
        if grid.exists():
            print(f"{n}: grid {grid}")
        if args.output:
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            for f in (path, path.with_name(path.name + ".json"), grid):
                if f.exists():
                    shutil.copy2(f, out / f.name)
    if failures:
        raise TsdfBenchError(f"{len(failures)} model(s) failed: " + "; ".join(failures))
    return 0


def _compare_with_shipped(model, path):
    """Print whether weights trained here equal the package's shipped ones (when it ships them)."""
    from ..models import checkpoints, shipped

    trained = checkpoints.read_manifest(path)
    ship = shipped.shipped_path(model, trained.get("seed", 0))
    if ship is None:
        return
    ship_manifest = checkpoints.read_manifest(ship)
    if not shipped.applies(ship_manifest, trained):
        print(f"{model.name}: the shipped checkpoint {ship.name} has another recipe; not compared")
        return
    d = checkpoints.load_discriminator(model, path)
    print(f"{model.name}: {shipped.reproduction_report(trained, ship_manifest, model, d)}")


def _export(model, path, out_dir, seed):
    """Write the trained ``model`` (from its cache file ``path``) as a shipped checkpoint."""
    from ..data.embedded import load_embedded
    from ..models import checkpoints, shipped
    from ..models.curve import curve_path, read_curve
    from ..models.training import prepare_images

    d = checkpoints.load_discriminator(model, path)
    if d is None:
        raise TsdfBenchError(f"{path} holds no discriminator; retrain the model before exporting it")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    probe = prepare_images(load_embedded(image_size=128, n_eval=24, seed=seed).eval.images, model.image_size)
    manifest = checkpoints.read_manifest(path)
    curve = [p for p in read_curve(curve_path(model.name, model.scale, seed)) if p["steps"] <= manifest.get("steps", 0)]
    info = shipped.export(model, d, manifest, out_dir, probe, curve=curve)
    print(f"{model.name}: exported {info['weights']} ({Path(out_dir, info['weights']).stat().st_size / 1e6:.2f} MB, "
          f"float16 D output change {info['d_change']:.1e})")
