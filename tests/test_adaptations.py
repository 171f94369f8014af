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

PURIFIERS = ("jpeg", "blur", "resize", "noise", "salt-pepper")


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
    """Demo models were trained with lazy regularisation (every 4th D step, recorded by the zoo as the
    model's ``train_recipe``); the attacker fine-tunes them the same way unless ``reg_every`` says
    otherwise; a model without a recipe (official weights) gets the official every step."""
    from tsdf_bench.models.zoo import recipe_for

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
    demo.train_recipe = recipe_for("stargan", "demo")
    retrain.adapt(demo, crops, attrs, steps=1, seed=0)
    assert retrain.last_info["reg_every"] == 4 and retrain.last_info["n_critic"] == 1
    smoke = registry.create("model", "stargan", scale="smoke")
    retrain.adapt(smoke, _images(2, 32), attrs, steps=1, seed=0)
    fixed = registry.create("adaptation", "retrain", batch_size=2, reg_every=2)
    fixed.adapt(demo, crops, attrs, steps=1, seed=0)
    assert seen == [4, 1, 2]
    with pytest.raises(ConfigError, match="reg_every"):
        registry.create("adaptation", "retrain", reg_every=0)


# -- each purification parameter has the documented effect (issue 16) -------------------
def _smooth(size=32):
    """A smooth colour ramp in [-0.8, 0.8] (no clamping, little JPEG ringing)."""
    t = torch.linspace(-0.8, 0.8, size)
    return torch.stack([t[None, :].expand(size, size), t[:, None].expand(size, size),
                        (t[None, :] * t[:, None]).expand(size, size)])[None].clone()


def test_jpeg_lower_quality_loses_more(registry):
    x = _images(2, 32)
    err = {q: float((registry.create("adaptation", "jpeg", quality=q).purify(x) - x).abs().mean()) for q in (10, 70, 90)}
    assert err[10] > err[70] > err[90] > 0


def test_blur_sigma_and_kernel_size(registry):
    x = _images(1, 32)
    stds = [float(registry.create("adaptation", "blur", sigma=s).purify(x).std()) for s in (0.5, 1.0, 2.0)]
    assert stds[0] > stds[1] > stds[2]
    # PDB's blur1: a 1-pixel kernel is the identity
    assert torch.equal(registry.create("adaptation", "blur", kernel_size=1).purify(x), x)
    # PDB's blur3: torchvision's GaussianBlur(3, sigma=1.0), same kernel and reflect padding
    from torchvision.transforms.functional import gaussian_blur

    for k, s in ((3, 1.0), (5, 0.7)):
        ours = registry.create("adaptation", "blur", kernel_size=k, sigma=s).purify(x)
        assert torch.allclose(ours, gaussian_blur(x, [k, k], [s, s]), atol=1e-5)
    # a larger kernel at the same sigma smooths more
    k3 = registry.create("adaptation", "blur", kernel_size=3, sigma=2.0).purify(x)
    k7 = registry.create("adaptation", "blur", kernel_size=7, sigma=2.0).purify(x)
    assert float(k7.std()) < float(k3.std())
    for bad in (0, 2, 1.5):
        with pytest.raises(ConfigError, match="kernel_size"):
            registry.create("adaptation", "blur", kernel_size=bad)


def test_noise_std_is_on_the_minus1_1_scale_and_seeded(registry):
    x = torch.zeros(2, 3, 64, 64)
    for std in (0.003, 0.03, 0.1):
        y = registry.create("adaptation", "noise", std=std).purify(x)
        assert abs(float(y.std()) / std - 1) < 0.03
    a = registry.create("adaptation", "noise", std=0.03, seed=1).purify(x)
    assert torch.equal(a, registry.create("adaptation", "noise", std=0.03, seed=1).purify(x))
    assert not torch.equal(a, registry.create("adaptation", "noise", std=0.03, seed=2).purify(x))


@pytest.mark.parametrize("amount", [0.003, 0.03, 0.3])
def test_salt_pepper_amount_is_the_share_of_changed_elements(registry, amount):
    x = torch.zeros(4, 3, 64, 64)
    y = registry.create("adaptation", "salt-pepper", amount=amount).purify(x)
    changed = y != 0
    assert set(torch.unique(y[changed]).tolist()) <= {-1.0, 1.0}
    expected = amount - amount ** 2 / 4  # pepper wins where both fall (PDB's order)
    n = changed.numel()
    assert abs(float(changed.double().mean()) - expected) < 4 * (expected / n) ** 0.5 + 1e-4
    salt, pepper = float((y == 1).double().mean()), float((y == -1).double().mean())
    assert abs(salt - pepper) < 0.25 * expected + 4 / n ** 0.5 * 0.1
    # per element: the three channels of a pixel are drawn independently (coloured specks)
    assert bool(((y[:, 0] != y[:, 1]) & (changed[:, 0] | changed[:, 1])).any())


def test_salt_pepper_per_pixel_seeded_and_checked(registry):
    x = _smooth()
    y = registry.create("adaptation", "salt-pepper", amount=0.2, per_pixel=True, seed=3).purify(x)
    changed = (y != x).any(1)
    assert bool(changed.any())
    assert torch.equal((y == 1).all(1) | (y == -1).all(1), changed)  # whole pixels white or black
    assert torch.equal(y, registry.create("adaptation", "salt-pepper", amount=0.2, per_pixel=True, seed=3).purify(x))
    assert not torch.equal(y, registry.create("adaptation", "salt-pepper", amount=0.2, per_pixel=True, seed=4).purify(x))
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="amount"):
            registry.create("adaptation", "salt-pepper", amount=bad)


def test_resize_smaller_factor_removes_more_detail(registry):
    x = _images(1, 32)
    err = {f: float((registry.create("adaptation", "resize", factor=f).purify(x) - x).abs().mean()) for f in (0.25, 0.5, 0.9)}
    assert err[0.25] > err[0.5] > err[0.9] > 0


def test_pdb_settings_build_and_follow_pdbs_code(registry):
    from tsdf_bench_plugins.adaptations.purify import PDB_SETTINGS, PDB_SETTINGS_AS_NAMED

    assert list(PDB_SETTINGS) == ["jpeg70", "jpeg90", "blur1", "blur3", "noise001", "noise003",
                                  "salt_pepper001", "salt_pepper003"]
    assert PDB_SETTINGS["noise003"] == ("noise", {"std": 0.003})  # float("003") / 1000 in PDB's code
    assert PDB_SETTINGS_AS_NAMED["salt_pepper003"] == ("salt-pepper", {"amount": 0.03})
    x = _images(1, 32)
    for name, (plugin, options) in {**PDB_SETTINGS, **PDB_SETTINGS_AS_NAMED}.items():
        y = registry.create("adaptation", plugin, **options).purify(x)
        assert y.shape == x.shape
        assert torch.equal(y, x) == (name == "blur1")


# -- LoRA patching ------------------------------------------------------------------------
def _lora_setup(registry, name="stargan", n=4):
    torch.manual_seed(0)
    model = registry.create("model", name, scale="smoke").eval()
    size = model.image_size
    crops = _images(n, size, seed=1)
    attrs = torch.randint(0, 2, (n, len(model.attributes)), generator=torch.Generator().manual_seed(2)).float()
    return model, crops, attrs


def test_lora_patch_trains_only_the_adapters_and_leaves_the_model_untouched(registry):
    from tsdf_bench_plugins.adaptations.lora_patch import LoRAConv2d, adapter_parameters, lora_modules, patches_disabled

    model, crops, attrs = _lora_setup(registry)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adaptation = registry.create("adaptation", "lora-patch", rank=2, batch_size=2, max_targets=2, pgd_steps=2)
    assert adaptation.retrains
    untrained = adaptation.patch(model, seed=5)
    new = adaptation.adapt(model, crops, attrs, steps=2, seed=5)
    assert new is not model and not new.training
    # the input model: same weights, no adapters
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not lora_modules(model)
    # every conv of the copy is patched; its frozen base weights equal the original's
    n_conv = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())
    assert len(lora_modules(new)) == n_conv == adaptation.last_info["patched_layers"]
    new_state = new.state_dict()
    for key, value in before.items():
        prefix, leaf = key.rsplit(".", 1)
        assert torch.equal(new_state[f"{prefix}.base.{leaf}"] if f"{prefix}.base.{leaf}" in new_state else new_state[key], value)
    # only adapter parameters require grad and only they moved
    adapters = {id(p) for p in adapter_parameters(new)}
    assert {id(p) for p in new.parameters() if p.requires_grad} == adapters
    moved = {name for (name, p), (_, q) in zip(new.named_parameters(), untrained.named_parameters())
             if not torch.equal(p, q)}
    assert moved and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "gate") for name in moved)
    assert any(name.endswith("gate") for name in moved)
    assert adaptation.last_info["updates"] == 4  # 2 batches x 2 targets
    # the output changed; switching the patches off gives the original model back
    with torch.no_grad():
        ref = model.generate_targets(crops, attrs)
        assert not torch.allclose(new.generate_targets(crops, attrs), ref, atol=1e-4)
        assert not torch.allclose(new.generate_targets(crops, attrs), untrained.generate_targets(crops, attrs), atol=1e-6)
        with patches_disabled(new):
            assert torch.allclose(new.generate_targets(crops, attrs), ref, atol=1e-6)
    assert isinstance(lora_modules(new)[0], LoRAConv2d)


def test_lora_patch_is_seeded_continues_without_nesting_and_handles_no_data(registry):
    from tsdf_bench_plugins.adaptations.lora_patch import lora_modules

    model, crops, attrs = _lora_setup(registry, "attgan")
    kw = dict(rank=2, batch_size=2, max_targets=1, pgd_steps=1)
    a = registry.create("adaptation", "lora-patch", **kw).adapt(model, crops, attrs, steps=1, seed=3)
    b = registry.create("adaptation", "lora-patch", **kw).adapt(model, crops, attrs, steps=1, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    adaptation = registry.create("adaptation", "lora-patch", **kw)
    a2 = adaptation.adapt(a, crops, attrs, steps=1, seed=4)  # round 2: the same patches, trained on
    assert len(lora_modules(a2)) == len(lora_modules(a)) and not any(
        isinstance(m.base, type(m)) for m in lora_modules(a2))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), a2.parameters()))
    empty = adaptation.adapt(model, crops[:0], attrs[:0], steps=3, seed=0)
    assert "no usable images" in adaptation.last_info["skipped"] and empty is not model
    with pytest.raises(ConfigError, match="rank"):
        registry.create("adaptation", "lora-patch", rank=0)


def test_lora_patch_hisd_patches_linear_layers_too(registry):
    from tsdf_bench_plugins.adaptations.lora_patch import LoRALinear, lora_modules

    model, crops, attrs = _lora_setup(registry, "hisd", n=2)
    adaptation = registry.create("adaptation", "lora-patch", rank=2, batch_size=2, pgd_steps=1, init="lora")
    new = adaptation.adapt(model, crops, attrs, steps=1, seed=0)
    assert any(isinstance(m, LoRALinear) for m in lora_modules(new))
    no_linear = registry.create("adaptation", "lora-patch", linear=False).patch(model)
    assert not any(isinstance(m, LoRALinear) for m in lora_modules(no_linear))
    # init="lora" (B = 0): the untrained patch is the identity
    zero = registry.create("adaptation", "lora-patch", init="lora").patch(model)
    with torch.no_grad():
        assert torch.allclose(zero.generate_targets(crops, attrs), model.generate_targets(crops, attrs), atol=1e-5)
