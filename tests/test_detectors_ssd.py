"""S3FD and DSFD: no weights can be installed here, so the architecture is checked with random
weights saved to a file and loaded back strictly, and the missing-checkpoint error is checked."""
import pytest
import torch

from tsdf_bench.errors import CheckpointError


@pytest.mark.parametrize("name, env", [("s3fd", "TSDF_BENCH_S3FD"), ("dsfd", "TSDF_BENCH_DSFD")])
def test_missing_checkpoint_says_what_to_set(monkeypatch, name, env):
    from tsdf_bench.plugins import Registry

    monkeypatch.delenv(env, raising=False)
    with pytest.raises(CheckpointError, match=env) as info:
        Registry().create("detector", name)
    assert "checkpoint=" in str(info.value)
    monkeypatch.setenv(env, "/nonexistent/weights.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        Registry().create("detector", name)


def test_s3fd_roundtrip_and_shapes(tmp_path, monkeypatch):
    from tsdf_bench_plugins.detectors.s3fd import S3FDDetector, S3FDNet

    torch.manual_seed(0)
    net = S3FDNet()
    path = tmp_path / "sfd_face.pth"
    torch.save(net.state_dict(), path)
    monkeypatch.setenv("TSDF_BENCH_S3FD", str(path))
    det = S3FDDetector()
    for key, value in net.state_dict().items():
        assert torch.equal(det.net.state_dict()[key], value)
    x = (torch.rand(2, 3, 128, 128) * 2 - 1).requires_grad_()
    out = det.forward_attack(x)
    # 6 sources at strides 4..128 -> 32^2 + 16^2 + 8^2 + 4^2 + 2^2 + 1 anchors
    assert out.scores.shape == (2, 1365) and out.boxes.shape == (2, 1365, 4)
    assert [f.shape[1] for f in out.features] == [256, 512, 512, 1024, 512, 256]
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert len(det.detect(x.detach())) == 2


def test_s3fd_rejects_a_wrong_checkpoint(tmp_path):
    from tsdf_bench_plugins.detectors.s3fd import S3FDDetector

    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="does not match"):
        S3FDDetector(checkpoint=str(path))


def test_dsfd_roundtrip_and_shapes(tmp_path):
    from tsdf_bench_plugins.detectors.dsfd import DSFDDetector, DSFDNet

    torch.manual_seed(0)
    layers = (1, 1, 1, 1)  # same key scheme as ResNet-152, fewer blocks, to keep the test fast
    net = DSFDNet(layers)
    path = tmp_path / "dsfd.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    det = DSFDDetector(checkpoint=str(path), resnet_layers=layers)
    assert "layer1.4.0.conv1.weight" in det.net.state_dict() and "cpm7_2.cpm5.bias" in det.net.state_dict()
    x = torch.rand(1, 3, 96, 96) * 2 - 1
    out = det.forward_attack(x)
    assert out.scores.shape == (1, 24 ** 2 + 12 ** 2 + 6 ** 2 + 3 ** 2 + 2 ** 2 + 1)
    assert all(f.shape[1] == 512 for f in out.features)
    # progressive anchors: 1.5 aspect, smallest 16 px
    assert len(det.detect(x)) == 1
