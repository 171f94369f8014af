"""Face data for the benchmark: every loader returns a :class:`FaceSet`, so the harness treats
the embedded default, CelebA and any image folder alike.

* :func:`load_embedded` -- the default: augmented crops of real face photos shipped in packages
  (demo scale; see :mod:`tsdf_bench.data.embedded`).
* :class:`CelebA` -- a local CelebA copy with the CMUA, StarGAN or official splits.
* :class:`ImageFolderDataset` -- LFW, FFHQ or your own photos, with an optional label CSV.
* :func:`read_image` -- validated reading of one image file (``tsdf_bench.imageio``).
"""
from ..imageio import read_image
from ._common import ATTGAN_ATTRS, STARGAN_ATTRS, DatasetError, FaceSet
from .celeba import CelebA
from .embedded import EmbeddedData, load_embedded
from .folder import ImageFolderDataset

__all__ = ["load_embedded", "EmbeddedData", "CelebA", "ImageFolderDataset", "read_image",
           "FaceSet", "DatasetError", "STARGAN_ATTRS", "ATTGAN_ATTRS"]
