"""What the three loaders share: :class:`FaceSet`, attribute name lists, crop-and-resize."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import TsdfBenchError, UnknownNameError

STARGAN_ATTRS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
"""StarGAN's and AttentionGAN's 5 CelebA attributes, in their order (Choi et al., CVPR 2018)."""

ATTGAN_ATTRS = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows",
                "Eyeglasses", "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin",
                "Young")
"""AttGAN's 13 CelebA attributes, in its order (He et al., TIP 2019); a superset of StarGAN's."""


class DatasetError(TsdfBenchError):
    """A dataset folder or label file is missing or malformed; the message names the path."""


@dataclass
class FaceSet:
    """Images with binary attribute labels: the one shape every loader hands the harness.

    images: float ``[N, 3, S, S]`` in [-1, 1]; attrs: float ``[N, A]`` with 0/1 values;
    attr_names: the ``A`` attribute names; ids: ``N`` strings (file name, or face identity).
    """

    images: torch.Tensor
    attrs: torch.Tensor
    attr_names: list
    ids: list

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"FaceSet.images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if self.attrs.ndim != 2 or self.attrs.shape != (n, len(self.attr_names)):
            raise ValueError(f"FaceSet.attrs must be [{n}, {len(self.attr_names)}], "
                             f"got {tuple(self.attrs.shape)}")
        if len(self.ids) != n:
            raise ValueError(f"FaceSet.ids has {len(self.ids)} entries for {n} images")
        self.attr_names = list(self.attr_names)
        self.ids = list(self.ids)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices) -> "FaceSet":
        """The faces at ``indices`` (a sequence of ints or a slice)."""
        if isinstance(indices, slice):
            idx = list(range(len(self)))[indices]
        else:
            idx = [int(i) for i in indices]
        index = torch.as_tensor(idx, dtype=torch.long)
        return FaceSet(self.images[index], self.attrs[index], self.attr_names,
                       [self.ids[i] for i in idx])

    def select(self, attr_names: Sequence[str]) -> "FaceSet":
        """The same faces with only ``attr_names`` as labels, in that order (e.g. STARGAN_ATTRS)."""
        cols = attribute_columns(self.attr_names, attr_names)
        return FaceSet(self.images, self.attrs[:, cols], list(attr_names), self.ids)


def attribute_columns(available: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Column index of each ``wanted`` name in ``available``; an unknown name lists the valid ones."""
    position = {name: i for i, name in enumerate(available)}
    cols = []
    for name in wanted:
        if name not in position:
            raise UnknownNameError("attribute", name, available)
        cols.append(position[name])
    return cols


def center_crop(img: Image.Image, size: int | None) -> Image.Image:
    """Crop the central ``size x size`` square (torchvision's CenterCrop rounding); ``None``: the
    largest central square.  A side smaller than ``size`` is padded with black, as CenterCrop does."""
    w, h = img.size
    side = min(w, h) if size is None else int(size)
    if side > w or side > h:
        canvas = Image.new("RGB", (max(w, side), max(h, side)))
        canvas.paste(img, ((max(w, side) - w) // 2, (max(h, side) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - side) / 2.0))
    left = int(round((w - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def crop_resize(img: Image.Image, crop_size: int | None, image_size: int) -> torch.Tensor:
    """CenterCrop(crop_size) then Resize(image_size) (bilinear, antialiased) -> ``[3, S, S]``."""
    img = center_crop(img, crop_size)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
