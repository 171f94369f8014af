"""A folder of face images (LFW, FFHQ, CelebA-HQ, your own photos) as a dataset.

Images are found by file name ending (flat or recursive), each is centre-cropped to a square
(or to ``crop_size``) and resized to ``image_size``.  Optional labels come from a CSV file::

    filename,Black_Hair,Male,Young
    alice/001.jpg,1,0,1
    bob.png,-1,1,-1

``filename`` is relative to the folder (``/`` separators); values are 0/1 or -1/1.  Bad image
files (empty, corrupt, truncated, too large, not images) are reported and skipped: after
:meth:`ImageFolderDataset.faceset` or :meth:`~ImageFolderDataset.validate`, ``.failures`` holds
``(path, reason)`` for each, and a warning says how many.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ImageError
from ..imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images, read_image_pil
from ._common import DatasetError, FaceSet, attribute_columns, crop_resize


def read_attr_csv(path) -> tuple[list[str], dict[str, list[float]]]:
    """Parse a ``filename,attr1,...`` CSV -> (attribute names, {filename: 0/1 values})."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: attribute CSV not found (expected 'filename,attr1,attr2,...' "
                           "with 0/1 or -1/1 values)")
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and any(cell.strip() for cell in r)]
    if not rows or rows[0][0].strip().lower() != "filename" or len(rows[0]) < 2:
        raise DatasetError(f"{path}: the first line must be 'filename,<attribute names>', "
                           f"found {','.join(rows[0]) if rows else '(empty file)'!r}")
    names = [c.strip() for c in rows[0][1:]]
    labels = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(names) + 1:
            raise DatasetError(f"{path}: line {number} has {len(row) - 1} values for {len(names)} attributes")
        try:
            values = [int(float(v)) for v in row[1:]]
        except ValueError:
            raise DatasetError(f"{path}: line {number} has a non-numeric value: {row}") from None
        if any(v not in (-1, 0, 1) for v in values):
            raise DatasetError(f"{path}: line {number}: values must be 0/1 or -1/1, found {row[1:]}")
        labels[row[0].strip().replace("\\", "/")] = [1.0 if v == 1 else 0.0 for v in values]
    return names, labels


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root`` -> ``(image [3,S,S] in [-1,1], attrs [A])``.

    Args:
        root: the folder.
        image_size: output side.
        recursive: also look in sub-folders (default True).
        attr_csv: optional label CSV (path, or a name relative to ``root``); images without a
            row are left out and listed in ``.unlabelled``.
        attrs: attribute names to keep from the CSV, in order (default: all of them).
        crop_size: CenterCrop side before resizing (e.g. 170 for aligned CelebA-like photos);
            default None = the largest central square.
    """

    def __init__(self, root, image_size: int = 128, recursive: bool = True, attr_csv=None,
                 attrs: Sequence[str] | None = None, crop_size: int | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: image folder not found (expected a folder of "
                               f"{'/'.join(e.lstrip('.') for e in extensions[:4])}... files)")
        self.image_size, self.crop_size, self.max_pixels = int(image_size), crop_size, max_pixels
        paths = list_images(self.root, recursive, extensions)
        self.failures: list[tuple[Path, str]] = []
        self.unlabelled: list[Path] = []
        if attr_csv is None:
            self.attr_names: list[str] = []
            labels = None
        else:
            csv_path = Path(attr_csv)
            csv_path = csv_path if csv_path.is_absolute() else self.root / csv_path
            names, labels = read_attr_csv(csv_path)
            self.attr_names = list(attrs) if attrs is not None else names
            cols = attribute_columns(names, self.attr_names)
            present = {p.relative_to(self.root).as_posix() for p in paths}
            for name in sorted(set(labels) - present):
                self.failures.append((self.root / name, f"listed in {csv_path.name} but not found"))
        self.paths, rows = [], []
        for p in paths:
            key = p.relative_to(self.root).as_posix()
            if labels is None:
                rows.append([])
            elif key in labels:
                rows.append([labels[key][c] for c in cols])
            else:
                self.unlabelled.append(p)
                continue
            self.paths.append(p)
        self.attrs = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.attr_names))
        if not self.paths:
            raise DatasetError(f"{self.root}: no {'labelled ' if labels else ''}images found "
                               f"(looked for {', '.join(extensions)}; recursive={recursive})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raises ImageError for a bad file; call :meth:`validate` first to drop them."""
        image = read_image_pil(self.paths[index], self.max_pixels)
        return crop_resize(image, self.crop_size, self.image_size), self.attrs[index]

    def _load_all(self, limit: int | None = None, into: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
        """``(index, image)`` of the first ``limit`` readable images; with ``into`` (a tensor of
        ``limit`` rows) each image is written into its row as it is read and the list holds those rows."""
        good, bad = [], []
        for i in range(len(self.paths)):
            if limit is not None and len(good) >= limit:
                break
            try:
                image = self[i][0]
            except ImageError as exc:
                bad.append((self.paths[i], exc.reason))
                continue
            if into is not None:
                into[len(good)] = image
                image = into[len(good)]
            good.append((i, image))
        if bad:
            self.failures.extend(bad)
            warnings.warn(f"{self.root}: skipped {len(bad)} unreadable image(s), e.g. "
                          f"{bad[0][0].name}: {bad[0][1]} (see .failures)", stacklevel=3)
        return good

    def validate(self) -> list[tuple[Path, str]]:
        """Decode every image once, drop the bad ones from the dataset, return ``.failures``."""
        keep = [i for i, _ in self._load_all()]
        self.paths = [self.paths[i] for i in keep]
        self.attrs = self.attrs[keep] if keep else self.attrs[:0]
        return self.failures

    def faceset(self, n: int | None = None, new_images=None) -> FaceSet:
        """The first ``n`` readable images (all when None) as a FaceSet; bad files are skipped.
        ``new_images(shape)`` (with ``n``): the tensor the images are read into, one at a time
        (e.g. a memory-mapped set, :func:`tsdf_bench.harness.mapped.new_images`)."""
        if new_images is not None and n is not None:
            into = new_images((min(int(n), len(self)), 3, self.image_size, self.image_size))
            good = self._load_all(int(n), into)
            images = into[:len(good)]
        else:
            good = self._load_all(None if n is None else int(n))
            images = torch.stack([img for _, img in good]) if good else \
                torch.zeros(0, 3, self.image_size, self.image_size)
        idx = [i for i, _ in good]
        return FaceSet(images, self.attrs[idx] if idx else self.attrs[:0], self.attr_names,
                       [self.paths[i].relative_to(self.root).as_posix() for i in idx])
