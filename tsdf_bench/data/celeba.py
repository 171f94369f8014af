"""CelebA (Liu et al., ICCV 2015) from a local folder, with the splits the defense papers use.

Expected layout under ``root``::

    img_align_celeba/000001.jpg ...
    list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                              then one row per image: ``000001.jpg  -1  1 ...`` (-1/1)
    list_eval_partition.txt   ``000001.jpg 0`` (0 train, 1 val, 2 test); only for "official"

Protocols (split boundaries are arguments; the defaults are the papers' values):

* ``"cmua"`` (CMUA-Watermark, Huang et al. AAAI 2022; reused by FOUND and TSDF): rows of the
  attribute file after its two header lines; train = rows ``[:182000]``, test = rows
  ``[182637:]`` (19,962 images).  Transform CenterCrop(170) -> Resize(image_size).
* ``"stargan"`` (StarGAN's data loader, Choi et al. CVPR 2018): ``random.seed(1234);
  random.shuffle(rows)``; the first 1,999 rows are test (its ``(i+1) < 2000`` test), the rest
  train.  Transform CenterCrop(178) -> Resize(image_size).  The permutation depends only on the
  row count, so it matches StarGAN's exactly when the file has the official 202,599 rows.
* ``"official"``: ``list_eval_partition.txt`` (splits train / val / test), CenterCrop(178).

File checks (``check_files``, the config's ``[data] check_files``): ``"used"`` (default) checks
only the images a run reads -- :meth:`CelebA.require` for a list of rows, done by
:meth:`CelebA.faceset` before it reads, and each read names a missing file -- so a 5-image run
needs 5 images (plus the two text files); ``"all"`` lists ``img_align_celeba/`` once and fails
at construction if any row of the split has no image (182,000 train + 19,962 test files under
the CMUA protocol).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ImageError
from ..imageio import DEFAULT_MAX_PIXELS, read_image_pil
from ._common import STARGAN_ATTRS, DatasetError, FaceSet, attribute_columns, crop_resize

PROTOCOLS = ("cmua", "stargan", "official")
CMUA_TRAIN_END = 182000
CMUA_TEST_START = 182637
STARGAN_TEST_COUNT = 1999
STARGAN_SEED = 1234
CROP_SIZES = {"cmua": 170, "stargan": 178, "official": 178}
CHECK_FILES = ("used", "all")


def check_files_mode(value) -> str:
    """``"used"`` or ``"all"`` (``True`` is ``"all"``, ``False`` ``"used"``, the older bool form)."""
    if value is True or value is False:
        return "all" if value else "used"
    if value not in CHECK_FILES:
        raise DatasetError(f"check_files = {value!r}; use \"used\" (only the images the run reads must exist) "
                           "or \"all\" (every image of the split, checked up front)")
    return value


def read_attr_file(path) -> tuple[list[str], list[str], torch.Tensor]:
    """Parse ``list_attr_celeba.txt`` -> (file names, attribute names, ``[N, 40]`` 0/1 tensor).

    Checks the count on line 1 against the rows that follow and each row's width against the
    names on line 2, so an off-by-one in the header handling cannot pass silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: attribute file not found (expected CelebA's "
                           "list_attr_celeba.txt: count line, attribute-name line, then rows)")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected a count line and an attribute-name line, "
                           f"found {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DatasetError(f"{path}: line 1 should be the image count, found {lines[0][:60]!r}") from None
    names = lines[1].split()
    if not names or any(n.lstrip("-").isdigit() for n in names):
        raise DatasetError(f"{path}: line 2 should hold the attribute names, found {lines[1][:60]!r}")
    files, values = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DatasetError(f"{path}: line {number} has {len(parts) - 1} values for "
                               f"{len(names)} attributes")
        try:
            row = [int(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{path}: line {number} has a non-integer value: {line[:80]!r}") from None
        if any(v not in (-1, 1, 0) for v in row):
            raise DatasetError(f"{path}: line {number}: attribute values must be -1/1 (or 0/1)")
        files.append(parts[0])
        values.append(row)
    if len(files) != count:
        raise DatasetError(f"{path}: line 1 says {count} images but {len(files)} rows follow "
                           "(truncated or edited file?)")
    attrs = (torch.tensor(values, dtype=torch.float32) > 0).float() if values else \
        torch.zeros(0, len(names))
    return files, names, attrs


def read_partition_file(path) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` -> {file name: 0 train / 1 val / 2 test}."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: partition file not found (protocol 'official' needs CelebA's "
                           "list_eval_partition.txt; or use protocol 'cmua' or 'stargan')")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path}: line {number} should be '<file> 0|1|2', found {line[:60]!r}")
        out[parts[0]] = int(parts[1])
    return out


def split_rows(n_rows: int, protocol: str, split: str, *, train_end: int = CMUA_TRAIN_END,
               test_start: int = CMUA_TEST_START, stargan_test_count: int = STARGAN_TEST_COUNT,
               partition: Sequence[int] | None = None) -> list[int]:
    """Row indices (into the attribute file's data rows) of ``split`` under ``protocol``."""
    if protocol == "cmua":
        if split == "train":
            return list(range(min(train_end, n_rows)))
        if split == "test":
            return list(range(test_start, n_rows))
        raise DatasetError(f"protocol 'cmua' has splits 'train' and 'test', not {split!r}")
    if protocol == "stargan":
        order = list(range(n_rows))
        random.Random(STARGAN_SEED).shuffle(order)  # == random.seed(1234); random.shuffle(lines)
        if split == "test":
            return order[:stargan_test_count]
        if split == "train":
            return order[stargan_test_count:]
        raise DatasetError(f"protocol 'stargan' has splits 'train' and 'test', not {split!r}")
    if protocol == "official":
        code = {"train": 0, "val": 1, "test": 2}.get(split)
        if code is None:
            raise DatasetError(f"protocol 'official' has splits 'train', 'val', 'test', not {split!r}")
        if partition is None:
            raise DatasetError("protocol 'official' needs the partition codes")
        return [i for i, c in enumerate(partition) if c == code]
    raise DatasetError(f"unknown CelebA protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


class CelebA(torch.utils.data.Dataset):
    """One split of CelebA, loaded lazily: ``dataset[i] -> (image [3,S,S] in [-1,1], attrs [A])``.

    Args:
        root: folder holding ``img_align_celeba/`` and ``list_attr_celeba.txt``.
        split: "train" or "test" ("val" too under "official").
        protocol: "cmua" (default), "stargan" or "official" (see the module docstring).
        image_size: output side (256 in the papers; 64/128 for CPU demos).
        attrs: attribute names to return, in order (default StarGAN's 5).
        crop_size: CenterCrop side before resizing; default 170 (cmua) or 178 (stargan/official).
        train_end, test_start, stargan_test_count: split boundaries (paper values by default;
            smaller values let a test use a tiny CelebA-format folder).
        check_files: ``"used"`` (default): only images that are read must exist (checked by
            :meth:`require` / :meth:`faceset` before reading); ``"all"``: list
            ``img_align_celeba/`` once and fail here if a row of this split has no image.

    Example::

        test = CelebA("/data/celeba", split="test", image_size=256)
        faces = test.faceset(n=100)          # FaceSet of the first 100 test images
    """

    def __init__(self, root, split: str = "test", protocol: str = "cmua", image_size: int = 256,
                 attrs: Sequence[str] = STARGAN_ATTRS, crop_size: int | None = None, *,
                 train_end: int = CMUA_TRAIN_END, test_start: int = CMUA_TEST_START,
                 stargan_test_count: int = STARGAN_TEST_COUNT, check_files: str | bool = "used",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root).expanduser()
        self.check_files = check_files_mode(check_files)
        if protocol not in PROTOCOLS:
            raise DatasetError(f"unknown CelebA protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: CelebA folder not found (expected a folder holding "
                               "img_align_celeba/ and list_attr_celeba.txt)")
        self.image_dir = self.root / "img_align_celeba"
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found (expected CelebA's aligned "
                               "images, 000001.jpg ..., in img_align_celeba/ under the root)")
        files, names, table = read_attr_file(self.root / "list_attr_celeba.txt")
        partition = None
        if protocol == "official":
            codes = read_partition_file(self.root / "list_eval_partition.txt")
            missing = [f for f in files if f not in codes]
            if missing:
                raise DatasetError(f"{self.root / 'list_eval_partition.txt'}: no split for "
                                   f"{len(missing)} image(s) of list_attr_celeba.txt, e.g. {missing[0]}")
            partition = [codes[f] for f in files]
        rows = split_rows(len(files), protocol, split, train_end=train_end, test_start=test_start,
                          stargan_test_count=stargan_test_count, partition=partition)
        self.protocol, self.split, self.image_size = protocol, split, int(image_size)
        self.crop_size = CROP_SIZES[protocol] if crop_size is None else int(crop_size)
        self.attr_names = list(attrs)
        self.all_attr_names = names
        cols = attribute_columns(names, self.attr_names)
        self.files = [files[i] for i in rows]
        self.attrs = table[rows][:, cols] if rows else torch.zeros(0, len(cols))
        self.max_pixels = max_pixels
        if self.check_files == "all":
            present = {p.name for p in self.image_dir.iterdir()}
            missing = [f for f in self.files if f not in present]
            if missing:
                raise DatasetError(
                    f"{self.image_dir}: {len(missing)} image(s) listed in list_attr_celeba.txt for "
                    f"the {protocol} {split} split are missing, e.g. {', '.join(missing[:3])} "
                    "(check_files = \"all\"; with \"used\" only the images a run reads must exist)")

    def require(self, indices) -> None:
        """Fail with one :class:`DatasetError` naming every image among rows ``indices`` of this
        split that is missing (the ``"used"`` check: one ``stat`` per image)."""
        indices = list(indices)
        missing = [self.files[i] for i in indices if not (self.image_dir / self.files[i]).is_file()]
        if missing:
            raise DatasetError(
                f"{self.image_dir}: {len(missing)} of the {len(indices)} image(s) this run reads from the "
                f"{self.protocol} {self.split} split are missing, e.g. {', '.join(missing[:3])}; copy them "
                "into img_align_celeba/ or lower n_train_defense / n_collect / n_eval")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.image_dir / self.files[index]
        if not path.exists():
            raise ImageError(path, "listed in list_attr_celeba.txt but missing from img_align_celeba/")
        image = crop_resize(read_image_pil(path, self.max_pixels), self.crop_size, self.image_size)
        return image, self.attrs[index]

    def faceset(self, n: int | None = None, start: int = 0) -> FaceSet:
        """Load images ``start .. start+n`` of the split (all when ``n`` is None) as a FaceSet."""
        stop = len(self) if n is None else min(len(self), start + int(n))
        idx = list(range(start, stop))
        self.require(idx)
        images = torch.stack([self[i][0] for i in idx]) if idx else \
            torch.zeros(0, 3, self.image_size, self.image_size)
        return FaceSet(images, self.attrs[idx] if idx else torch.zeros(0, len(self.attr_names)),
                       self.attr_names, [self.files[i] for i in idx])
