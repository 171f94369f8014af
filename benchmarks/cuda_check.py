"""Prove the CUDA path and measure issue 6's GPU figures, in one short run on a GPU machine.

    bash benchmarks/cuda_check.sh run DIR                 # on the GPU machine (README: "Checking the CUDA path")
    python3 benchmarks/cuda_check.py --out DIR --quick    # anywhere, in seconds: smoke sizes (tests/test_cuda_check.py)

``cuda_check.sh`` installs what the GPU machine lacks and runs this script.

Sections, in this order; each result is written to ``DIR/cuda_check.json`` as soon as it is
measured, so a run cut short keeps what it finished, and a section that fails records its error
and the next one still runs:

1. ``env``: torch and CUDA versions, the device, its bf16 peak (``measure.PEAK_BF16_FLOPS``).
2. ``tests``: pytest on ``tests/test_cuda.py`` (training, retraining, TSDF fitting and a whole
   smoke run on the GPU, rows against the CPU's) and ``tests/test_speed.py``: counts and the
   output's tail.
3. ``attack_step``: per model, one attack step (forward and backward of the all-targets output
   loss with respect to the input) at paper scale (256 px, random weights, batch 4), five ways:
   the straightforward per-target loop in fp32 and NCHW, then the batched step in fp32/bf16 x
   NCHW/channels_last.  Median milliseconds after a warm-up, achieved TFLOP/s
   (``torch.utils.flop_counter``; matmuls and convolutions only, so a lower bound), fraction of
   the bf16 peak, and the relative L2 difference of each variant's input gradient to the fp32
   NCHW batched one (what bf16 costs in accuracy).
4. ``fit``: TSDF fitted at demo scale (the demo config's schedule, 16 faces, the four demo-size
   generators with their initial weights -- timing only -- and MTCNN + RetinaFace), on the device.
5. ``grid``: the reduced demo grid (``benchmarks/test_bench_grid.py``'s ``demo-reduced``: StarGAN
   + AttGAN, CMUA/PGD/noise/none, MTCNN + RetinaFace) end to end on the device, optimisations off
   then on: seconds, their ratio (issue 6's 2x target), the largest relative difference of any
   row metric, the demo models' training seconds on the device.

On a CPU-only machine every section still runs (the device is then the CPU; ``--quick`` makes
it take seconds), which is how CI keeps this script working.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from measure import PEAK_BF16_FLOPS, flops_of, seconds as measure_seconds, sync, throughput  # noqa: E402
from test_bench_grid import grid_config, max_rel_diff, prepare_models, timed_run  # noqa: E402

MODELS = ("stargan", "attentiongan", "attgan", "hisd")
VARIANTS = (("loop_fp32_nchw", False, False, False), ("batched_fp32_nchw", True, False, False),
            ("batched_bf16_nchw", True, True, False), ("batched_fp32_nhwc", True, False, True),
            ("batched_bf16_nhwc", True, True, True))


class Report:
    """``cuda_check.json``, rewritten after every result."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, section: str, value) -> None:
        self.data[section] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def env(device) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out.update(gpu=name, bf16_peak_tflops=next((v / 1e12 for k, v in PEAK_BF16_FLOPS.items() if k in name), None),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return out


def run_tests(quick: bool) -> dict:
    files = ["tests/test_cuda.py", "tests/test_speed.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=60 if quick else 600)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def attack_step(registry, device, quick: bool) -> dict:
    """Per model and variant: ms per step, TFLOP/s, fraction of peak, gradient difference to fp32."""
    from tsdf_bench.data.embedded import load_embedded

    scale, batch, repeat = ("smoke", 1, 1) if quick else ("paper", 4, 5)
    faces = load_embedded(image_size=128, n_train=8, n_eval=0).train
    results = {}
    for name in MODELS:  # one model failing (an op without a bf16 kernel, say) keeps the others' figures
        try:
            torch.manual_seed(0)  # the same random weights every run
            results[name] = _attack_step_of(registry.create("model", name, scale=scale).to(device).eval(),
                                            faces, batch, repeat, device)
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def _attack_step_of(model, faces, batch: int, repeat: int, device) -> dict:
    from tsdf_bench.defenses.attack_utils import model_outputs
    from tsdf_bench.harness.data import select_attrs

    x = model.to_input_size(faces.images[:batch]).to(device)
    attrs = select_attrs(faces.attrs[:batch], faces.attr_names, model.attributes, model.name).to(device)
    with torch.no_grad():
        clean = model_outputs(model, x, attrs).float()
    adv0 = (x + 0.01 * torch.sign(torch.randn_like(x))).clamp(-1, 1)
    per_model, grads = {"image_size": model.image_size, "batch": batch,
                        "targets": len(model.conditions(attrs))}, {}
    for label, batched, bf16, nhwc in VARIANTS:
        model.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        inp = adv0.contiguous(memory_format=torch.channels_last) if nhwc else adv0.contiguous()

        def step():
            adv = inp.clone().requires_grad_(True)
            model.optimize = batched
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                                               enabled=bf16 and device.type == "cuda"):
                loss = F.mse_loss(model_outputs(model, adv, attrs).float(), clean)
            (grad,) = torch.autograd.grad(loss, adv)
            return grad

        seconds = measure_seconds(step, device, repeat)  # after one warm-up (cuDNN autotuning)
        grads[label] = step().float()
        per_model[label] = {"ms": round(seconds * 1e3, 3), **throughput(flops_of(step), seconds, device)}
    model.to(memory_format=torch.contiguous_format)
    ref = grads["batched_fp32_nchw"]
    for label in grads:
        per_model[label]["grad_rel_diff"] = float((grads[label] - ref).norm() / (ref.norm() + 1e-12))
    per_model["bf16_nhwc_speedup_vs_loop"] = round(per_model["loop_fp32_nchw"]["ms"] /
                                                   per_model["batched_bf16_nhwc"]["ms"], 3)
    return per_model


def fit_tsdf(registry, device, quick: bool) -> dict:
    from tsdf_bench.config import load_config
    from tsdf_bench.data.embedded import load_embedded
    from tsdf_bench.harness.data import select_attrs

    cfg = load_config(ROOT / "configs" / "demo.toml")
    options = dict(cfg.defenses.options_for("tsdf"))
    scale, names = ("smoke", ("stargan", "attgan")) if quick else ("demo", MODELS)
    if quick:
        options.update(passes=1, max_images=4, poison_steps=2)
    faces = load_embedded(image_size=cfg.data.image_size, n_train=cfg.data.n_train_defense, n_eval=0).train
    images = faces.images[: options.get("max_images", 16)].to(device)
    torch.manual_seed(0)
    models = [registry.create("model", n, scale=scale).to(device).eval() for n in names]
    dets = [registry.create("detector", n).to(device).eval() for n in ("mtcnn", "retinaface")]
    attrs = {m.name: select_attrs(faces.attrs[: images.shape[0]], faces.attr_names, m.attributes, m.name).to(device)
             for m in models}
    defense = registry.create("defense", "tsdf", seed=0, device=str(device), **options)
    sync(device)
    t0 = time.perf_counter()
    defense.fit(images, attrs, models, dets)
    sync(device)
    return {"fit_s": round(time.perf_counter() - t0, 2), "images": int(images.shape[0]), "models": list(names),
            "scale": scale, "options": options, "mask_fraction": defense.provenance.get("mask_fraction"),
            "note": "generators with their initial weights: a timing, not a defense result"}


def grid(registry, device, quick: bool, out_dir: Path) -> dict:
    from tsdf_bench.models.checkpoints import read_manifest
    from tsdf_bench.models.zoo import model_path

    key = "smoke" if quick else "demo-reduced"
    cfg = grid_config(key, device.type)
    result = {"grid": key, "model_load_or_train_s": round(prepare_models(cfg, registry, device), 2)}
    rows = {}
    for tag, optimize in (("off", False), ("on", True)):
        seconds, out = timed_run(cfg, registry, out_dir / f"grid-{tag}", optimize=optimize)
        result[f"{tag}_s"] = round(seconds, 2)
        errors = [r["error"] for r in out.rows if r.get("status") != "ok"]
        if errors:
            result[f"{tag}_errors"] = errors[:3]
        rows[tag] = out.rows
        fits = {r["defense"]: r["timings"].get("fit_s") for r in out.rows}
        result[f"{tag}_fit_s"] = {k: round(v, 2) for k, v in fits.items() if v}
    result["speedup"] = round(result["off_s"] / result["on_s"], 3)
    result["cells"] = len(rows["on"])
    result["max_rel_diff_on_off"] = max_rel_diff(rows["on"], rows["off"])
    result["model_training"] = {}
    for name in cfg.models.names:
        manifest = read_manifest(model_path(name, cfg.run.scale))
        result["model_training"][name] = {k: manifest.get(k) for k in ("train_seconds", "train_device")}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for cuda_check.json")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the model cache and the grid's runs (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds, for checking the script")
    parser.add_argument("--sections", default="env,tests,attack_step,fit,grid",
                        help="comma-separated subset of env,tests,attack_step,fit,grid")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="cuda_check-"))
    os.environ.setdefault("TSDF_BENCH_CACHE", str(work / "cache"))
    from tsdf_bench.plugins import get_registry

    registry = get_registry()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(args.out / "cuda_check.json")
    sections = {"env": lambda: env(device), "tests": lambda: run_tests(args.quick),
                "attack_step": lambda: attack_step(registry, device, args.quick),
                "fit": lambda: fit_tsdf(registry, device, args.quick),
                "grid": lambda: grid(registry, device, args.quick, work)}
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(sections)}")
    for name in wanted:
        t0 = time.perf_counter()
        print(f"[cuda_check] {name} ...", flush=True)
        try:
            value = sections[name]()
        except Exception as exc:  # noqa: BLE001 - record it, keep the sections that work
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc().splitlines()[-12:]}
        if isinstance(value, dict):
            value["section_s"] = round(time.perf_counter() - t0, 2)
        report.put(name, value)
        print(json.dumps(value, default=str)[:2000], flush=True)
    return report.data


if __name__ == "__main__":
    main()
