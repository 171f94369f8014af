"""The shared GAN trainer: determinism, resume, D warm-up, fine-tuning on a folder of images."""
import pytest
import torch

from tsdf_bench import get_registry
from tsdf_bench.errors import CheckpointError, ConfigError
from tsdf_bench.models import checkpoints
from tsdf_bench.models.training import TrainResult, train


def _data(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    return torch.rand(n, 3, s, s, generator=g) * 2 - 1, (torch.rand(n, len(model.attributes), generator=g) > 0.5).float()


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.state_dict().values() if p.is_floating_point()])


def test_same_seed_same_weights_and_history():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # global state must not matter
        model = get_registry().create("model", "stargan", scale="smoke")
        x, a = _data(model)
        torch.manual_seed(999)
        runs.append(train(model, x, a, 4, batch_size=3, n_critic=2, seed=5, progress=False))
    assert isinstance(runs[0], TrainResult) and runs[0].steps == 4
    assert torch.equal(_flat(runs[0].model), _flat(runs[1].model))
    assert runs[0].history == runs[1].history
    assert [r["part"] for r in runs[0].history] == ["d", "d", "g", "d", "d", "g"]
    assert not runs[0].model.training


def test_resume_gives_the_uninterrupted_result(tmp_path):
    reg = get_registry()
    torch.manual_seed(0)
    straight = reg.create("model", "attgan", scale="smoke")
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    x, a = _data(straight, n=5)
    r_full = train(straight, x, a, 6, batch_size=2, n_critic=2, seed=1, progress=False)
    resumed = reg.create("model", "attgan", scale="smoke")
    resumed.load_state_dict(init)
    train(resumed, x, a, 3, batch_size=2, n_critic=2, seed=1, progress=False, checkpoint_dir=tmp_path)
    again = reg.create("model", "attgan", scale="smoke")  # a fresh process would start like this
    r_res = train(again, x, a, 6, batch_size=2, n_critic=2, seed=1, progress=False, checkpoint_dir=tmp_path)
    assert torch.allclose(_flat(r_full.model), _flat(r_res.model), atol=1e-6)
    assert len(r_res.history) == len(r_full.history)
    with pytest.raises(CheckpointError, match="different training run"):
        train(reg.create("model", "attgan", scale="smoke"), x, a, 6, batch_size=2, n_critic=2, seed=2,
              progress=False, checkpoint_dir=tmp_path)


def test_warmup_trains_a_fresh_discriminator_with_g_frozen():
    model = get_registry().create("model", "attentiongan", scale="smoke")
    before = _flat(model).clone()
    x, a = _data(model)
    result = train(model, x, a, 0, warmup_d_steps=3, batch_size=3, progress=False)
    assert torch.equal(_flat(model), before)
    assert [r["part"] for r in result.history] == ["warmup"] * 3
    assert all(p.requires_grad for p in model.parameters())
    fresh = model.make_discriminator()
    assert not torch.equal(_flat(fresh), _flat(result.discriminator))


def test_bad_inputs_are_named():
    model = get_registry().create("model", "stargan", scale="smoke")
    x, a = _data(model)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        train(model, x * 3, a, 1, progress=False)
    with pytest.raises(ConfigError, match="5 attributes"):
        train(model, x, a[:, :3], 1, progress=False)
    with pytest.raises(ConfigError, match=r"\[N, 3, H, W\]"):
        train(model, x[:, :1], a, 1, progress=False)


@pytest.mark.parametrize("name", ["stargan", "attentiongan", "attgan"])
def test_finetune_on_an_image_folder_from_a_g_only_checkpoint(tmp_path, name):
    """The attacker's path: official-style G-only weights + images they collected."""
    from PIL import Image

    from tsdf_bench.data.folder import ImageFolderDataset

    reg = get_registry()
    model = reg.create("model", name, scale="smoke")
    folder = tmp_path / "faces"
    folder.mkdir()
    rows = ["filename," + ",".join(model.attributes)]
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"f{i}.png")
        rows.append(f"f{i}.png," + ",".join(str(int(v)) for v in torch.randint(0, 2, (len(model.attributes),), generator=g)))
    (folder / "attrs.csv").write_text("\n".join(rows) + "\n")
    faces = ImageFolderDataset(folder, image_size=40, attr_csv="attrs.csv", attrs=list(model.attributes)).faceset()
    g_only = tmp_path / "G.ckpt"
    torch.save(model.official_state_dict(), g_only)
    attacker = reg.create("model", name, scale="smoke", checkpoint=str(g_only))
    assert torch.equal(_flat(attacker), _flat(model))
    result = train(attacker, faces.images, faces.attrs, 2, warmup_d_steps=2, batch_size=4, n_critic=1,
                   progress=False)
    parts = [r["part"] for r in result.history]
    assert parts == ["warmup", "warmup", "d", "g", "d", "g"]
    assert not torch.equal(_flat(attacker), _flat(model))
    assert all(torch.isfinite(torch.tensor(v)) for r in result.history for k, v in r.items() if k not in ("step", "part"))
    # our own checkpoint keeps the discriminator for a later fine-tune
    path = tmp_path / "ours.pt"
    checkpoints.save_model(attacker, path, result.discriminator)
    assert checkpoints.load_discriminator(reg.create("model", name, scale="smoke"), path) is not None


def test_reconstruction_warmup_really_learns_faces():
    """Demo recipes start with a reconstruction warm-up; on real faces its loss must fall and G's
    outputs must follow the input (not a constant image), or demo training is broken."""
    from tsdf_bench.models.zoo import default_data

    faces = default_data("train", image_size=32)
    model = get_registry().create("model", "stargan", scale="smoke")
    attrs = faces.attrs[:, [faces.attr_names.index(n) for n in model.attributes]]
    x = faces.images[:64]
    with torch.no_grad():
        before = float((model.generate(x[:16], attrs[:16]) - x[:16]).abs().mean())
    result = train(model, x, attrs[:64], 0, recon_warmup_steps=60, recon_lr=2e-3, batch_size=8, progress=False)
    assert [r["part"] for r in result.history] == ["recon"] * 60 and result.steps == 0
    losses = [r["g_rec_id"] for r in result.history]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    with torch.no_grad():
        out = model.generate(x[:16], attrs[:16])
    assert float((out - x[:16]).abs().mean()) < 0.6 * before
    assert float(out.std(0).mean()) > 0.1  # different faces give different outputs


def test_recon_warmup_then_lazy_penalty_and_resume(tmp_path):
    model = get_registry().create("model", "attgan", scale="smoke")
    x, a = _data(model)
    result = train(model, x, a, 4, recon_warmup_steps=2, reg_every=2, n_critic=1, batch_size=3, progress=False)
    assert [r["part"] for r in result.history] == ["recon"] * 2 + ["d", "g"] * 4
    gps = [r["d_gp"] for r in result.history if r["part"] == "d"]
    assert gps[1] == 0.0 and gps[3] == 0.0 and gps[0] > 0 and gps[2] > 0  # penalty every 2nd D step
    with pytest.raises(ConfigError, match="recon_warmup_steps"):
        train(model, x, a, 1, recon_warmup_steps=-1, progress=False)
    # resume across the warm-up boundary gives the uninterrupted result
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    straight = train(model, x, a, 3, recon_warmup_steps=2, reg_every=2, n_critic=1, batch_size=3, seed=3,
                     progress=False)
    w_straight = _flat(straight.model).clone()
    model.load_state_dict(init)
    train(model, x, a, 0, recon_warmup_steps=2, reg_every=2, n_critic=1, batch_size=3, seed=3, progress=False,
          checkpoint_dir=tmp_path)
    other = get_registry().create("model", "attgan", scale="smoke")
    other.load_state_dict(init)
    resumed = train(other, x, a, 3, recon_warmup_steps=2, reg_every=2, n_critic=1, batch_size=3, seed=3,
                    progress=False, checkpoint_dir=tmp_path)
    assert torch.allclose(w_straight, _flat(resumed.model), atol=1e-6)


def test_param_groups_and_gradient_clipping_are_used():
    from tsdf_bench_plugins.models.hisd import HiSD

    torch.manual_seed(0)
    model = HiSD("smoke")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a = torch.tensor([[0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]]).float()
    mapper = torch.cat([p.detach().flatten() for p in model.mappers.parameters()]).clone()
    calls = []
    orig = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda params, norm, *k, **kw: calls.append(norm) or orig(params, norm, *k, **kw)
    try:
        train(model, x, a, 3, batch_size=4, progress=False, seed=1)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    assert calls and set(calls) == {model.grad_clip_norm}
    step = (torch.cat([p.detach().flatten() for p in model.mappers.parameters()]) - mapper).abs().max()
    assert 0 < float(step) < 1e-6 * 3 * 1.5  # mappers move, at lr/100 = 1e-6 (an Adam step is about lr)
