"""AttGAN plugin: official layout and outputs, CMUA conditions, batching, objective."""
import numpy as np
import pytest
import torch

from official_refs import assert_matches, official_state_dict, reference, reference_input
from tsdf_bench import get_registry
from tsdf_bench.errors import ConfigError
from tsdf_bench_plugins.models.attgan import AttGAN


def test_paper_scale_matches_official_reference_outputs():
    model = get_registry().create("model", "attgan", scale="paper")
    model.load_official_state_dict(official_state_dict("attgan"), strict=True)
    assert sum(p.numel() for p in model.G.parameters()) == 43352707
    assert not model.training  # CMUA runs AttGAN in eval mode
    npz, _ = reference("attgan")
    x = reference_input()
    conds = model.conditions(torch.from_numpy(npz["att_a"]))
    np.testing.assert_array_equal(torch.stack(conds).numpy(), npz["c_all"])
    np.testing.assert_array_equal(conds[4].numpy(), npz["c"])
    with torch.no_grad():
        zs = model.G.encode(x)
        out = model.G.decode([z.repeat(2, 1, 1, 1) for z in zs],
                             torch.cat([torch.from_numpy(npz["c"]), torch.from_numpy(npz["c_recon"])]))
    assert_matches("attgan", "out", out[:2])
    assert_matches("attgan", "out_recon", out[2:])
    assert_matches("attgan", "bottleneck", zs[-1])
    assert_matches("attgan", "shortcut_feature", zs[3])
    assert torch.equal(model.encode(x[:1]), zs[-1][:1]) or torch.allclose(model.encode(x[:1]), zs[-1][:1], atol=1e-5)


def test_conditions_resolve_attribute_conflicts():
    model = AttGAN(scale="smoke")
    names = list(model.attributes)
    att = torch.zeros(1, 13)
    att[0, names.index("Black_Hair")] = 1
    att[0, names.index("No_Beard")] = 1
    conds = model.conditions(att)
    assert len(conds) == 14
    blond = conds[1 + names.index("Blond_Hair")][0]
    assert blond[names.index("Blond_Hair")] == 1.0 and blond[names.index("Black_Hair")] == -0.5
    mustache = conds[1 + names.index("Mustache")][0]
    assert mustache[names.index("No_Beard")] == -0.5
    with pytest.raises(ConfigError, match=r"\[B, 13\]"):
        model.conditions(torch.zeros(1, 5))


def test_generate_all_batches_and_losses_train():
    torch.manual_seed(0)
    model = AttGAN(scale="smoke")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    attrs = (torch.rand(2, 13) > 0.5).float()
    with torch.no_grad():
        out = model.generate_all(x, attrs)
        loop = torch.stack([model.generate(x, c) for c in model.conditions(attrs)], 1)
    assert out.shape == (2, 14, 3, 32, 32) and torch.allclose(out, loop, atol=1e-5)
    assert model.encode(x).shape == (2, 32, 4, 4)
    with pytest.raises(ConfigError, match="divisible"):
        model.generate(torch.zeros(1, 3, 30, 30), model.conditions(attrs[:1])[0])
    d = model.make_discriminator()
    model.train()
    terms = model.losses(d, x, attrs, part="d")
    assert set(terms) == {"d_adv", "d_gp", "d_att"}
    terms = model.losses(d, x, attrs, part="g")
    assert set(terms) == {"g_adv", "g_att", "g_rec"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.G.parameters())
