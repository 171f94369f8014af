"""AttentionGAN plugin: official layout and outputs, attention composition."""
import torch

from official_refs import assert_matches, official_state_dict, reference, reference_input
from tsdf_bench import get_registry
from tsdf_bench_plugins.models._blocks import set_instance_stats
from tsdf_bench_plugins.models.attentiongan import AttentionGAN


def test_paper_scale_matches_official_reference_outputs():
    model = get_registry().create("model", "attentiongan", scale="paper")
    model.load_official_state_dict(official_state_dict("attentiongan"), strict=True)
    assert sum(p.numel() for p in model.G.parameters()) == 8433664
    npz, _ = reference("attentiongan")
    x, c = reference_input(), torch.from_numpy(npz["c"])
    feats = {}
    model.G.main[8].register_forward_hook(lambda m, i, o: feats.__setitem__("encoder", o.clone()))
    model.G.main[14].register_forward_hook(lambda m, i, o: feats.__setitem__("bottleneck", o.clone()))
    with torch.no_grad():
        for stats, suffix in ((True, "_train_mode"), (False, "")):
            set_instance_stats(model.G, stats)
            out, attention, content = model.generate_parts(x, c)
            assert_matches("attentiongan", "out" + suffix, out)
            assert_matches("attentiongan", "attention" + suffix, attention)
            assert_matches("attentiongan", "content" + suffix, content)
            mode = "train_mode" if stats else "eval"
            assert_matches("attentiongan", f"encoder_{mode}", feats["encoder"][:1])
            assert_matches("attentiongan", f"bottleneck_{mode}", feats["bottleneck"][:1])


def test_output_is_attention_blend_of_content_and_input():
    torch.manual_seed(0)
    model = AttentionGAN(scale="smoke")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    c = torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1]])
    with torch.no_grad():
        out, a, content = model.generate_parts(x, c)
        raw = model.G(x, c)
    assert model.G.main[-1].out_channels == 4
    assert torch.allclose(a, torch.sigmoid(raw[:, :1])) and torch.allclose(content, raw[:, 1:])
    assert torch.allclose(out, content * a + x * (1 - a))
    # a saturated-closed attention returns the input unchanged
    with torch.no_grad():
        model.G.main[-1].weight.zero_()
        model.G.main[-1].weight[0].fill_(0)
    with torch.no_grad():
        out0, a0, _ = model.generate_parts(x, c)
    assert torch.allclose(out0, x * 0.5 + 0 * 0.5)  # sigmoid(0) = 0.5, content 0
    assert model.generate_all(x, (c > 0).float()).shape == (2, 5, 3, 32, 32)
