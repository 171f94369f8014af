"""The image sets of a run, cut from the configured data source so that roles never share a photo.

The threat model (``docs/threat-model.md``): a person protects photos before posting them; an
attacker collects some of them, prepares them and retrains its face-editing model, then forges
other protected photos.  The roles:

* **fit** (``n_train_defense``): the images a universal defense is fitted on (white-box, like
  the 128 CelebA training images of CMUA/FOUND/TSDF).  The one allowed overlap: they may come
  from the generators' training identities (CMUA's protocol fits on the training set).
* **collect** (``n_collect``): the protected photos the attacker collects and retrains on.
* **eval** (``n_eval``): protected photos the attacker forges; forgeries and detections are
  measured on them.
* **generator training** (``generator_train``; the embedded source keeps it inside the model zoo):
  never a collect or eval photo.

A photo, with every augmented view of it, has exactly one role.  How each source does it
(recorded in every row as ``split``):

* ``embedded``: the CSV's ``role`` column (6 training persons, 1 collected person, 3 evaluated
  persons; one photo per person, so collect and eval persons differ as well);
* ``celeba``: with ``identity_CelebA.txt`` in the CelebA folder, persons of the test partition
  with two or more photos give some photos to collect and the others to eval (the attacker
  forges other photos of the persons it collected); without it, CMUA's row split: fit from the
  training rows, collect and eval from disjoint rows of the test rows;
* ``folder``: fit, collect and eval are disjoint runs of files (an error when too few);
* ``synthetic``: separately generated images (harness tests only).

:func:`check_disjoint` refuses any overlap with the counts; too few photos or identities is a
:class:`~tsdf_bench.errors.ConfigError` naming them, never a silent overlap.
Images are ``[N, 3, S, S]`` in [-1, 1] with ``S = data.image_size``; ``attrs`` are 0/1 labels with
column names ``attr_names``.  Each model gets its own columns through :func:`select_attrs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..hashing import tensors_sha256
from .mapped import in_file, new_images

# The attribute names of the synthetic test source (CelebA names, so real plugins accept them).
SYNTHETIC_ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
                        "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young")


@dataclass
class Split:
    images: torch.Tensor
    attrs: torch.Tensor
    photos: list = field(default_factory=list)  # the source photo of each image (views share one)
    persons: list = field(default_factory=list)  # the person of each image, where known

    def take(self, n: int) -> "Split":
        return Split(self.images[:n].clone(), self.attrs[:n].clone(), self.photos[:n], self.persons[:n])


@dataclass
class RunData:
    fit: Split
    collect: Split
    eval: Split
    attr_names: tuple[str, ...]
    data_hash: str
    description: str
    notes: list[str] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # how the roles were made (recorded in every row)
    generator_train: Split | None = None  # None: the model zoo's own training faces (embedded)


def to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` to ``size x size`` (bilinear, antialiased), clamped to [-1, 1]."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    # the same resize as DeepfakeModel.to_input_size, which attacks differentiate through
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


def select_attrs(attrs: torch.Tensor, attr_names, wanted, who: str) -> torch.Tensor:
    """The columns of ``attrs`` named ``wanted`` (a model's ``attributes``), in that order."""
    attr_names = list(attr_names)
    missing = [a for a in wanted if a not in attr_names]
    if missing:
        raise ConfigError(f"{who} uses attributes {missing} that the data does not label "
                          f"(data attributes: {', '.join(attr_names)}); use a data source with those labels")
    index = [attr_names.index(a) for a in wanted]
    return attrs[:, index].float() if index else attrs[:, :0].float()


def synthetic(n: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded smooth random images with random 0/1 attributes: for harness tests only (no faces)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.randn(n, 3, image_size, image_size, generator=g)).clamp(-1, 1)
    attrs = (torch.rand(n, len(SYNTHETIC_ATTRIBUTES), generator=g) > 0.5).float()
    return images, attrs


ROLES = ("fit", "collect", "eval")


def check_disjoint(splits: dict, generator_photos=(), generator_persons=()) -> None:
    """Refuse a photo in two roles (``splits``: role -> :class:`Split`), or a collect/eval photo or
    person among the generators' training ones.  fit may share photos with generator training."""
    photos = {role: set(split.photos) for role, split in splits.items()}
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1:]:
            shared = photos[a] & photos[b]
            if shared:
                raise ConfigError(f"the {a} and {b} splits share {len(shared)} photo(s) (e.g. {sorted(shared)[:3]}); "
                                  f"roles must be disjoint: use more photos or smaller n_train_defense / n_collect / n_eval")
    for role in ("collect", "eval"):
        for kind, seen, mine in (("photo", set(generator_photos), photos[role]),
                                 ("person", set(generator_persons), set(splits[role].persons))):
            shared = seen & mine
            if shared:
                raise ConfigError(f"{len(shared)} {role} {kind}(s) also train the generators (e.g. {sorted(shared)[:3]}); "
                                  "protected persons must never enter generator training")


def _need(what: str, have: int, want: int, fix: str) -> None:
    if have < want:
        raise ConfigError(f"[data] {what}: {have} available, {want} needed for identity-disjoint roles; {fix}")


def _embedded(d):
    from ..data.embedded import load_embedded

    ds = load_embedded(image_size=d.image_size, n_train=max(d.n_train_defense, 1), n_collect=d.n_collect,
                       n_eval=d.n_eval, seed=0)
    counts = {role: len(ids) for role, ids in ds.roles.items()}
    if not counts["collect"] or not counts["eval"]:
        raise ConfigError(
            f"[data] source 'embedded': {sum(counts.values())} faces available (train {counts['train']}, collect "
            f"{counts['collect']}, eval {counts['eval']}); identity-disjoint roles need at least one collected and one "
            f"evaluated person. Missing sources: {', '.join(ds.missing_sources) or 'none'}; install insightface "
            "(python3 bootstrap.py does) or use a CelebA/folder source")
    sets = {"fit": ds.train, "collect": ds.collect, "eval": ds.eval}
    splits = {role: Split(fs.images, fs.attrs, list(fs.ids), list(fs.ids)) for role, fs in sets.items()}
    source_hash = ds.data_hash
    description = f"embedded demo faces from installed packages ({d.image_size}px; demo scale; source hash {source_hash[:12]})"
    split = {"kind": "embedded-roles", "persons": ds.roles,
             "note": "one photo per person: collected and evaluated persons differ; generators train on the 'train' persons"}
    # the zoo trains the demo generators on the 'train' persons (tsdf_bench.models.zoo.default_data)
    return splits, tuple(ds.attr_names), description, split, None, ds.roles["train"]


def _celeba(d, attributes, folder=None):
    from ..data.celeba import CelebA

    kw = dict(protocol=d.protocol, image_size=d.image_size, attrs=attributes, check_files=d.check_files)
    train, test = CelebA(d.path, split="train", **kw), CelebA(d.path, split="test", **kw)
    _need("CelebA training images for fit", len(train), d.n_train_defense, "lower n_train_defense")
    fit = train.faceset(n=d.n_train_defense)
    identity_file = Path(d.path).expanduser() / "identity_CelebA.txt"
    if identity_file.is_file():
        person = _read_identities(identity_file)
        by_person: dict = {}
        for i, name in enumerate(test.files):
            if name in person:
                by_person.setdefault(person[name], []).append(i)
        collect_idx, eval_idx = [], []
        for pid, idx in by_person.items():
            if len(idx) < 2:
                continue
            half = (len(idx) + 1) // 2
            collect_idx += idx[:half][:max(0, d.n_collect - len(collect_idx))]
            eval_idx += idx[half:][:max(0, d.n_eval - len(eval_idx))]
            if len(collect_idx) >= d.n_collect and len(eval_idx) >= d.n_eval:
                break
        _need("photos of test persons with 2+ photos, for collect", len(collect_idx), d.n_collect, "lower n_collect")
        _need("other photos of the collected persons, for eval", len(eval_idx), d.n_eval, "lower n_eval")
        kind = "celeba-identities"
        note = "collect and eval: different photos of the same test-partition persons (identity_CelebA.txt)"
    else:
        _need("CelebA test images for collect + eval", len(test), d.n_collect + d.n_eval, "lower n_collect / n_eval")
        collect_idx = list(range(d.n_collect))
        eval_idx = list(range(d.n_collect, d.n_collect + d.n_eval))
        person = {}
        kind = "celeba-cmua-rows"
        note = "no identity_CelebA.txt: CMUA's row split; collect and eval are disjoint test rows (persons unknown)"

    test.require(collect_idx + eval_idx)  # every file the run reads, before reading any

    def load(idx):  # one photo at a time into the set (a memory-mapped file when large)
        images = new_images((len(idx), 3, d.image_size, d.image_size), folder)
        for row, i in enumerate(idx):
            images[row] = test[i][0]
        files = [test.files[i] for i in idx]
        return Split(images, test.attrs[idx] if idx else torch.zeros(0, len(attributes)), files,
                     [person.get(f, f) for f in files])

    splits = {"fit": Split(fit.images, fit.attrs, list(fit.ids), [person.get(f, f) for f in fit.ids]),
              "collect": load(collect_idx), "eval": load(eval_idx)}
    description = f"CelebA at {d.path} ({d.protocol} protocol, {d.image_size}px)"
    return splits, tuple(fit.attr_names), description, {"kind": kind, "note": note}, None, ()


def _read_identities(path) -> dict:
    """``identity_CelebA.txt``: ``<file> <person id>`` per line."""
    out = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _folder(d, keep_in=None):
    from ..data.folder import ImageFolderDataset

    folder = ImageFolderDataset(d.path, image_size=d.image_size, attr_csv=d.attr_csv or None,
                                attrs=list(d.attributes) or None)
    need = d.n_train_defense + d.n_collect + d.n_eval
    faces = folder.faceset(n=need, new_images=lambda shape: new_images(shape, keep_in))  # mapped when large
    _need(f"readable images in folder {d.path}", len(faces), need,
          "add photos or lower n_train_defense / n_collect / n_eval")
    cut = [0, d.n_train_defense, d.n_train_defense + d.n_collect, need]
    splits = {role: Split(faces.images[a:b], faces.attrs[a:b], faces.ids[a:b], faces.ids[a:b])
              for role, a, b in zip(ROLES, cut, cut[1:])}
    description = f"image folder {d.path} ({d.image_size}px; fit, collect, eval = consecutive files)"
    split = {"kind": "folder-files", "note": "one file per photo; persons unknown (each file counted as its own)"}
    return splits, tuple(faces.attr_names), description, split, None, ()


def _synthetic(d):
    n_fit, n_col = d.n_train_defense, d.n_collect
    train_x, train_a = synthetic(max(n_fit + n_col, 1), d.image_size, seed=1)
    held_x, held_a = synthetic(d.n_eval, d.image_size, seed=2)
    ids = [f"synthetic-a{i}" for i in range(train_x.shape[0])]
    held_ids = [f"synthetic-b{i}" for i in range(d.n_eval)]
    splits = {"fit": Split(train_x[:n_fit], train_a[:n_fit], ids[:n_fit], ids[:n_fit]),
              "collect": Split(train_x[n_fit:n_fit + n_col], train_a[n_fit:n_fit + n_col], ids[n_fit:n_fit + n_col],
                               ids[n_fit:n_fit + n_col]),
              "eval": Split(held_x, held_a, held_ids, held_ids)}
    gen = Split(train_x[:n_fit], train_a[:n_fit], ids[:n_fit], ids[:n_fit])
    return (splits, SYNTHETIC_ATTRIBUTES, "synthetic random images (harness tests only; no faces)",
            {"kind": "synthetic", "note": "separately generated images"}, gen, ())


def _kept(images: torch.Tensor, folder) -> torch.Tensor:
    """``images`` as a run keeps them: a memory-mapped copy when large (see :mod:`.mapped`)."""
    if not in_file(images.shape, folder):
        return images
    return new_images(images.shape, folder).copy_(images)


def load_run_data(cfg, folder=None) -> RunData:
    """Cut fit / collect / eval from the configured source (see the module docstring).  ``folder``:
    where the collect and eval photos are kept when too large for memory
    (:func:`~tsdf_bench.harness.mapped.new_images`; None: in memory)."""
    d = cfg.data
    from ..data._common import ATTGAN_ATTRS

    if d.source == "synthetic":
        parts = _synthetic(d)
    elif d.source == "embedded":
        parts = _embedded(d)
    elif d.source == "celeba":
        parts = _celeba(d, list(d.attributes) or list(ATTGAN_ATTRS), folder)
    else:
        parts = _folder(d, folder)
    splits, names, description, split, generator_train, generator_persons = parts
    notes = []
    for role, want in (("fit", d.n_train_defense), ("collect", d.n_collect), ("eval", d.n_eval)):
        have = splits[role].images.shape[0]
        if role != "fit" and want > 0 and have == 0:
            raise ConfigError(f"[data] source {d.source!r} yielded an empty {role} split")
        if have > want:
            splits[role] = splits[role].take(want)
    if generator_train is None and d.source != "embedded":
        generator_train = splits["fit"]  # the only photos outside collect/eval a non-embedded run may train on
    check_disjoint(splits, generator_train.photos if generator_train is not None else (), generator_persons)
    for role, s in splits.items():
        s.images = to_size(s.images.float(), d.image_size)
        if role != "fit" and d.source not in ("celeba", "folder"):  # those are read into their sets (mapped when large)
            s.images = _kept(s.images, folder)
    split.update({f"n_{role}_photos": len(set(s.photos)) for role, s in splits.items()},
                 **{f"n_{role}_persons": len(set(s.persons)) for role, s in splits.items()})
    fit, collect, ev = splits["fit"], splits["collect"], splits["eval"]
    data_hash = tensors_sha256(fit.images, fit.attrs, collect.images, collect.attrs, ev.images, ev.attrs)
    return RunData(fit, collect, ev, names, data_hash, description, notes, split, generator_train)
