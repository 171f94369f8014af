"""Tests of the HiSD model plugin (plugins/tsdf_bench_plugins/models/hisd.py)."""
import numpy as np
import pytest
import torch

from official_refs import hisd_reference_image, layout, official_state_dict, reference, reference_input
from tsdf_bench.errors import CheckpointError, ConfigError
from tsdf_bench_plugins.models.hisd import HiSD, HiSDDiscriminator


@pytest.fixture(scope="module")
def official():
    """The paper-scale model with the layout's deterministic weights, run on the documented inputs."""
    model = HiSD("paper")
    model.load_state_dict(official_state_dict("hisd"), strict=True)
    model.eval()
    x, ref = reference_input(), hisd_reference_image()
    ref_npz, meta = reference("hisd")
    tag = meta["tag"]
    with torch.no_grad():
        e = model.encode(x)
        s = model.extract(ref, tag)
        e_trg = model.translate(e, s, tag)
        out = model.decode(e_trg)
        out_no_translate = model.decode(model.encode(x))
    # the stored e / e_trg are of the first image only ([1, 256, 64, 64])
    got = {"e": e[:1], "e_trg": e_trg[:1], "style": s, "out": out, "out_no_translate": out_no_translate,
           "c": torch.tensor([float(tag)])}
    return model, got, meta, ref_npz, x, ref


def test_paper_layout_matches_official_keys_and_count():
    spec = layout("hisd")
    sd = HiSD("paper").state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, s) for k, s, _ in spec["state_dict"]]
    assert sum(v.numel() for v in sd.values()) == spec["num_params"]


def test_paper_outputs_match_official_reference(official):
    _, got, meta, ref_npz, _, _ = official
    checked = []
    for name, info in meta["tensors"].items():
        value = got[name].double().numpy()
        assert list(value.shape) == info["shape"], name
        if info["stored"] == "full":
            expected = ref_npz[name]
            if name == "style":  # about 1e-6 with these weights: relative tolerance
                np.testing.assert_allclose(value, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
            else:
                np.testing.assert_allclose(value, expected, rtol=0, atol=1e-4)
        else:
            flat = value.reshape(-1)
            np.testing.assert_allclose(flat[ref_npz[name + "__idx"]], ref_npz[name + "__val"], rtol=0, atol=1e-4,
                                       err_msg=name)
            # sums over up to 1M float32 values: allow accumulated rounding (1e-7 of the magnitude)
            tol = 1e-4 + 1e-7 * info["abs_sum"]
            assert abs(flat.sum() - info["sum"]) < tol, (name, flat.sum(), info["sum"])
            assert abs(np.abs(flat).sum() - info["abs_sum"]) < tol, (name, np.abs(flat).sum(), info["abs_sum"])
        checked.append(name)
    assert set(checked) == {"c", "style", "out", "out_no_translate", "e", "e_trg"}


def test_paper_conditions_use_the_reference(official):
    model, got, _, _, _, ref = official
    model.set_reference(ref)
    cond = model.conditions(torch.zeros(2, len(model.attributes)))
    assert len(cond) == 1 and cond[0].shape == (2, 256)
    style = got["style"]
    torch.testing.assert_close(cond[0], style.expand(2, -1), atol=1e-3 * float(style.abs().max()), rtol=1e-3)
    model.set_reference(None)


def test_generate_is_the_protocol_glasses_edit():
    torch.manual_seed(0)
    model = HiSD("smoke")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = torch.rand(1, 3, 32, 32) * 2 - 1
    model.set_reference(ref)
    with torch.no_grad():
        expected = model.decode(model.translate(model.encode(x), model.extract(ref, 1), 1))
        out = model.generate(x, model.conditions(torch.zeros(2, 7))[0])
    torch.testing.assert_close(out, expected)


def test_official_checkpoint_file_loads_from_gen_test(tmp_path, official):
    model = official[0]
    sd = model.state_dict()
    path = tmp_path / "gen_00600000.pt"
    torch.save({"gen": {k: torch.zeros_like(v) for k, v in sd.items()}, "gen_test": sd}, path)
    loaded = HiSD("paper", checkpoint=path)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_checkpoint_names_keys_and_fix(tmp_path):
    smoke = HiSD("smoke")
    path = tmp_path / "smoke.pt"
    torch.save({"gen_test": smoke.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        HiSD("demo", checkpoint=path)
    msg = str(err.value)
    assert "shape mismatch" in msg and "encoder.0.weight" in msg and "scale='smoke'" in msg

    sd = dict(smoke.state_dict())
    sd.pop("decoder.2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        HiSD("smoke", checkpoint=path)
    msg = str(err.value)
    assert "1 missing key(s): decoder.2.bias" in msg and "1 unexpected key(s): extra.weight" in msg and "Fix:" in msg

    torch.save({"dis": smoke.state_dict()}, path)  # a discriminator file, not a generator
    with pytest.raises(CheckpointError, match="gen_test"):
        HiSD("smoke", checkpoint=path)
    with pytest.raises(CheckpointError, match="does not exist"):
        HiSD("smoke", checkpoint=tmp_path / "missing.pt")


def test_bare_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = HiSD("smoke")
    path = tmp_path / "bare.pt"
    torch.save(a.state_dict(), path)
    b = HiSD("smoke", checkpoint=path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(b.encode(x), a.encode(x))


def test_unknown_scale():
    with pytest.raises(ConfigError, match="paper, demo, smoke"):
        HiSD("huge")


def test_smoke_shapes_and_input_gradients():
    torch.manual_seed(0)
    model = HiSD("smoke")
    x = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True)
    attrs = torch.zeros(3, len(model.attributes))
    conds = model.conditions(attrs)
    assert len(conds) == 1 and conds[0].shape == (3, model.style_dim)
    out = model.generate(x, conds[0])
    assert out.shape == x.shape
    assert model.generate_all(x, attrs).shape == (3, 1, 3, 32, 32)
    feat = model.encode(x)
    assert feat.shape == (3, 32, 8, 8)
    (out.abs().mean() + feat.abs().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"style code \[B, 16\]"):
        model.generate(x, torch.zeros(3, 5))


def test_reference_sets_the_style_and_is_not_in_state_dict():
    torch.manual_seed(0)
    model = HiSD("smoke")
    default = model.conditions(torch.zeros(1, 7))[0]
    torch.testing.assert_close(default, model.conditions(torch.zeros(1, 7))[0])  # deterministic
    ref = torch.rand(1, 3, 64, 64) * 2 - 1  # resized to 32 px
    model.set_reference(ref)
    assert model.reference.shape == (1, 3, 32, 32)
    with torch.no_grad():
        expected = model.extract(model.reference, 1)
    torch.testing.assert_close(model.conditions(torch.zeros(2, 7))[0], expected.expand(2, -1))
    assert not torch.allclose(expected, default)
    assert "reference" not in model.state_dict()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.set_reference(ref * 3)
    with pytest.raises(ValueError, match="one RGB image"):
        model.set_reference(torch.zeros(2, 3, 32, 32))
    model.set_reference(None)
    torch.testing.assert_close(model.conditions(torch.zeros(1, 7))[0], default)


def _labels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    attrs = (torch.rand(n, 7, generator=g) < 0.5).float()
    attrs[:, 2:5] = 0
    attrs[torch.arange(n), torch.randint(0, 3, (n,), generator=g) + 2] = 1  # one hair colour each
    return attrs


@pytest.mark.parametrize("part", ["d", "g"])
def test_losses_are_finite_and_reach_the_right_parameters(part):
    torch.manual_seed(0)
    model = HiSD("smoke")
    disc = model.make_discriminator()
    assert isinstance(disc, HiSDDiscriminator)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    attrs = _labels(4)
    for tag in range(3):
        terms = model.losses(disc, x, attrs, part, tag=tag)
        expected = {"d_adv_real", "d_r1", "d_adv_fake_trg", "d_adv_fake_cyc"} if part == "d" else {"g_adv", "g_sty", "g_rec"}
        assert set(terms) == expected
        assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
        model.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        g_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("mappers.")]
        d_grads = [p.grad for p in disc.parameters()]
        if part == "d":
            assert all(g is None for g in g_grads)
            assert sum(float(g.abs().sum()) for g in d_grads if g is not None) > 0
        else:
            assert all(g is None for g in d_grads)  # D frozen while the G graph is built
            assert all(p.requires_grad for p in disc.parameters())  # ... and restored afterwards
            assert model.encoder[0].weight.grad.abs().sum() > 0
            assert model.extractors.model[0].weight.grad.abs().sum() > 0
            assert model.mappers[tag].pre_model[0].weight.grad.abs().sum() > 0  # style loss reaches M_tag
    seen = set()
    for seed in range(20):  # the default draws every tag
        torch.manual_seed(seed)
        seen.add(model._sample_task(x, attrs)[0])
    assert seen == {0, 1, 2}


def test_hair_colour_tag_uses_only_labelled_samples():
    model = HiSD("smoke")
    attrs = torch.zeros(4, 7)
    attrs[0, 2:4] = 1  # two hair colours: not labelled for HairColor
    j, valid = model._labels(attrs, 2)
    assert valid.tolist() == [False, False, False, False]
    attrs[1, 4] = 1
    j, valid = model._labels(attrs, 2)
    assert valid.tolist() == [False, True, False, False] and int(j[1]) == 2
    j, _ = model._labels(attrs, 1)
    assert j.tolist() == [1, 1, 1, 1]  # no glasses -> attribute 'without'
    with pytest.raises(ValueError, match="attrs must be"):
        model.losses(model.make_discriminator(), torch.zeros(4, 3, 32, 32), torch.zeros(4, 5), "g")
    with pytest.raises(ValueError, match="part must be"):
        model.losses(model.make_discriminator(), torch.zeros(4, 3, 32, 32), attrs, "x")


def test_demo_trains_and_edits_hair_colour():
    """Demo data has one identity with glasses, so the demo edit is HairColor -> blond (module doc)."""
    model = HiSD("demo")
    assert model.image_size == 64 and model.style_dim == 64 and model.noise_dim == 16
    assert model.edit_tag == 2 and HiSD("smoke").edit_tag == 1 and HiSD("paper").edit_tag == 1
    attrs = _labels(4)
    x = torch.zeros(4, 3, 64, 64)
    assert {model._sample_task(x, attrs)[0] for _ in range(10)} == {2}
    (k, i, wanted), = model.edit_targets(attrs)
    assert k == 0 and model.attributes[i] == "Blond_Hair" and wanted.tolist() == [1.0] * 4
    with torch.no_grad():
        z = torch.randn(1, model.noise_dim, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.conditions(attrs)[0][:1], model.map(z, 2, 1))
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        s = model.conditions(attrs[:2])[0]
        torch.testing.assert_close(model.generate(x, s), model.decode(model.translate(model.encode(x), s, 2)))
    attrs[:, 2:5] = 0
    with pytest.raises(ValueError, match="HairColor"):
        model.losses(model.make_discriminator(), torch.zeros(4, 3, 64, 64), attrs, "d", tag=2)


def test_reconstruction_warmup_term_and_lazy_r1():
    torch.manual_seed(0)
    model = HiSD("smoke")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = model.reconstruction_loss(x, _labels(2))
    assert set(terms) == {"g_rec_id"} and terms["g_rec_id"] > 0
    disc = model.make_discriminator()
    assert float(model.losses(disc, x, _labels(2), "d", tag=1, reg_scale=0.0)["d_r1"]) == 0.0
    torch.manual_seed(1)
    once = model.losses(disc, x, _labels(2), "d", tag=1)["d_r1"]
    torch.manual_seed(1)
    twice = model.losses(disc, x, _labels(2), "d", tag=1, reg_scale=2.0)["d_r1"]
    torch.testing.assert_close(twice, 2 * once)


def test_optimizer_settings_follow_the_official_config():
    model = HiSD("smoke")
    groups = model.optimizer_param_groups(1e-4)
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1e-6)
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_all
    assert model.train_defaults["betas"] == (0.0, 0.99) and model.train_defaults["n_critic"] == 1
    mapper_ids = {id(p) for p in model.mappers.parameters()}
    assert not any(id(p) in mapper_ids for p in model.generator_parameters())


def test_shared_trainer_runs_a_few_steps():
    training = pytest.importorskip("tsdf_bench.models.training")
    torch.manual_seed(0)
    model = HiSD("smoke")
    before = model.encoder[0].weight.detach().clone()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    result = training.train(model, images, _labels(8), steps=2, batch_size=4, progress=False)
    parts = [row["part"] for row in result.history]
    assert parts == ["d", "g", "d", "g"]
    assert all(np.isfinite(v) for row in result.history for k, v in row.items() if k not in ("step", "part"))
    assert not torch.equal(before, model.encoder[0].weight)


def test_demo_translator_starts_as_the_identity():
    """Demo only: T(e, s) = e at initialisation, so the edit grows out of a plain reconstruction
    (module doc); the paper and smoke scales keep the official random initialisation."""
    torch.manual_seed(0)
    model = HiSD("demo")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        e = model.encode(x)
        s = model.conditions(_labels(2))[0]
        torch.testing.assert_close(model.translate(e, s, model.edit_tag), e, atol=1e-5, rtol=1e-5)
        smoke = HiSD("smoke")
        e = smoke.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert (smoke.translate(e, smoke.conditions(torch.zeros(2, len(smoke.attributes)))[0], 1) - e).abs().max() > 1e-2


def test_demo_generator_losses_leave_the_model_copyable():
    """The attacker's retraining deep-copies the trained model: the demo's content-change term must
    not leave a graph tensor on the module (it did, and every HiSD retraining round failed)."""
    import copy

    torch.manual_seed(0)
    model = HiSD("demo")
    terms = model.losses(model.make_discriminator(), torch.rand(4, 3, 64, 64) * 2 - 1, _labels(4), "g", tag=2)
    assert terms["g_trans_l1"].requires_grad
    sum(terms.values()).backward()
    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))


def test_reference_image_file_gives_the_reference_guided_style(tmp_path):
    """``reference = "path"``: the style is F(reference image) read as the official test script
    reads it (Resize to the model size, [-1, 1]), not the latent-guided default."""
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "reference_glasses_2.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    torch.manual_seed(0)
    model = HiSD("smoke", reference=str(path))
    arr = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    expected_ref = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1
    torch.testing.assert_close(model.reference, expected_ref)
    with torch.no_grad():
        style = model.extract(expected_ref, 1)
    torch.testing.assert_close(model.conditions(torch.zeros(2, 7))[0], style.expand(2, -1))
    assert model.reference_source["path"] == str(path.resolve()) and len(model.reference_source["sha256"]) == 64
    latent = HiSD("smoke")
    latent.load_state_dict(model.state_dict())
    assert not torch.allclose(latent.conditions(torch.zeros(1, 7))[0], style)
    with pytest.raises(ConfigError, match="reference image .* does not exist"):
        HiSD("smoke", reference=str(tmp_path / "missing.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot be used"):
        HiSD("smoke", reference=tmp_path / "bad.jpg")


def test_demo_decoder_upsamples_bilinearly_with_the_official_parameters(monkeypatch):
    """The demo decoder's bilinear up-sampling (nearest rendered translated features as a 4-px
    checkerboard; docs/model-card.md) adds no parameter: the same keys and shapes as the official
    nearest layout, which the other scales keep."""
    from tsdf_bench_plugins.models import hisd
    from tsdf_bench_plugins.models._hisd_blocks import UpBlock

    demo = HiSD("demo")
    assert {m.mode for m in demo.modules() if isinstance(m, UpBlock)} == {"bilinear"}
    assert {m.mode for m in HiSD("smoke").modules() if isinstance(m, UpBlock)} == {"nearest"}
    monkeypatch.setitem(hisd.CONFIGS, "demo", {**hisd.CONFIGS["demo"], "decoder_upsample": "nearest"})
    nearest = HiSD("demo")
    assert {k: v.shape for k, v in demo.state_dict().items()} == {k: v.shape for k, v in nearest.state_dict().items()}
    nearest.load_state_dict(demo.state_dict())  # the same weights: only the up-sampling differs
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        e = demo.encoder(x)
        assert torch.equal(e, nearest.encoder(x)) and not torch.allclose(demo.decoder(e), nearest.decoder(e))
