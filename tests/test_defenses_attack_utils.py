"""Shared attack helpers: input diversity, features, attributes, batching, detector losses."""
import pytest
import torch

from defense_toys import ToyDetector, ToyGAN  # noqa: F401
from tsdf_bench.defenses import attack_utils as au
from tsdf_bench.defenses.detector_losses import FixedProjections, output_loss, tiny_boxes
from tsdf_bench.errors import ConfigError


def test_input_diversity_is_seeded_shape_preserving_and_differentiable():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    outs = [au.input_diversity(x, torch.Generator().manual_seed(s), prob=1.0) for s in range(4)]
    assert all(o.shape == x.shape for o in outs)
    again = au.input_diversity(x, torch.Generator().manual_seed(0), prob=1.0)
    assert torch.equal(outs[0], again)
    assert not torch.equal(outs[0], x)
    outs[0].sum().backward()
    assert x.grad.abs().sum() > 0
    assert au.input_diversity(x, torch.Generator(), prob=0.0) is x


def test_ensemble_features_shape():
    models = [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)]
    f = au.ensemble_features(models, torch.zeros(3, 3, 16, 16), size=8)
    assert f.shape == (3, 2, 8, 8)


def test_attrs_for_accepts_none_tensor_and_mappings():
    m = ToyGAN("m1")
    assert torch.equal(au.attrs_for(m, None, 2, "cpu"), torch.zeros(2, 3))
    t = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    assert torch.equal(au.attrs_for(m, t, 2, "cpu"), t)
    assert torch.equal(au.attrs_for(m, {"m1": t}, 2, "cpu"), t)
    cols = {"a": t[:, 0], "b": t[:, 1], "c": t[:, 2], "extra": torch.ones(2)}
    assert torch.equal(au.attrs_for(m, cols, 2, "cpu"), t)
    with pytest.raises(ConfigError, match="m1"):
        au.attrs_for(m, torch.zeros(2, 5), 2, "cpu")
    with pytest.raises(ConfigError, match="columns"):
        au.attrs_for(m, {"a": t[:, 0]}, 2, "cpu")
    assert au.slice_attrs(cols, slice(0, 1))["a"].shape == (1,)


def test_model_outputs_max_targets():
    m = ToyGAN("m1")
    x = torch.zeros(2, 3, 16, 16)
    assert au.model_outputs(m, x, None).shape == (2, 3, 3, 16, 16)
    assert au.model_outputs(m, x, None, max_targets=1).shape == (2, 1, 3, 16, 16)


def test_batches_and_normalized():
    assert [(s.start, s.stop) for s in au.batches(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ConfigError):
        list(au.batches(3, 0))
    g = torch.tensor([[[[2.0, -4.0]]]])
    assert torch.allclose(au.normalized(g), torch.tensor([[[[2 / 3, -4 / 3]]]]))


def test_fixed_projections_are_fixed():
    f = torch.rand(1, 6, 4, 4)
    p1, p2 = FixedProjections(8, seed=0), FixedProjections(8, seed=0)
    assert torch.equal(p1(0, 1, f), p1(0, 1, f)) and torch.equal(p1(0, 1, f), p2(0, 1, f))
    assert not torch.equal(p1(0, 1, f), FixedProjections(8, seed=1)(0, 1, f))
    assert FixedProjections(None, 0)(0, 0, f) is f


def test_output_loss_zero_only_at_its_target():
    det = ToyDetector()
    out = det.forward_attack(torch.zeros(1, 3, 16, 16))
    assert output_loss(out, out, 16) > 0
    target = type(out)(out.features, torch.zeros_like(out.scores), tiny_boxes(out.boxes))
    assert output_loss(target, out, 16).abs() < 1e-6
    assert torch.allclose((tiny_boxes(out.boxes)[..., 2:] - tiny_boxes(out.boxes)[..., :2]),
                          torch.ones_like(out.boxes[..., :2]))
