"""The measuring stage's bounded-memory pieces: batches of eval photos, seeded generation streams
that can be interleaved, and clean forgeries kept on disk.

* :func:`measure_slices`: the batches of eval photos a cell is measured in.  Never a batch of one
  photo unless the cell has one: a reduction over a single row may take another (multi-threaded)
  path in torch than the same row inside a larger tensor, and the per-pair values must not
  depend on the batching.
* :class:`Generation`: one seeded generation stream (``MeasureMixin._forge_stream``) taken a
  measuring batch at a time.  Between two of its batches the stream's random-number state is
  kept apart from torch's global one, so several streams run side by side (the retrained model's
  clean and protected forgeries, the original model's, the control's) and each yields exactly
  what it yields alone.
* :class:`DiskTensor`: a float32 ``[N, ...]`` tensor in a raw file, written and read by rows with
  ``pwrite`` / ``preadv`` (no memory map: the pages stay in the page cache, not in the process's
  resident memory).  The bytes are the tensor's, so what is read back is bit-identical.
* :class:`CleanForgeries`: one entry of the clean-forgery cache: the model-size clean inputs and
  the model's forgeries of them, each a tensor (in memory) or a :class:`DiskTensor`.
* :func:`release_freed_memory`: hands the memory that freed tensors leave in the C heap back to
  the system (glibc's ``malloc_trim``) after each batch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def measure_slices(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``n`` eval photos, ``max(2, batch_size)`` each; a last slice of one
    photo joins the one before (so a batch has at least 2 photos unless ``n == 1``).  ``n == 0``
    gives one empty slice, so the metrics still see one (empty) batch."""
    size = max(2, int(batch_size))
    slices = [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start == 1:
        slices[-2:] = [slice(slices[-2].start, n)]
    return slices


def max_measure_rows(batch_size: int) -> int:
    """The most eval photos one measuring batch holds (:func:`measure_slices`)."""
    return max(2, int(batch_size)) + 1


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim(0)``; a no-op
    elsewhere).  A batch's tensors below glibc's mmap threshold (up to 32 MB, e.g. one batch of
    8 photos x 5 targets at 256 px) live in the heap; the small tensors kept between batches (the
    per-pair values) split the holes they leave, so without this the resident memory grew by
    about one batch's tensors per batch (measured: +150 MB per batch of 8 x 5 targets at 256 px,
    1.3 to 2.4 GB over one cell of 64 photos) although nothing of them is held."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# -- generation streams ----------------------------------------------------------------------
def _rng_state(cuda) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(cuda) if cuda is not None else None)


def _set_rng_state(state: tuple, cuda) -> None:
    torch.set_rng_state(state[0])
    if cuda is not None and state[1] is not None:
        torch.cuda.set_rng_state(state[1], cuda)


class Generation:
    """The rows of one generation stream (an iterator of ``(slice, [b, T, 3, s, s])`` that seeds
    torch when it starts), taken ``n`` rows at a time with :meth:`take` whatever its own batch
    size.  The stream's random-number state (CPU, and the CUDA device's when ``device`` is one)
    is swapped in around each of its batches and out again after: streams can be interleaved, and
    the code between two batches neither sees nor moves the stream's state.  ``seconds``: the time
    spent in the stream."""

    def __init__(self, stream, device=None):
        self._it = iter(stream)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = device if device.type == "cuda" and torch.cuda.is_available() else None
        self._state: tuple | None = None
        self._buffer: torch.Tensor | None = None
        self.seconds = 0.0

    @property
    def rng_state(self) -> tuple | None:
        """The stream's random-number state after its last batch (None before the first)."""
        return self._state

    def restore_rng(self) -> None:
        """Leave torch's global random-number state where this stream left it, as if it had run
        on the global state alone (what code after a whole-tensor generation saw)."""
        if self._state is not None:
            _set_rng_state(self._state, self._cuda)

    def _next(self) -> torch.Tensor:
        outer = _rng_state(self._cuda)
        if self._state is not None:
            _set_rng_state(self._state, self._cuda)
        try:
            _, part = next(self._it)
        finally:
            self._state = _rng_state(self._cuda)
            _set_rng_state(outer, self._cuda)
        return part

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` rows of the stream."""
        t0 = time.perf_counter()
        parts = [self._buffer] if self._buffer is not None else []
        have = sum(p.shape[0] for p in parts)
        self._buffer = None
        while have < n:
            part = self._next()
            parts.append(part)
            have += part.shape[0]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if have > n:
            self._buffer, out = out[n:], out[:n]
        self.seconds += time.perf_counter() - t0
        return out


# -- clean forgeries on disk -----------------------------------------------------------------
class DiskTensor:
    """A tensor ``[N, ...]`` (float32 by default) in a raw file at ``path``, created empty; rows are
    written with :meth:`write` and read with ``disk[a:b]`` (a new tensor).  Read and written with
    ``pwrite`` / ``preadv``: nothing is memory-mapped, so the file's pages never count in the
    process's resident memory.  :meth:`delete` closes and removes the file."""

    def __init__(self, path, shape, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._row = math.prod(self.shape[1:]) * torch.empty((), dtype=dtype).element_size()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.shape[0] * self._row)

    @classmethod
    def of(cls, path, tensor: torch.Tensor) -> "DiskTensor":
        """A file holding a copy of ``tensor``."""
        disk = cls(path, tensor.shape, tensor.dtype)
        disk.write(0, tensor)
        return disk

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row

    def __len__(self) -> int:
        return self.shape[0]

    def _view(self, tensor: torch.Tensor) -> memoryview:
        return memoryview(tensor.numpy().reshape(-1)).cast("B") if tensor.numel() else memoryview(b"")

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` as rows ``start ..`` of the tensor."""
        if tuple(rows.shape[1:]) != tuple(self.shape[1:]) or rows.dtype != self.dtype:
            raise ValueError(f"{self.path.name}: rows of shape {tuple(rows.shape)} / {rows.dtype} do not fit "
                             f"{tuple(self.shape)} / {self.dtype}")
        if start < 0 or start + rows.shape[0] > self.shape[0]:
            raise IndexError(f"{self.path.name}: rows {start}..{start + rows.shape[0]} outside 0..{self.shape[0]}")
        data = self._view(rows.detach().cpu().contiguous())
        offset, done = start * self._row, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def __getitem__(self, index) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError(f"{self.path.name}: index with a slice of rows, not {type(index).__name__}")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.path.name}: only contiguous slices of rows are read")
        out = torch.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        data = self._view(out)
        offset, done = start * self._row, 0
        while done < len(data):
            got = os.preadv(self._fd, [data[done:]], offset + done)
            if got <= 0:
                raise EOFError(f"{self.path}: file ended at byte {offset + done}")
            done += got
        return out

    def delete(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


@dataclass
class CleanForgeries:
    """One entry of the clean-forgery cache (a model and a purification): ``inputs`` ``[N, 3, s, s]``
    (the model-size clean inputs) and ``fakes`` ``[N, T, 3, s, s]`` (the model's forgeries of
    them), each a tensor or a :class:`DiskTensor`; both are indexed by slices of rows.  ``shared``:
    ``inputs`` is the run's eval tensor itself (no memory of its own)."""

    inputs: object
    fakes: object
    shared: bool = False

    @property
    def ram_bytes(self) -> int:
        """The memory this entry holds (inputs shared with the data not counted)."""
        return _nbytes(self.fakes) + (0 if self.shared else _nbytes(self.inputs))

    @property
    def disk_bytes(self) -> int:
        return sum(t.nbytes for t in (self.inputs, self.fakes) if isinstance(t, DiskTensor))

    def release(self) -> None:
        """Delete the entry's files (an entry in memory is left to the garbage collector)."""
        for t in (self.inputs, self.fakes):
            if isinstance(t, DiskTensor):
                t.delete()


def cache_folder(run_dir) -> Path:
    """This process's folder for clean forgeries on disk, ``RUN/cache/clean-forgeries-HOST-PID``;
    folders that dead processes of this host left behind are removed first."""
    host = socket.gethostname().replace("-", "_")
    parent = Path(run_dir) / "cache"
    for old in parent.glob(f"clean-forgeries-{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return parent / f"clean-forgeries-{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
