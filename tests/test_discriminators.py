"""Official discriminators (``[models.<name>] discriminator_checkpoint``): the official D layouts,
files saved the official way, the errors, and the retraining attacker starting from them.

``tests/data/official_discriminators.json`` holds the official D state_dict keys and shapes at
256 px (written from the official definitions; see its ``source``).  Files are built here in the
official formats at smoke scale (StarGAN/AttentionGAN: a bare ``200000-D.ckpt`` state_dict;
AttGAN: ``weights.199.pth`` = ``{"G", "D", "optim_G", "optim_D"}``), also as DataParallel saves.
"""
import json
from pathlib import Path

import pytest
import torch

from tsdf_bench import get_registry
from tsdf_bench.hashing import file_sha256
from tsdf_bench.errors import CheckpointError, ConfigError
from tsdf_bench.models import checkpoints

LAYOUTS = json.loads((Path(__file__).parent / "data" / "official_discriminators.json").read_text())
NAMES = ("stargan", "attentiongan", "attgan")


def _model(name, scale="smoke"):
    return get_registry().create("model", name, scale=scale)


def _to_official(name, key):
    """Our D key as the official code names it (the inverse of ``discriminator_key_from_official``)."""
    if name == "attgan":
        head, _, rest = key.partition(".")
        if head in ("fc_adv", "fc_cls"):
            index, _, tail = rest.partition(".")
            return f"{head}.{int(index) // 2}.layers.0.{tail}"
    return key


def _official_d_state(name, model, seed=0):
    torch.manual_seed(seed)
    d = model.make_discriminator()
    return d, {_to_official(name, k): v.clone() for k, v in d.state_dict().items()}


def _write(name, model, path, seed=0, dataparallel=False):
    """An official-format D file for ``model``; returns our D with the same weights."""
    d, state = _official_d_state(name, model, seed)
    if dataparallel:
        state = {f"module.{k}": v for k, v in state.items()}
    if name == "attgan":  # AttGAN.save: G, D and both optimisers in one file
        g = model.official_state_dict()
        if dataparallel:
            g = {f"module.{k}": v for k, v in g.items()}
        torch.save({"G": g, "D": state, "optim_G": {}, "optim_D": {}}, path)
    else:
        torch.save(state, path)
    return d


@pytest.mark.parametrize("name", NAMES)
def test_paper_scale_discriminator_has_the_official_layout(name):
    with torch.device("meta"):
        model = _model(name, "paper")
        ours = {k: list(v.shape) for k, v in model.make_discriminator().state_dict().items()}
    rename = getattr(model, "discriminator_key_from_official", lambda k: k)
    official = {rename(k): shape for k, shape in LAYOUTS["state_dict"][name]}
    assert official == ours
    # and our inverse (used below to write official files) gives the official names back
    assert sorted(_to_official(name, k) for k in ours) == sorted(k for k, _ in LAYOUTS["state_dict"][name])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dataparallel", [False, True])
def test_official_format_files_load_strictly(tmp_path, name, dataparallel):
    model = _model(name)
    path = tmp_path / ("weights.199.pth" if name == "attgan" else "200000-D.ckpt")
    expected = _write(name, model, path, seed=3, dataparallel=dataparallel)
    d = checkpoints.load_official_discriminator(model, path)
    assert not d.training
    got, want = d.state_dict(), expected.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(d(x), expected.eval()(x)))


def test_wrong_files_name_the_problem(tmp_path):
    star = _model("stargan")
    g_file = tmp_path / "200000-G.ckpt"
    torch.save(star.official_state_dict(), g_file)
    with pytest.raises(CheckpointError, match="generator's file"):
        checkpoints.load_official_discriminator(star, g_file)
    d_file = tmp_path / "200000-D.ckpt"
    _write("stargan", star, d_file)
    with pytest.raises(CheckpointError, match=r"discriminator of attgan.*missing key"):
        checkpoints.load_official_discriminator(_model("attgan"), d_file)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load_official_discriminator(star, tmp_path / "nope.ckpt")
    torch.save({"G": star.official_state_dict()}, tmp_path / "g_only.pth")  # an AttGAN saveG file
    with pytest.raises(CheckpointError, match="not a discriminator checkpoint|does not fit"):
        checkpoints.load_official_discriminator(_model("attgan"), tmp_path / "g_only.pth")


def test_model_options_pops_the_discriminator_and_needs_a_checkpoint(tmp_path):
    opts = {"checkpoint": "g.ckpt", "discriminator_checkpoint": "d.ckpt"}
    assert checkpoints.model_options("stargan", "paper", opts) == ({"checkpoint": "g.ckpt"}, False)
    assert checkpoints.discriminator_path(opts) == "d.ckpt"
    assert checkpoints.discriminator_path({"checkpoint": "g.ckpt"}) is None
    with pytest.raises(ConfigError, match="goes with the generator's checkpoint"):
        checkpoints.model_options("stargan", "paper", {"random_init": True, "discriminator_checkpoint": "d.ckpt"})


RUN = """
[run]
name = "d"
scale = "smoke"
seeds = [0]
device = "cpu"
rounds = 1

[data]
source = "synthetic"
image_size = 32
n_train_defense = 2
n_collect = 4
n_eval = 2
batch_size = 4

[models]
names = ["stargan"]

[models.stargan]
checkpoint = "G_PATH"
D_LINE

[defenses]
names = ["fake-shift"]

[detectors]
names = ["fake-det"]
attacker = "fake-det"

[adaptations]
names = ["retrain"]
g_steps = 2

[adaptations.retrain]
batch_size = 2
n_critic = 1
warmup_d_steps = 3

[metrics]
names = ["fake-metric"]
"""


def _run(tmp_path, d_line, monkeypatch):
    from tsdf_bench.config import load_config
    from tsdf_bench.harness import run_config
    from tsdf_bench.harness.attacker import Attacker
    from tsdf_bench.plugins import Registry

    model = _model("stargan")
    g_path = tmp_path / "200000-G.ckpt"
    torch.save(model.official_state_dict(), g_path)
    expected = _write("stargan", model, tmp_path / "200000-D.ckpt", seed=5)
    seen = []
    original = Attacker.retrain

    def spy(self, model, collection, adaptation, *, seed, k, discriminator=None):
        seen.append(None if discriminator is None else {k_: v.clone() for k_, v in discriminator.state_dict().items()})
        return original(self, model, collection, adaptation, seed=seed, k=k, discriminator=discriminator)

    monkeypatch.setattr(Attacker, "retrain", spy)
    cfg_path = tmp_path / "d.toml"
    cfg_path.write_text(RUN.replace("G_PATH", str(g_path)).replace("D_LINE", d_line))
    reg = Registry(plugins_dirs=[Path(__file__).parent / "harness_fakes"])
    out = run_config(load_config(cfg_path), reg, output=tmp_path / "runs", progress=False, log=lambda m: None,
                     figures=False)
    assert [r["status"] for r in out.rows] == ["ok", "ok"], [r.get("error") for r in out.rows]
    return out.rows, seen, expected


def test_the_retraining_attacker_starts_from_the_official_discriminator(tmp_path, monkeypatch):
    d_path = tmp_path / "200000-D.ckpt"
    rows, seen, expected = _run(tmp_path, f'discriminator_checkpoint = "{d_path}"', monkeypatch)
    record = f"official {d_path.resolve()} {file_sha256(d_path)}"
    assert [r["discriminator"] for r in rows] == [record, record]
    # the retraining and its clean control both start from the official D, with no warm-up
    assert len(seen) == 2 and all(s is not None for s in seen)
    assert all(torch.equal(s[k], v) for s in seen for k, v in expected.state_dict().items())
    r1 = next(r for r in rows if r["round"] == 1)
    assert r1["adaptation_info"]["warmup_d_steps"] == 0 and r1["d_steps"] == 2


def test_without_it_a_fresh_discriminator_is_warmed_up_and_recorded(tmp_path, monkeypatch):
    rows, seen, _ = _run(tmp_path, "", monkeypatch)
    assert [r["discriminator"] for r in rows] == ["fresh, warm-up 3 D steps"] * 2
    assert seen == [None, None]
    r1 = next(r for r in rows if r["round"] == 1)
    assert r1["adaptation_info"]["warmup_d_steps"] == 3


def test_preflight_loads_and_hashes_the_discriminator(tmp_path):
    from test_preflight import CONFIG

    from tsdf_bench.config import load_config
    from tsdf_bench.harness.preflight import preflight

    reg = get_registry()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    star = _model("stargan")
    torch.save(star.official_state_dict(), ckpt / "200000-G.ckpt")
    _write("stargan", star, ckpt / "200000-D.ckpt")
    text = (CONFIG.format(output=tmp_path / "runs").replace('names = ["stargan", "hisd"]', 'names = ["stargan"]')
            .replace('[models.hisd]\ncheckpoint = "ckpt/gen.pt"\nreference = "ckpt/reference_glasses_2.jpg"\n', '')
            .replace('checkpoint = "ckpt/200000-G.ckpt"',
                     'checkpoint = "ckpt/200000-G.ckpt"\ndiscriminator_checkpoint = "ckpt/200000-D.ckpt"'))
    path = tmp_path / "pre.toml"
    path.write_text(text)
    report = preflight(load_config(path), reg)
    check = next(c for c in report.checks if c.kind == "model" and c.name == "stargan")
    assert check.status == "ok", report.table()
    assert check.info["discriminator"]["sha256"] == file_sha256(ckpt / "200000-D.ckpt")
    assert "discriminator 200000-D.ckpt loaded strictly" in check.detail
    # the generator's file given as the discriminator is a hard error naming it
    path.write_text(text.replace('discriminator_checkpoint = "ckpt/200000-D.ckpt"',
                                 'discriminator_checkpoint = "ckpt/200000-G.ckpt"'))
    report = preflight(load_config(path), reg)
    assert [c.name for c in report.errors] == ["stargan"] and "generator's file" in report.errors[0].detail
