"""StarGAN plugin: official layout and outputs, protocol targets, batching, objective."""
import pytest
import torch

from official_refs import assert_matches, official_state_dict, reference, reference_input
from tsdf_bench import get_registry
from tsdf_bench.errors import ConfigError
from tsdf_bench_plugins.models._blocks import set_instance_stats
from tsdf_bench_plugins.models.stargan import StarGAN


def test_paper_scale_matches_official_reference_outputs():
    model = get_registry().create("model", "stargan", scale="paper")
    model.load_official_state_dict(official_state_dict("stargan"), strict=True)
    assert sum(p.numel() for p in model.G.parameters()) == 8430528
    npz, _ = reference("stargan")
    x, c = reference_input(), torch.from_numpy(npz["c"])
    feats = {}
    model.G.main[8].register_forward_hook(lambda m, i, o: feats.__setitem__("encoder", o.clone()))
    model.G.main[14].register_forward_hook(lambda m, i, o: feats.__setitem__("bottleneck", o.clone()))
    with torch.no_grad():
        assert_matches("stargan", "out_train_mode", model.generate(x, c))  # default: CMUA's per-image stats
        assert_matches("stargan", "encoder_train_mode", feats["encoder"][:1])
        assert_matches("stargan", "bottleneck_train_mode", feats["bottleneck"][:1])
        assert torch.allclose(model.encode(x[:1], c[:1]), feats["bottleneck"][:1], atol=1e-5)
        set_instance_stats(model.G, False)  # official eval(): running statistics
        assert_matches("stargan", "out", model.generate(x, c))
        assert_matches("stargan", "encoder_eval", feats["encoder"][:1])
        assert_matches("stargan", "bottleneck_eval", feats["bottleneck"][:1])


def test_conditions_follow_create_labels():
    model = StarGAN(scale="smoke")
    attrs = torch.tensor([[1., 0, 0, 1, 0], [0, 0, 1, 0, 1]])
    conds = model.conditions(attrs)
    assert len(conds) == 5
    assert conds[1].tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 0, 1]]  # blond: hair one-hot
    assert conds[3].tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 1, 1]]  # male flipped
    assert conds[4].tolist() == [[1, 0, 0, 1, 1], [0, 0, 1, 0, 0]]  # young flipped
    with pytest.raises(ConfigError, match=r"attrs \[B, 5\]"):
        model.conditions(torch.zeros(2, 13))


def test_generate_all_is_one_batched_forward_equal_to_the_loop():
    torch.manual_seed(0)
    model = StarGAN(scale="smoke")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    attrs = (torch.rand(3, 5) > 0.5).float()
    calls = []
    model.G.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        out = model.generate_all(x, attrs)
    assert calls == [15] and out.shape == (3, 5, 3, 32, 32)
    with torch.no_grad():
        loop = torch.stack([model.generate(x, c) for c in model.conditions(attrs)], 1)
    assert torch.allclose(out, loop, atol=1e-5)
    assert out.abs().max() <= 1
    assert model.encode(x).shape == (3, 32, 8, 8)


def _smoke_batch():
    """A seeded smoke StarGAN, its discriminator, 4 images and random attributes."""
    torch.manual_seed(0)
    model = StarGAN(scale="smoke")
    d = model.make_discriminator()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    return model, d, x, (torch.rand(4, 5) > 0.5).float()


def test_losses_have_the_official_terms_and_train_both_nets():
    model, d, x, attrs = _smoke_batch()
    d_terms = model.losses(d, x, attrs, part="d")
    assert set(d_terms) == {"d_real", "d_fake", "d_cls", "d_gp"}
    sum(d_terms.values()).backward()
    assert all(p.grad is None for p in model.parameters())  # D step does not reach G
    assert all(p.grad is not None for p in d.parameters())
    g_terms = model.losses(d, x, attrs, part="g")
    assert set(g_terms) == {"g_fake", "g_cls", "g_rec"}
    sum(g_terms.values()).backward()
    assert all(p.grad is not None for p in model.G.parameters())
    with pytest.raises(ConfigError):
        model.losses(d, x, attrs, part="x")


def test_unknown_scale_and_option_are_named():
    with pytest.raises(ConfigError, match="valid scales"):
        StarGAN(scale="huge")
    with pytest.raises(ConfigError, match="conv_dims"):
        StarGAN(scale="smoke", conv_dims=3)


def test_demo_upsamples_with_nearest_and_conv_paper_keeps_transposed_convs():
    from torch import nn

    def kinds(model):
        return [type(m).__name__ for m in model.G.main]

    demo, paper = StarGAN(scale="demo"), StarGAN(scale="paper")
    assert kinds(paper).count("ConvTranspose2d") == 2 and not any(isinstance(m, nn.Upsample) for m in paper.modules())
    ups = [m for m in demo.G.main if isinstance(m, nn.Sequential)]
    assert len(ups) == 2 and all(isinstance(u[0], nn.Upsample) and isinstance(u[1], nn.Conv2d) for u in ups)
    assert "ConvTranspose2d" not in kinds(demo)
    with torch.no_grad():
        assert demo.generate(torch.zeros(1, 3, 64, 64), torch.zeros(1, 5)).shape == (1, 3, 64, 64)


def test_reconstruction_term_and_lazy_gradient_penalty():
    model, d, x, attrs = _smoke_batch()
    rec = model.reconstruction_loss(x, attrs)
    expected = model.lambda_rec * (model.generate(x, attrs) - x).abs().mean()
    assert set(rec) == {"g_rec_id"} and torch.allclose(rec["g_rec_id"], expected)
    assert float(model.losses(d, x, attrs, part="d", reg_scale=0.0)["d_gp"]) == 0.0
    torch.manual_seed(3)
    one = model.losses(d, x, attrs, part="d")["d_gp"]
    torch.manual_seed(3)
    four = model.losses(d, x, attrs, part="d", reg_scale=4.0)["d_gp"]
    assert float(one.detach()) > 0 and torch.allclose(four, 4 * one)
