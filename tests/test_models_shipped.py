"""Shipped demo checkpoints: used when they are the requested model, refused when they are damaged
or made for other data, never silently replaced, and each shipped file fits the package."""
import json

import pytest
import torch

from tsdf_bench.errors import CheckpointError
from tsdf_bench.hashing import state_sha256
from tsdf_bench.models import checkpoints, shipped, zoo
from tsdf_bench.plugins import get_registry



def _shipping_models() -> list[str]:
    """The model plugins that declare shipped demo weights (``demo_weights_dir``)."""
    from tsdf_bench.commands.train import trainable_models
    from tsdf_bench.records import resolve_factory

    reg = get_registry()
    return [n for n in trainable_models(reg) if getattr(resolve_factory(reg.get("model", n).factory),
                                                        "demo_weights_dir", None)]


def test_the_demo_models_ship_their_weights():
    assert {"stargan", "attentiongan", "attgan"} <= set(_shipping_models())


@pytest.fixture
def ship_dir(tmp_path, monkeypatch):
    """A demo StarGAN shipped (exported) into a temporary weights folder, random weights."""
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "cache"))
    reg = get_registry()
    model, _, images, _, expect = zoo.request("stargan", "demo", reg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():  # weights no freshly initialised model has
            p.data.add_(torch.randn_like(p) * 0.01)
        d = model.make_discriminator()
    folder = tmp_path / "weights"
    folder.mkdir()
    info = shipped.export(model, d, dict(expect, torch_threads=1), folder, images[:8])
    monkeypatch.setattr(type(model), "demo_weights_dir", folder)
    monkeypatch.setattr(zoo, "train", lambda *a, **k: pytest.fail("a shipped model was retrained"))
    return folder / info["weights"], model, d, images[:8]


def test_a_shipped_checkpoint_is_used_bit_for_bit_and_its_d_within_tolerance(ship_dir):
    path, model, d, probe = ship_dir
    got = zoo.get_model("stargan", scale="demo", progress=False)
    assert got.weights_source == "shipped" and got.weights_file == path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), got.state_dict().values()))
    assert next(iter(torch.load(path, weights_only=True)["discriminator"].values())).dtype == torch.float16
    loaded_d = checkpoints.load_discriminator(got, path)
    with torch.no_grad():
        ref = torch.cat([t.flatten() for t in d(probe)])
        new = torch.cat([t.flatten() for t in loaded_d(probe)])
    assert (new - ref).abs().max() <= shipped.D_TOLERANCE * ref.abs().max()
    manifest = checkpoints.read_manifest(path)
    assert manifest["g_state_sha256"] == state_sha256(model.state_dict())
    assert manifest["d_state_sha256"] == state_sha256(d.state_dict()) and manifest["d_change"] <= shipped.D_TOLERANCE


def test_a_corrupt_shipped_checkpoint_is_refused_naming_file_and_fix(ship_dir):
    path = ship_dir[0]
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"stargan-seed0\.pt fails its sha256 check.*reinstall tsdf-bench.*--retrain"):
        zoo.get_model("stargan", scale="demo", progress=False)


def test_a_shipped_checkpoint_for_other_data_is_refused(ship_dir):
    path = ship_dir[0]
    manifest = checkpoints.read_manifest(path)
    manifest["data_hash"] = "0" * 16
    checkpoints.manifest_path(path).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="trained on data hash 0000000000000000.*it is not used"):
        zoo.get_model("stargan", scale="demo", progress=False)


class Trained(Exception):
    pass


@pytest.mark.parametrize("kwargs", [{"shipped": False}, {"steps": 7}, {"retrain": True}],
                         ids=["shipped=false", "another recipe", "retrain"])
def test_other_requests_train_instead_of_using_the_shipped_file(ship_dir, monkeypatch, kwargs):
    def train(*a, **k):
        raise Trained

    monkeypatch.setattr(zoo, "train", train)
    with pytest.raises(Trained):
        zoo.get_model("stargan", scale="demo", progress=False, **kwargs)


@pytest.mark.parametrize("name", _shipping_models())
def test_the_shipped_demo_checkpoints_fit_this_package(name):
    """Each checkpoint the package ships: under 5 MB, intact, made for this package's demo recipe and
    architecture and for the embedded faces as they load here (a recipe change without retraining
    the shipped weights fails here)."""
    reg = get_registry()
    model, _, _, _, expect = zoo.request(name, "demo", reg)
    path = shipped.shipped_path(model, 0)
    assert path is not None, f"{name} ships no demo checkpoint in {model.demo_weights_dir}"
    assert path.stat().st_size <= shipped.MAX_BYTES
    manifest = shipped.verify(path, name, expect["data_hash"])
    assert shipped.applies(manifest, expect), "the shipped checkpoint was made for another recipe or architecture"
    assert manifest["torch_threads"] == zoo.TRAIN_THREADS and manifest["d_change"] <= shipped.D_TOLERANCE
    checkpoints.load_model_checkpoint(model, path)
    assert state_sha256(model.state_dict()) == manifest["g_state_sha256"]


def test_train_exports_then_a_retrain_reproduces_the_exported_weights(tmp_path, monkeypatch, capsys):
    """``tsdf-bench train --export`` writes a shipped checkpoint; training again from scratch with the
    same recipe on this CPU (1 thread) gives the same float32 weights bit for bit, and says so."""
    import argparse

    from tsdf_bench.commands import train

    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "cache"))
    reg = get_registry()
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tmp_path / "weights"
    assert train.main(parser.parse_args(["--scale", "smoke", "--models", "stargan", "--export", str(out),
                                         "--no-progress"]), reg) == 0
    exported = out / "stargan-seed0.pt"
    assert exported.is_file() and checkpoints.read_manifest(exported)["torch_threads"] == 1
    monkeypatch.setattr(type(reg.create("model", "stargan", scale="smoke")), "demo_weights_dir", out)
    capsys.readouterr()
    assert train.main(parser.parse_args(["--scale", "smoke", "--models", "stargan", "--retrain", "--no-progress"]),
                      reg) == 0
    assert "stargan: reproduces the shipped weights bit for bit" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["stargan", "attentiongan", "attgan"])
def test_the_shipped_demo_models_meet_the_sensitivity_target(name):
    """Issue 12's target on the shipped weights: per-image PGD at the papers' eps 0.05 (10
    iterations) disrupts at least 90% of the (held-out photo, target) pairs, CMUA's masked L2 >
    0.05.  A demo model that stopped reacting (AttentionGAN trained after a reconstruction warm-up:
    0.57) fails here.  HiSD's shipped model misses the target (0.38; docs/model-card.md)."""
    from tsdf_bench.models.curve import held_out, sensitivity

    model = zoo.get_model(name, progress=False)
    assert model.weights_source == "shipped"
    x, a = held_out(model)
    got = sensitivity(model, x, a)
    assert got["pgd_sr_mask"] >= 0.9, got
