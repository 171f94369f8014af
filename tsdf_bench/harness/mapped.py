"""A run's large image sets kept in files and memory-mapped, so their size is not the process's.

At paper scale the sets that grow with the number of photos are large: the collect and eval
photos (4.7 GB at 5,000 + 1,000 photos of 256 px), their protected versions (4.7 GB per defense
and seed) and the attacker's crops of them (up to 9.4 GB).  A set larger than
:data:`MAP_ABOVE_BYTES` (256 MiB) is allocated in a float32 ``.npy`` file under the run's
``cache/`` folder and memory-mapped (:func:`new_images`): to every consumer,
plugins included, it is an ordinary ``torch.Tensor``, but its pages belong to the file.  The
kernel reads them on use and drops them under memory pressure (they are written back first), so
they are not the process's anonymous memory: ``ps`` counts the resident ones in RSS (as
``RssFile``), the preflight's memory plan counts them as disk (see
:mod:`~tsdf_bench.harness.estimate`).  A set at most that size stays in memory, as before (the
demo's sets are a few MB).  The bytes in the file are the tensor's: a mapped set gives the same
values, so no row depends on where a set lives.

A set made without a ``name`` is anonymous: its file is unlinked as soon as it is mapped, so the
disk space goes with the last reference to the tensor (or with the process).  A named one
(the protected photos, for ``--resume``) stays until the run deletes it; :func:`open_images`
maps it again.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import TsdfBenchError

MAP_ABOVE_BYTES = 256 << 20  # sets larger than this are memory-mapped files (None: never)


def mapped(nbytes: int) -> bool:
    """Whether a set of ``nbytes`` is kept in a mapped file (over :data:`MAP_ABOVE_BYTES`)."""
    return MAP_ABOVE_BYTES is not None and nbytes > MAP_ABOVE_BYTES


def in_file(shape, folder: Path | None) -> bool:
    """Whether :func:`new_images` keeps a set of ``shape`` in a mapped file in ``folder``."""
    return folder is not None and mapped(math.prod(int(s) for s in shape) * 4)


def new_images(shape, folder: Path | None, name: str | None = None) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``: in memory when it holds at most
    :data:`MAP_ABOVE_BYTES` bytes (or ``folder`` is None), else mapped from a ``.npy`` file in
    ``folder``: ``folder/name`` (kept, see :func:`open_images`) or, without ``name``, an
    anonymous file removed at once (its space is freed with the tensor)."""
    shape = tuple(int(s) for s in shape)
    if not in_file(shape, folder):
        return torch.empty(shape)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name is None:
        fd, path = tempfile.mkstemp(prefix="images-", suffix=".npy", dir=folder)
        os.close(fd)
    else:
        path = folder / name
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    reserved = False
    try:
        _reserve(path, array.offset + array.nbytes)
        reserved = True
    finally:
        if name is None or not reserved:
            os.unlink(path)  # the mapping keeps the pages; the file's blocks go when it is unmapped
    return torch.from_numpy(array)


def _reserve(path, size: int) -> None:
    """Allocate the file's blocks now: a mapped file that cannot get its blocks later kills the
    process with SIGBUS at the first write, so a full disk must fail here, with its name."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise TsdfBenchError(f"no room for a {size / 1e9:.2f} GB image set in {Path(path).parent} ({exc.strerror}); "
                             "free disk space there or give the run another --output") from exc
    finally:
        os.close(fd)


def open_images(path) -> torch.Tensor:
    """A kept set written by :func:`new_images`, mapped again (copy-on-write: changing the tensor
    never changes the file)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def mapped_files(folder) -> list[str]:
    """The files under ``folder`` this process has mapped now, removed ones included (from
    ``/proc/self/maps``; empty off Linux): what :func:`new_images` put on disk."""
    folder = str(Path(folder).resolve())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if p.startswith(folder + os.sep))
