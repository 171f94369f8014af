"""``tsdf-bench detect``: run a face detector on a folder of images and print or save the boxes."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError, ImageError

HELP = "detect faces in a folder of images with a chosen detector; print or save the boxes"
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def add_arguments(parser):
    parser.add_argument("folder", help="folder of images (or one image file)")
    parser.add_argument("--detector", default="mtcnn", help="detector name (see 'tsdf-bench plugins --kind detector')")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="detector option, e.g. --option checkpoint=/path/sfd_face.pth (repeatable; "
                             "values are parsed as JSON when possible)")
    parser.add_argument("--output", help="write the detections as JSON to this file instead of printing a table")


def _read(path: Path):
    try:
        from ..imageio import read_image
    except ImportError:  # fall back to PIL until tsdf_bench.imageio exists
        read_image = None
    if read_image is not None:
        return read_image(path)
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoding error
        raise ImageError(path, f"cannot read image: {exc}") from exc
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def _options(pairs):
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(args, registry):
    folder = Path(args.folder)
    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    else:
        raise ConfigError(f"{folder}: no such file or folder")
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))})")
    detector = registry.create("detector", args.detector, **_options(args.option))
    results = []
    for path in files:
        try:
            image = _read(path)
        except ImageError as exc:
            results.append({"image": str(path), "error": exc.reason, "faces": []})
            continue
        det = detector.detect(image[None])[0]
        faces = [{"box": [round(float(v), 2) for v in det.boxes[i]], "score": round(float(det.scores[i]), 5),
                  **({"landmarks": [[round(float(v), 2) for v in p] for p in det.landmarks[i]]}
                     if det.landmarks is not None else {})} for i in range(len(det))]
        results.append({"image": str(path), "faces": faces})
    if args.output:
        Path(args.output).write_text(json.dumps({"detector": args.detector, "results": results}, indent=2))
        print(f"wrote {sum(len(r['faces']) for r in results)} detections in {len(results)} images to {args.output}")
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: error: {r['error']}")
            elif not r["faces"]:
                print(f"{r['image']}: no face")
            for f in r["faces"]:
                print(f"{r['image']}: box {f['box']} score {f['score']}")
    return 0
