"""``tsdf-bench protect``: protect a folder of one's own photos with a defense.

Reads every image of ``--input`` (not recursive), adds the defense's perturbation and writes a
lossless PNG per image to ``--output`` with a JSON record (``protect-record.json``: defense,
options, perturbation hash and provenance, per-file input/output sha256, failures).  Originals
are never touched: the output folder must differ from the input folder, and existing outputs
are refused unless ``--overwrite``.  Unreadable images and images smaller than
:data:`MIN_FACE_SIDE` pixels on a side (too small to hold a face) are reported and skipped
(``failures``), files whose names are not images are listed (``skipped``); the exit status is 1
when any image failed, 0 otherwise.

Output names: the **full input file name plus ``.png``** (``fine.jpg`` -> ``fine.jpg.png``,
``fine.png`` -> ``fine.png.png``), always, so every output name says which file it came from
and two inputs can never share an output, whatever else the folder holds.

Universal defenses (tsdf, cmua, found) need a fitted perturbation (``--perturbation FILE``)
or fit one on the folder's images with ``--models`` (and ``--detectors`` for TSDF's poisoning);
the fitted perturbation is saved in the output folder for reuse.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ImageError, TsdfBenchError
from ..hashing import file_sha256
from ..paths import temp_path

HELP = "protect a folder of your own photos with a defense (lossless PNGs + a JSON record)"
RECORD_NAME = "protect-record.json"
MIN_FACE_SIDE = 20
"""Smallest width and height accepted: MTCNN's default minimum face (20 px), the attacker's
default detector; a smaller image cannot hold a face any detector of the benchmark finds."""


def too_small(image: torch.Tensor) -> str:
    h, w = image.shape[-2:]
    return (f"image too small to hold a face: {w}x{h} pixels; the minimum is "
            f"{MIN_FACE_SIDE}x{MIN_FACE_SIDE}")


def output_name(path: Path) -> str:
    """``fine.jpg`` -> ``fine.jpg.png``: the full input name, so outputs never collide."""
    return f"{path.name}.png"


def add_arguments(parser):
    parser.add_argument("--defense", required=True, help="defense name (see 'tsdf-bench plugins')")
    parser.add_argument("--input", required=True, type=Path, metavar="DIR", help="folder of photos to protect")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="folder for the protected PNGs, named <input file name>.png, e.g. face.jpg.png "
                             "(must not be the input folder)")
    parser.add_argument("--perturbation", type=Path, metavar="FILE",
                        help="fitted universal perturbation (.pt from a run or an earlier protect)")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME",
                        help="deepfake models to fit against (universal defenses without --perturbation; pgd)")
    parser.add_argument("--detectors", nargs="+", default=[], metavar="NAME",
                        help="face detectors to fit against (tsdf poisoning, facepoison)")
    parser.add_argument("--scale", default="demo", choices=("paper", "demo", "smoke"), help="model scale (default demo)")
    parser.add_argument("--eps", type=float, default=0.05, help="L-inf budget on the [-1, 1] scale (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="defense seed (default 0)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="defense option, VALUE parsed as JSON when it can be (repeatable): --option passes=2")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")


def parse_options(items) -> dict:
    """``["passes=2", "poisoning=false", "name=x"]`` -> ``{"passes": 2, "poisoning": False, "name": "x"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE, e.g. --option passes=2")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def load_models(names, scale, device):
    """The models of the zoo (trained checkpoints), by name."""
    if not names:
        return []
    try:
        from ..models.zoo import get_model
    except ImportError as exc:
        raise TsdfBenchError(f"the model zoo is not available ({exc}); pass --perturbation FILE instead") from None
    return [get_model(name, scale).to(device).eval() for name in names]


def load_detectors(names, registry, device):
    return [registry.create("detector", name).to(device).eval() for name in names]


def quantize_within_budget(original: torch.Tensor, protected: torch.Tensor, eps: float) -> np.ndarray:
    """8-bit ``[H, W, 3]`` of ``protected``, each value kept within ``eps`` of the 8-bit original.

    Plain rounding could move a pixel up to half a level (1/255 on [-1, 1]) past the budget; the
    levels are clamped to ``original +- floor(eps * 127.5)`` so the written file honours it.
    """
    orig = ((original.detach().cpu().float() + 1) * 127.5).round()
    prot = ((protected.detach().cpu().float() + 1) * 127.5).round()
    k = math.floor(eps * 127.5 + 1e-6)
    out = torch.max(torch.min(prot, orig + k), orig - k).clamp(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).contiguous().numpy()


def _plan(args, imageio):
    """Input images, skipped non-image files, and the output path of each image."""
    src, dst = args.input.expanduser(), args.output.expanduser()
    if not src.is_dir():
        raise TsdfBenchError(f"--input {src}: not a folder; pass the folder that holds your photos")
    if dst.exists() and not dst.is_dir():
        raise TsdfBenchError(f"--output {dst}: exists and is not a folder")
    if dst.resolve() == src.resolve():
        raise TsdfBenchError(f"--output {dst} is the input folder; protect never overwrites originals: "
                             "choose another output folder")
    images = imageio.list_images(src, recursive=False)
    image_set = set(images)
    skipped = [{"input": p.name, "reason": "not an image file name"} for p in sorted(src.iterdir())
               if p.is_file() and not p.name.startswith(".") and p not in image_set]
    outputs = {p: dst / output_name(p) for p in images}
    return images, skipped, outputs


def main(args, registry):
    from .. import __version__, imageio

    options = parse_options(args.option)
    images, skipped, outputs = _plan(args, imageio)
    record_path = args.output / RECORD_NAME
    defense = registry.create("defense", args.defense, eps=args.eps, seed=args.seed, device=args.device, **options)
    pert_path = args.output / f"{args.defense}-perturbation.pt"
    fits_here = defense.universal and args.perturbation is None
    planned = list(outputs.values()) + [record_path] + ([pert_path] if fits_here else [])
    existing = [p for p in planned if p.exists()]
    if existing and not args.overwrite:
        shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise TsdfBenchError(f"{len(existing)} output file(s) already exist ({shown}); "
                             "pass --overwrite to replace them (originals are never touched)")

    device = torch.device(args.device)
    failures, good = [], []
    for path in images:
        try:
            x = imageio.read_image(path)
        except ImageError as exc:
            failures.append({"input": path.name, "reason": exc.reason})
            continue
        if min(x.shape[-2:]) < MIN_FACE_SIDE:
            failures.append({"input": path.name, "reason": too_small(x)})
            continue
        good.append((path, x.to(device)))
    for f in skipped + failures:
        print(f"skipped {f['input']}: {f['reason']}")
    if not good:
        raise TsdfBenchError(f"no usable image in {args.input} ({len(failures) + len(skipped)} file(s) skipped; "
                             f"images must be readable and at least {MIN_FACE_SIDE}x{MIN_FACE_SIDE} pixels)")

    models = load_models(args.models, args.scale, device)
    detectors = load_detectors(args.detectors, registry, device)
    perturbation_info = None
    start = time.perf_counter()
    if defense.universal:
        if args.perturbation is not None:
            defense.load(args.perturbation)
            made_by = defense.provenance.get("defense")
            if made_by and made_by != defense.name:
                raise TsdfBenchError(f"--perturbation {args.perturbation} was made by defense {made_by!r}, "
                                     f"not {defense.name!r}; pass --defense {made_by}")
            source = str(args.perturbation)
        elif models or detectors:
            size = models[0].image_size if models else max(good[0][1].shape[-2:])
            batch = torch.stack([F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                                 for _, x in good]).clamp(-1, 1)
            print(f"fitting {defense.name} on {len(good)} image(s) at {size}x{size} ...")
            defense.fit(batch, None, models, detectors)
            defense.save(pert_path, fitted_on=str(args.input), images=len(good))
            source = str(pert_path)
        else:
            raise TsdfBenchError(f"defense {defense.name!r} is universal: pass --perturbation FILE (a fitted "
                                 "perturbation), or --models NAME ... to fit one on these photos")
        perturbation_info = {"file": source, "sha256": defense.provenance.get("sha256") or _hash(defense),
                             "provenance": defense.provenance}
    else:
        defense.fit(torch.stack([good[0][1]]), None, models, detectors)

    args.output.mkdir(parents=True, exist_ok=True)
    files = []
    for path, x in good:
        protected = defense.protect(x[None])[0]
        out = outputs[path]
        imageio.write_png(out, quantize_within_budget(x, protected, defense.eps), overwrite=args.overwrite)
        files.append({"input": path.name, "output": out.name, "input_sha256": file_sha256(path),
                      "output_sha256": file_sha256(out)})
    record = {"tool": f"tsdf-bench {__version__}", "command": "protect", "defense": defense.name,
              "eps": defense.eps, "seed": defense.seed, "options": getattr(defense, "options", options),
              "models": list(args.models), "detectors": list(args.detectors), "scale": args.scale,
              "perturbation": perturbation_info, "files": files, "failures": failures, "skipped": skipped,
              "seconds": round(time.perf_counter() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = temp_path(record_path)
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    os.replace(tmp, record_path)
    print(f"protected {len(files)} image(s) with {defense.name} into {args.output}; "
          f"{len(failures)} unreadable, {len(skipped)} not images; record: {record_path}")
    return 1 if failures else 0


def _hash(defense):
    from ..hashing import tensors_sha256

    return tensors_sha256(defense.perturbation)
