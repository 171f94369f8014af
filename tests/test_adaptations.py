"""The built-in attacker adaptations: purification transforms and retraining."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from tsdf_bench.adaptations.base import Adaptation
from tsdf_bench.errors import ConfigError
from tsdf_bench.models.base import DeepfakeModel
from tsdf_bench.plugins import Registry

PURIFIERS = ("jpeg", "blur", "resize", "noise")


@pytest.fixture(scope="module")
def registry():
    return Registry(strict=True)


def _images(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("name", PURIFIERS + ("none", "retrain"))
def test_registered(registry, name):
    adaptation = registry.create("adaptation", name)
    assert isinstance(adaptation, Adaptation) and adaptation.name == name
    assert adaptation.retrains == (name == "retrain")


@pytest.mark.parametrize("name", PURIFIERS)
def test_purifiers_keep_shape_range_and_change_images(registry, name):
    x = _images()
    y = registry.create("adaptation", name).purify(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= -1.0 - 1e-6 and float(y.max()) <= 1.0 + 1e-6
    assert not torch.allclose(x, y, atol=1e-3)


def test_none_is_identity(registry):
    x = _images()
    assert torch.equal(registry.create("adaptation", "none").purify(x), x)


def test_jpeg_matches_pillow_round_trip(registry):
    from PIL import Image

    x = _images(1, 16)
    u8 = ((x[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=30)
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(registry.create("adaptation", "jpeg", quality=30).purify(x)[0], expected)


def test_blur_preserves_constant_image_and_smooths_noise(registry):
    flat = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(registry.create("adaptation", "blur").purify(flat), flat, atol=1e-6)
    x = _images(1, 32)
    assert registry.create("adaptation", "blur").purify(x).std() < x.std() * 0.6


def test_resize_removes_checkerboard(registry):
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    x = checker.expand(1, 3, 16, 16).clone()
    y = registry.create("adaptation", "resize").purify(x)
    assert y.abs().max() < 0.05  # a 1-pixel pattern does not survive a factor-0.5 down-up


def test_bad_options_and_inputs_raise(registry):
    with pytest.raises(ConfigError, match="quality"):
        registry.create("adaptation", "jpeg", quality=0)
    with pytest.raises(ConfigError, match="factor"):
        registry.create("adaptation", "resize", factor=2)
    with pytest.raises(ConfigError, match=r"\[B, 3, H, W\]"):
        registry.create("adaptation", "blur").purify(torch.zeros(3, 8, 8))


class ToyModel(DeepfakeModel):
    """A two-parameter-layer conditional generator with a least-squares GAN + L1 objective."""

    name = "toy"
    attributes = ("a",)

    def __init__(self):
        super().__init__("smoke", 16)
        self.net = nn.Conv2d(4, 3, 3, padding=1)

    def conditions(self, attrs):
        return [1 - attrs]

    def generate(self, x, c):
        cmap = c.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return torch.tanh(self.net(torch.cat([x, cmap], 1)))

    def make_discriminator(self):
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 8 * 8, 1))

    def losses(self, d, x, attrs, part):
        fake = self.generate(x, 1 - attrs)
        if part == "d":
            return {"d_real": ((d(x) - 1) ** 2).mean(), "d_fake": (d(fake.detach()) ** 2).mean()}
        return {"g_adv": ((d(fake) - 1) ** 2).mean(), "g_l1": (fake - x).abs().mean()}


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_retrain_returns_trained_copy_and_leaves_model_untouched(registry):
    torch.manual_seed(0)
    model = ToyModel()
    before = _params(model)
    crops, attrs = _images(6, 16), torch.tensor([[0.], [1.], [0.], [1.], [0.], [1.]])
    adaptation = registry.create("adaptation", "retrain", batch_size=4, n_critic=1)
    new = adaptation.adapt(model, crops, attrs, steps=3, seed=0)
    assert new is not model
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(new)))
    assert adaptation.last_info["images"] == 6 and adaptation.last_info["warmup_d_steps"] == 0  # 3 // 4
    assert adaptation.last_result.steps == 3


def test_retrain_is_seeded_and_continues_with_its_discriminator(registry):
    model = ToyModel()
    crops, attrs = _images(4, 16), torch.tensor([[0.], [1.], [0.], [1.]])
    a1 = registry.create("adaptation", "retrain", batch_size=2, n_critic=1, warmup_d_steps=2)
    r1 = a1.adapt(model, crops, attrs, steps=2, seed=3)
    assert [h["part"] for h in a1.last_result.history][:2] == ["warmup", "warmup"]
    r2 = registry.create("adaptation", "retrain", batch_size=2, n_critic=1, warmup_d_steps=2).adapt(
        model, crops, attrs, steps=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(_params(r1), _params(r2)))
    # round 2 from the round-1 model reuses its discriminator: no warm-up again
    a1.adapt(r1, crops, attrs, steps=1, seed=4)
    assert a1.last_info["warmup_d_steps"] == 0
    assert all(h["part"] != "warmup" for h in a1.last_result.history)


def test_retrain_without_crops_returns_unchanged_copy(registry):
    model = ToyModel()
    adaptation = registry.create("adaptation", "retrain")
    new = adaptation.adapt(model, torch.zeros(0, 3, 16, 16), torch.zeros(0, 1), steps=5, seed=0)
    assert new is not model and all(torch.equal(a, b) for a, b in zip(_params(model), _params(new)))
    assert "no usable crops" in adaptation.last_info["skipped"]


def test_retrain_real_stargan_smoke(registry):
    model = registry.create("model", "stargan", scale="smoke")
    crops = _images(2, 32)
    attrs = torch.tensor([[1., 0., 0., 1., 0.], [0., 1., 0., 0., 1.]])
    new = registry.create("adaptation", "retrain", batch_size=2).adapt(model, crops, attrs, steps=1, seed=0)
    assert type(new) is type(model) and not new.training
    assert new.generate_all(crops, attrs).shape == (2, 5, 3, 32, 32)


def test_retrain_penalty_interval_follows_the_models_training(registry, monkeypatch):
    """Demo models were trained with lazy regularisation (every 4th D step); the attacker fine-tunes
    them the same way unless ``reg_every`` says otherwise; other scales get the official every step."""
    import tsdf_bench.models.training as training

    seen = []
    real_train = training.train

    def spy(*args, **kwargs):
        seen.append(kwargs["reg_every"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    crops = _images(2, 64)
    attrs = torch.tensor([[1., 0., 0., 1., 0.], [0., 1., 0., 0., 1.]])
    retrain = registry.create("adaptation", "retrain", batch_size=2)
    demo = registry.create("model", "stargan", scale="demo")
    retrain.adapt(demo, crops, attrs, steps=1, seed=0)
    assert retrain.last_info["reg_every"] == 4
    smoke = registry.create("model", "stargan", scale="smoke")
    retrain.adapt(smoke, _images(2, 32), attrs, steps=1, seed=0)
    fixed = registry.create("adaptation", "retrain", batch_size=2, reg_every=2)
    fixed.adapt(demo, crops, attrs, steps=1, seed=0)
    assert seen == [4, 1, 2]
    with pytest.raises(ConfigError, match="reg_every"):
        registry.create("adaptation", "retrain", reg_every=0)
