"""Strict official-checkpoint loading, our checkpoint files, manifests and the model zoo cache."""
import json

import pytest
import torch

from tsdf_bench import get_registry
from tsdf_bench.hashing import file_sha256
from tsdf_bench.errors import CheckpointError, ConfigError
from tsdf_bench.models import checkpoints, zoo


class Evil:
    """A pickled object: ``torch.load(weights_only=True)`` must refuse it."""


def _model(name, scale="smoke"):
    return get_registry().create("model", name, scale=scale)


def test_official_formats_load_strictly(tmp_path):
    src = _model("stargan")
    bare = tmp_path / "200000-G.ckpt"
    torch.save(src.official_state_dict(), bare)
    loaded = get_registry().create("model", "stargan", scale="smoke", checkpoint=str(bare))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    att = _model("attgan")
    full = tmp_path / "weights.199.pth"
    torch.save({"G": att.official_state_dict(), "D": att.make_discriminator().state_dict(),
                "optim_G": {}, "optim_D": {}}, full)
    for path in (full,):
        loaded = get_registry().create("model", "attgan", scale="smoke", checkpoint=str(path))
        assert torch.equal(loaded.G.dec_layers[-1].layers[0].weight, att.G.dec_layers[-1].layers[0].weight)
    torch.save(att.official_state_dict(), tmp_path / "bare_attgan.pth")
    get_registry().create("model", "attgan", scale="smoke", checkpoint=str(tmp_path / "bare_attgan.pth"))


def test_wrong_model_or_scale_names_the_keys_and_the_fix(tmp_path):
    path = tmp_path / "attgan.pth"
    torch.save(_model("attgan").official_state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        get_registry().create("model", "stargan", scale="smoke", checkpoint=str(path))
    msg = str(err.value)
    assert "missing key(s): main.0.weight" in msg and "unexpected key(s): enc_layers.0" in msg
    assert "Fix:" in msg and "scale 'paper'" in msg
    torch.save(_model("attentiongan").official_state_dict(), path)
    with pytest.raises(CheckpointError, match=r"1 shape mismatch\(es\): main\.\d+\.weight: found \(4, 8, 7, 7\)"):
        get_registry().create("model", "stargan", scale="smoke", checkpoint=str(path))
    torch.save(_model("stargan", "demo").official_state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        get_registry().create("model", "stargan", scale="smoke", checkpoint=str(path))


def test_missing_unsafe_or_corrupt_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load_model_checkpoint(_model("stargan"), tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read safely"):
        checkpoints.load_model_checkpoint(_model("stargan"), tmp_path / "junk.ckpt")
    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="no pickled objects"):
        checkpoints.load_model_checkpoint(_model("stargan"), tmp_path / "evil.ckpt")


def test_our_checkpoint_roundtrip_and_manifest(tmp_path):
    model = _model("attentiongan")
    path = tmp_path / "m.pt"
    info = checkpoints.save_model(model, path, model.make_discriminator(), manifest={"seed": 3})
    manifest = json.loads((tmp_path / "m.pt.json").read_text())
    assert manifest["sha256"] == file_sha256(path) == info["sha256"]
    assert manifest["seed"] == 3 and manifest["versions"]["torch"] and manifest["config"]["conv_dim"] == 8
    other = _model("attentiongan")
    checkpoints.load_model_checkpoint(other, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds 'attentiongan' at scale 'smoke'"):
        checkpoints.load_model_checkpoint(_model("stargan"), path)


def test_zoo_trains_once_then_loads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    names = ["Young", "Male", "Blond_Hair", "Extra", "Brown_Hair", "Black_Hair"]
    data = (torch.rand(6, 3, 48, 48, generator=g) * 2 - 1, (torch.rand(6, 6, generator=g) > 0.5).float(), names)
    first = zoo.get_model("stargan", scale="smoke", train_data=data, progress=False, grid=False)
    path = zoo.model_path("stargan", "smoke")
    manifest = checkpoints.read_manifest(path)
    assert manifest["steps"] == zoo.SMOKE_RECIPE["steps"] and manifest["seed"] == 0 and manifest["data_hash"]
    monkeypatch.setattr(zoo, "train", lambda *a, **k: pytest.fail("cached model was retrained"))
    second = zoo.get_model("stargan", scale="smoke", train_data=data, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    grid = zoo.save_edit_grid(second, data[0][:2, :, :32, :32], torch.zeros(2, 5), tmp_path / "g.png")
    from PIL import Image

    assert Image.open(grid).size == (6 * 34 + 2, 2 * 34 + 2)
    report = zoo.edit_report(second, checkpoints.load_discriminator(second, path), data[0][:, :, :32, :32],
                             torch.zeros(6, 5))
    assert len(report["per_target"]) == 5 and 0 <= report["cls_acc_edited"] <= 1


def _wrap(name, state):
    """An official-format file body for ``name``: AttGAN ``{"G": ...}``, HiSD ``{"gen_test": ...}``, else bare."""
    return {"attgan": lambda s: {"G": s, "D": {}}, "hisd": lambda s: {"gen_test": s}}.get(name, lambda s: s)(state)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["stargan", "attentiongan", "attgan", "hisd"])
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-format"])
def test_dataparallel_prefix_is_stripped_for_every_generator(tmp_path, name, zipfile):
    torch.manual_seed(1)
    src = _model(name)
    state = {f"module.{k}": v for k, v in src.official_state_dict().items()}
    path = tmp_path / f"{name}.pt"
    torch.save(_wrap(name, state), path, _use_new_zipfile_serialization=zipfile)
    torch.manual_seed(2)
    loaded = get_registry().create("model", name, scale="smoke", checkpoint=str(path))
    assert _same_weights(src, loaded)


@pytest.mark.parametrize("name", ["stargan", "attentiongan", "attgan"])
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-format"])
def test_old_pytorch_file_without_num_batches_tracked_loads(tmp_path, name, zipfile):
    torch.manual_seed(1)
    src = _model(name)
    state = {k: v for k, v in src.official_state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(src.official_state_dict())  # the model has such buffers
    path = tmp_path / f"{name}.pt"
    torch.save(_wrap(name, state), path, _use_new_zipfile_serialization=zipfile)
    torch.manual_seed(2)
    loaded = get_registry().create("model", name, scale="smoke", checkpoint=str(path))
    assert _same_weights(src, loaded)
    # the counters are the only keys filled in: any other missing key is still an error
    state.pop(next(k for k in state if k.endswith("running_mean")))
    torch.save(_wrap(name, state), path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): .*running_mean"):
        get_registry().create("model", name, scale="smoke", checkpoint=str(path))


def test_adapt_state_dict_reports_what_it_changed():
    expected = {"a.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(5)}
    state, notes = checkpoints.adapt_state_dict({"module.a.weight": torch.ones(2)}, expected)
    assert set(state) == {"a.weight", "bn.num_batches_tracked"} and int(state["bn.num_batches_tracked"]) == 5
    assert len(notes) == 2 and "module." in notes[0] and "num_batches_tracked" in notes[1]
    # a model whose own keys start with "module." keeps them
    same, notes = checkpoints.adapt_state_dict({"module.x": torch.ones(1)}, {"module.x": torch.ones(1)})
    assert list(same) == ["module.x"] and notes == []


def test_hisd_uses_the_shared_loader(tmp_path, monkeypatch):
    calls = []
    real = checkpoints.load_model_checkpoint
    monkeypatch.setattr(checkpoints, "load_model_checkpoint", lambda m, p: calls.append(p) or real(m, p))
    path = tmp_path / "gen.pt"
    torch.save({"gen_test": _model("hisd").state_dict()}, path)
    get_registry().create("model", "hisd", scale="smoke", checkpoint=str(path))
    assert calls == [path] or calls == [str(path)]


def test_wrong_scale_names_the_scale_that_fits(tmp_path):
    path = tmp_path / "g.pt"
    torch.save(_model("attgan", "demo").official_state_dict(), path)
    with pytest.raises(CheckpointError, match="fits attgan at scale 'demo'"):
        get_registry().create("model", "attgan", scale="smoke", checkpoint=str(path))


def test_paper_model_without_checkpoint_is_an_error_unless_random_init(tmp_path):
    reg = get_registry()
    with pytest.raises(ConfigError) as err:
        checkpoints.model_options("attgan", "paper", {}, reg)
    msg = str(err.value)
    assert "[models.attgan]" in msg and "'attgan'" in msg and "without a checkpoint" in msg
    assert 'checkpoint = "/path/to/weights.199.pth' in msg and "random_init = true" in msg
    options, random_init = checkpoints.model_options("attgan", "paper", {"random_init": True}, reg)
    assert options == {} and random_init is True
    path = tmp_path / "g.ckpt"
    torch.save(_model("stargan").official_state_dict(), path)
    assert checkpoints.model_options("stargan", "paper", {"checkpoint": str(path)}) == ({"checkpoint": str(path)},
                                                                                         False)
    assert checkpoints.model_options("stargan", "demo", {}) == ({}, False)  # demo: trained on first use
    for bad, match in (({"random_init": True, "checkpoint": str(path)}, "both"),
                       ({"random_init": "yes"}, "true or false")):
        with pytest.raises(ConfigError, match=match):
            checkpoints.model_options("stargan", "paper", bad)
    with pytest.raises(ConfigError, match="scale 'paper' only"):
        checkpoints.model_options("stargan", "smoke", {"random_init": True})


def test_create_model_records_random_init_and_the_checkpoint_file(tmp_path):
    reg = get_registry()
    with pytest.raises(ConfigError, match="without a checkpoint"):
        checkpoints.create_model(reg, "stargan", "paper", {})
    path = tmp_path / "g.ckpt"
    torch.save(_model("stargan").official_state_dict(), path)
    model = checkpoints.create_model(reg, "stargan", "smoke", {"checkpoint": str(path)})
    assert model.random_init is False
    assert model.checkpoint_record == {"random_init": False, "checkpoint_path": str(path.resolve()),
                                       "checkpoint_sha256": file_sha256(path)}
    bare = checkpoints.create_model(reg, "stargan", "smoke", {})
    assert bare.checkpoint_record == {"random_init": False, "checkpoint_path": "", "checkpoint_sha256": ""}
