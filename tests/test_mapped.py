"""Large image sets in memory-mapped files (tsdf_bench.harness.mapped): in memory up to the
threshold, a file beyond it, the same values either way, an anonymous file's space freed with
its tensor, a named one kept and mapped again without being changed."""
import gc
import os
import sys

import numpy as np
import pytest
import torch

from tsdf_bench.harness import mapped
from tsdf_bench.harness.mapped import mapped_files, new_images, open_images

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux's")


def test_small_sets_stay_in_memory_and_large_ones_are_files(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 4 * 3 * 8 * 8 * 4)  # four 8 px photos
    small = new_images((4, 3, 8, 8), tmp_path)
    assert not list(tmp_path.iterdir()) and not mapped_files(tmp_path)
    large = new_images((5, 3, 8, 8), tmp_path)
    values = torch.rand(5, 3, 8, 8)
    large[:] = values
    assert isinstance(large, torch.Tensor) and large.dtype == torch.float32 and torch.equal(large, values)
    assert small.shape == (4, 3, 8, 8)
    assert new_images((5, 3, 8, 8), None).shape == (5, 3, 8, 8)  # no folder: always in memory


@linux
def test_an_anonymous_set_is_unlinked_at_once_and_freed_with_its_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    images = new_images((3, 3, 16, 16), tmp_path)
    images[:] = 0.5
    files = mapped_files(tmp_path)
    assert len(files) == 1 and files[0].endswith("(deleted)")  # mapped, no name left on disk
    assert not list(tmp_path.iterdir())
    assert float(images.sum()) == 0.5 * images.numel()
    del images
    gc.collect()
    assert not mapped_files(tmp_path)


def test_a_named_set_is_kept_and_mapped_again_copy_on_write(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    values = torch.randn(2, 3, 8, 8)
    images = new_images(values.shape, tmp_path, "set.npy")
    images[:] = values
    del images
    gc.collect()
    again = open_images(tmp_path / "set.npy")
    assert torch.equal(again, values)
    again[0] = 0.0  # a change in the process only
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "set.npy")), values)


def test_a_full_disk_is_a_clear_error_not_a_crash_later(tmp_path, monkeypatch):
    """The file's blocks are allocated when the set is made: without that, the first write to a
    page the disk has no room for kills the process (SIGBUS)."""
    import errno

    from tsdf_bench.errors import TsdfBenchError

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    for name in (None, "set.npy"):
        with pytest.raises(TsdfBenchError, match=r"no room for a 0\.00 GB image set in .*No space left.*--output"):
            new_images((2, 3, 8, 8), tmp_path, name)
    assert not list(tmp_path.iterdir())  # nothing left behind
