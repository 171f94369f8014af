"""The embedded default dataset: augmented crops of the few real face photos that ship in packages.

No face dataset can be downloaded in a fresh environment, so the default demo data is built,
at run time, from real photos inside installed packages (never copied into this repository):

* scikit-image ``data/astronaut.png`` (Eileen Collins, NASA, public domain) and
  ``data/camera.png`` (CC0, a greyscale near-profile);
* matplotlib ``mpl-data/sample_data/grace_hopper.jpg`` (US Navy portrait, public domain);
* insightface ``data/images/t1.jpg`` (six faces) and ``Tom_Hanks_54745.png`` (greyscale 112x112),
  **optional**: used when the ``insightface`` package is installed (located with
  ``importlib.util.find_spec`` without importing it; its licence for these files is not stated,
  so they are used in place).  Without it the set has 3 faces instead of 10.

``embedded_faces.csv`` beside this module holds, per face, the source, the face box
``(x1, y1, x2, y2)`` in the source photo (MTCNN's box, checked by eye) and 13 attribute labels
(AttGAN's 13, a superset of StarGAN's 5) assigned by looking at each face.  Labels are a
person's judgement on one photo, not CelebA annotations.

Build: each face is framed like aligned CelebA after CenterCrop(170) (the face box fills about
60 % of the side, with the box centre slightly below the image centre), then augmented: scale
jitter (x0.9-1.1), shift (+-5 % of the side), rotation (+-10 deg), horizontal flip, and colour
jitter (brightness, contrast, saturation x0.8-1.2; hue +-0.03 turns).

**Roles** (the threat model, see ``docs/threat-model.md``): each face is one photo of one person,
and the CSV's ``role`` column gives it exactly one role, with every augmented view of it:

* ``train`` (6 faces): the demo generators are trained on these, and the universal defenses are
  fitted on them (the one overlap the protocol allows: CMUA fits on the generators' training set);
* ``collect`` (1 face): the protected person whose posted photos the attacker collects, prepares
  and retrains on;
* ``eval`` (3 faces): protected persons whose photos the attacker later forges (held out from
  everything else).

A universal perturbation is the same for every person, so retraining on one protected person
and forging others measures what it must.  Each role's views use an independent random stream.
Without insightface only 3 ``train`` faces exist: there is then no protected person, and a run
on the embedded data stops with a message naming the counts.  Demo-scale data (10 identities);
research numbers need CelebA.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..hashing import file_sha256
from ..imageio import read_image_uint8
from ..paths import cache_dir, temp_path
from ._common import ATTGAN_ATTRS, DatasetError, FaceSet

FACES_CSV = Path(__file__).with_name("embedded_faces.csv")
ROLES = ("train", "collect", "eval")
BUILD_VERSION = 2  # bump when the framing or augmentation changes, to invalidate caches

FACE_FRACTION = 0.6  # face-box height / image side, as in aligned CelebA after CenterCrop(170)
CENTRE_SHIFT = 0.09  # image centre sits this fraction of the side above the box centre
CANVAS_MARGIN = 1.6  # canvas side / framed side: room for scale, shift and rotation

AUGMENT = {"scale": 0.1, "shift": 0.05, "rotate_deg": 10.0, "flip": 0.5,
           "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.03}

_SOURCES = {  # source id -> (package, path inside the package's folder)
    "skimage:astronaut": ("skimage", "data/astronaut.png"),
    "skimage:camera": ("skimage", "data/camera.png"),
    "matplotlib:grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "insightface:t1": ("insightface", "data/images/t1.jpg"),
    "insightface:tom_hanks": ("insightface", "data/images/Tom_Hanks_54745.png"),
}
_OPTIONAL_PACKAGES = {"insightface"}


@dataclass
class EmbeddedData:
    """What :func:`load_embedded` returns.

    train / collect / eval: :class:`FaceSet` per role (``ids`` = face identity of each image);
    attr_names: the 13 attribute names; faces: per-face metadata from ``embedded_faces.csv``
    (only the faces used); roles: ``{role: [face ids]}``; missing_sources: optional sources
    that were not installed; data_hash: SHA-256 of the build parameters, the label file and the
    source photos' bytes (the cache key; record it with results for provenance).
    """

    train: FaceSet
    collect: FaceSet
    eval: FaceSet
    attr_names: list
    faces: list
    roles: dict
    missing_sources: list
    data_hash: str
    params: dict = field(default_factory=dict)

    @property
    def identities(self) -> list:
        """Every face identity used, in the CSV's order."""
        return [f["face_id"] for f in self.faces]

    @property
    def heldout(self) -> list:
        """The protected persons: identities that never enter generator training."""
        return [f["face_id"] for f in self.faces if f["role"] != "train"]


def read_faces_csv(path=FACES_CSV) -> list[dict]:
    """The face table: dicts with face_id, source, box, role, description, attrs (0/1 list)."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    faces = []
    for row in rows:
        if row["source"] not in _SOURCES:
            raise DatasetError(f"{path}: unknown source {row['source']!r} for face {row['face_id']!r}")
        if row.get("role") not in ROLES:
            raise DatasetError(f"{path}: face {row['face_id']!r} has role {row.get('role')!r}; "
                               f"each face needs one of {', '.join(ROLES)}")
        faces.append({
            "face_id": row["face_id"], "source": row["source"],
            "box": [int(row[k]) for k in ("x1", "y1", "x2", "y2")],
            "role": row["role"], "description": row["description"],
            "attrs": [float(row[a]) for a in ATTGAN_ATTRS],
        })
    return faces


def locate_source(source: str) -> Path | None:
    """Path of a source photo inside its installed package, or None if the package is absent.

    Uses ``find_spec`` so that the package (insightface in particular) is never imported.
    """
    package, relative = _SOURCES[source]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def _face_canvas(photo: np.ndarray, box, image_size: int) -> Image.Image:
    """A square around the framed face, CANVAS_MARGIN times the framed side, edge-padded where it
    leaves the photo, resampled so one canvas pixel is about one output pixel."""
    x1, y1, x2, y2 = box
    side = (y2 - y1) / FACE_FRACTION
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - CENTRE_SHIFT * side
    half = CANVAS_MARGIN * side / 2
    left, top = int(math.floor(cx - half)), int(math.floor(cy - half))
    right, bottom = int(math.ceil(cx + half)), int(math.ceil(cy + half))
    h, w = photo.shape[:2]
    pad = ((max(0, -top), max(0, bottom - h)), (max(0, -left), max(0, right - w)), (0, 0))
    region = photo[max(0, top):min(h, bottom), max(0, left):min(w, right)]
    canvas_px = int(round(CANVAS_MARGIN * image_size))
    if not any(p for pair in pad[:2] for p in pair):
        return Image.fromarray(region).resize((canvas_px, canvas_px), Image.LANCZOS)
    # Off the photo: repeat the edge pixels, then blur them into a soft background, so the
    # padding holds no streaks or mirrored face parts a detector could fire on.
    inside = np.full(region.shape[:2], 255, np.uint8)
    region = np.pad(region, pad, mode="edge")
    inside = np.pad(inside, pad[:2], mode="constant")
    sharp = Image.fromarray(region).resize((canvas_px, canvas_px), Image.LANCZOS)
    soft = sharp.filter(ImageFilter.GaussianBlur(radius=canvas_px / 12))
    mask = Image.fromarray(inside).resize((canvas_px, canvas_px), Image.BILINEAR)
    return Image.composite(sharp, soft, mask.filter(ImageFilter.GaussianBlur(radius=2)))


def _augment(canvas: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One random view of a face canvas -> uint8 ``[S, S, 3]``."""
    a = AUGMENT
    scale = math.exp(rng.uniform(-a["scale"], a["scale"]))
    dx, dy = rng.uniform(-a["shift"], a["shift"], size=2) * image_size
    theta = math.radians(rng.uniform(-a["rotate_deg"], a["rotate_deg"]))
    flip = rng.random() < a["flip"]
    bright, contrast, sat = 1 + rng.uniform(-1, 1, size=3) * [a["brightness"], a["contrast"],
                                                              a["saturation"]]
    hue = rng.uniform(-a["hue"], a["hue"])
    # Output pixel (x, y) -> canvas point: centre + scale * R(theta) @ (x - S/2, y - S/2) + shift.
    c = canvas.size[0] / 2
    cos, sin = scale * math.cos(theta), scale * math.sin(theta)
    o = image_size / 2
    coeffs = (cos, -sin, c + dx - cos * o + sin * o, sin, cos, c + dy - sin * o - cos * o)
    img = canvas.transform((image_size, image_size), Image.AFFINE, coeffs, resample=Image.BICUBIC)
    if flip:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(bright)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    img = ImageEnhance.Color(img).enhance(sat)
    if abs(hue) > 1e-6:
        hsv = np.array(img.convert("HSV"), dtype=np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(round(hue * 256))) % 256
        img = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _build_split(canvases, faces, n, image_size, rng) -> FaceSet:
    order = [i for _ in range(n // len(faces) + 1) for i in rng.permutation(len(faces))][:n] if faces else []
    images = np.stack([_augment(canvases[i], image_size, rng) for i in order]) if n else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    attrs = torch.tensor([faces[i]["attrs"] for i in order], dtype=torch.float32).reshape(n, len(ATTGAN_ATTRS))
    return FaceSet(tensor, attrs, list(ATTGAN_ATTRS), [faces[i]["face_id"] for i in order])


def load_embedded(image_size: int = 128, n_train: int = 320, n_eval: int = 96, seed: int = 0,
                  use_cache: bool = True, require_all: bool = False, n_collect: int = 64) -> EmbeddedData:
    """Build (or load from cache) the embedded face dataset.

    Args:
        image_size: side of the square images (128 default: large enough for MTCNN and RetinaFace;
            crop/resize to a model's 64x64 input downstream).
        n_train, n_collect, n_eval: views per role (faces are cycled in shuffled rounds, so each
            identity of a role appears about equally often).
        seed: augmentation seed; the same seed gives identical tensors.
        use_cache: read/write ``cache_dir("data", "embedded")/<hash>.pt``.
        require_all: fail instead of warning when an optional source (insightface) is missing.
    """
    if image_size < 16 or min(n_train, n_collect, n_eval) < 0:
        raise ValueError(f"need image_size >= 16 and non-negative counts, got image_size={image_size}, "
                         f"n_train={n_train}, n_collect={n_collect}, n_eval={n_eval}")
    faces_all = read_faces_csv()
    paths, missing = {}, []
    for source in sorted({f["source"] for f in faces_all}):
        path = locate_source(source)
        if path is None:
            package = _SOURCES[source][0]
            if package not in _OPTIONAL_PACKAGES:
                raise DatasetError(f"{source}: photo not found in the installed {package!r} package "
                                   f"(expected {_SOURCES[source][1]}); reinstall {package}")
            missing.append(source)
        else:
            paths[source] = path
    if missing:
        message = (f"embedded dataset: {', '.join(missing)} not available (install insightface with "
                   "`pip install --no-deps insightface`); building from the remaining faces")
        if require_all:
            raise DatasetError(message)
        warnings.warn(message, stacklevel=2)
    faces = [f for f in faces_all if f["source"] in paths]
    counts = {"train": int(n_train), "collect": int(n_collect), "eval": int(n_eval)}
    params = {"version": BUILD_VERSION, "image_size": int(image_size), **{f"n_{r}": n for r, n in counts.items()},
              "seed": int(seed), "augment": AUGMENT,
              "framing": [FACE_FRACTION, CENTRE_SHIFT, CANVAS_MARGIN]}
    key_material = {"params": params, "faces_csv": FACES_CSV.read_text(),
                    "sources": {s: file_sha256(p) for s, p in sorted(paths.items())}}
    data_hash = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()
    cache_file = cache_dir("data", "embedded") / f"{data_hash[:20]}.pt" if use_cache else None
    roles = {role: [f["face_id"] for f in faces if f["role"] == role] for role in ROLES}
    meta = {"attr_names": list(ATTGAN_ATTRS), "faces": faces, "roles": roles, "missing_sources": missing,
            "data_hash": data_hash, "params": params}
    if cache_file is not None and cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            return EmbeddedData(**{role: FaceSet(**blob[role]) for role in ROLES}, **meta)
        except Exception as exc:  # a damaged cache file is rebuilt, not fatal
            warnings.warn(f"{cache_file}: unreadable cache ({exc}); rebuilding", stacklevel=2)
    photos = {s: read_image_uint8(p) for s, p in paths.items()}
    canvases = {f["face_id"]: _face_canvas(photos[f["source"]], f["box"], image_size) for f in faces}
    sets = {}
    for stream, role in enumerate(ROLES):
        members = [f for f in faces if f["role"] == role]
        n = counts[role] if members else 0
        sets[role] = _build_split([canvases[f["face_id"]] for f in members], members, n, image_size,
                                  np.random.default_rng([seed, stream]))
    if cache_file is not None:
        blob = {role: {"images": fs.images, "attrs": fs.attrs, "attr_names": fs.attr_names, "ids": fs.ids}
                for role, fs in sets.items()}
        tmp = temp_path(cache_file)
        torch.save(blob, tmp)
        tmp.replace(cache_file)
    return EmbeddedData(**sets, **meta)
