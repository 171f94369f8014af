"""The suite's digests (tsdf_bench.hashing): what changes them and what does not."""
import hashlib

import pytest
import torch

from tsdf_bench.hashing import file_sha256, state_sha256, tensors_sha256


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MB chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_tensors_sha256_sees_values_shapes_and_order_not_dtype_or_layout():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(3)
    assert tensors_sha256(a, b) == tensors_sha256(a.double(), b.clone())
    assert tensors_sha256(a.t().contiguous().t(), b) == tensors_sha256(a, b)  # non-contiguous input
    assert tensors_sha256(a, b) != tensors_sha256(b, a)
    assert tensors_sha256(a) != tensors_sha256(a.reshape(3, 2))
    c = a.clone()
    c[1, 2] += 1e-6
    assert tensors_sha256(c) != tensors_sha256(a)


def test_state_sha256_sees_names_dtypes_and_bytes_and_is_stable_for_a_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    digest = state_sha256(net.state_dict())
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    twin.load_state_dict(net.state_dict())
    assert state_sha256(twin.state_dict()) == digest
    renamed = {f"x.{k}": v for k, v in net.state_dict().items()}
    assert state_sha256(renamed) != digest
    assert state_sha256({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}) != digest
    with torch.no_grad():
        twin[0].weight[0, 0, 0, 0] += 1e-7
    assert state_sha256(twin.state_dict()) != digest
    bf = {"w": torch.ones(2, dtype=torch.bfloat16)}
    assert state_sha256(bf) != state_sha256({"w": torch.ones(2)})


def test_differences_sha256_is_the_digest_of_the_whole_differences():
    from tsdf_bench.hashing import differences_sha256

    a, b, c, d = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert differences_sha256((a, b), (c, d), rows=2) == tensors_sha256(a - b, c - d)
    assert differences_sha256((a, b), rows=64) == tensors_sha256(a - b) != tensors_sha256(b - a)
    with pytest.raises(ValueError, match="shapes"):
        differences_sha256((a, c))
