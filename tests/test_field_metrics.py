"""The identity (dlib, CIDR-style) and LPIPS metric plugins, and the field plugins' registration (issue 16)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tsdf_bench.errors import ConfigError, TsdfBenchError
from tsdf_bench.metrics import EvalBatch
from tsdf_bench.plugins import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def registry():
    return Registry(strict=True)


def test_cli_lists_the_field_plugins():
    env = {**os.environ, "TSDF_BENCH_STRICT_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-m", "tsdf_bench.cli", "plugins", "--json"], capture_output=True,
                         text=True, cwd=ROOT, env=env, check=True)
    rows = json.loads(out.stdout[: out.stdout.rindex("]") + 1])
    names = {(r["kind"], r["name"]) for r in rows}
    for name in ("jpeg", "blur", "noise", "resize", "salt-pepper", "lora-patch", "retrain-aligned"):
        assert ("adaptation", name) in names
    for name in ("identity", "lpips"):
        assert ("metric", name) in names


# -- identity ---------------------------------------------------------------------------
dlib = pytest.importorskip("dlib", reason="the identity metric needs dlib-bin (bootstrap.py installs it)")


@pytest.fixture(scope="module")
def faces():
    from tsdf_bench.data.embedded import load_embedded

    data = load_embedded(image_size=64, n_train=24, n_eval=0, n_collect=0)
    return data.train


@pytest.fixture(scope="module")
def identity(registry):
    return registry.create("metric", "identity")


def test_identity_separates_same_from_different_people(identity, faces):
    emb = identity.embedder.embed(faces.images)
    assert emb.shape == (len(faces), 128)
    n = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = n @ n.T
    ids = np.array(faces.ids)
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    diff = ids[:, None] != ids[None]
    assert same.any() and diff.any() and len(set(faces.ids)) >= 3
    assert cos[same].mean() > cos[diff].mean() + 0.05
    # every face is closer to its own other views than to anybody else's, on average
    for i in range(len(ids)):
        if same[i].any():
            assert cos[i][same[i]].mean() > cos[i][diff[i]].mean()


def test_identity_cidr_is_zero_for_an_undisrupted_forgery_and_high_for_another_person(identity, faces):
    ids = np.array(faces.ids)
    a = [i for i in range(len(ids)) if ids[i] == ids[0]][:2]
    b = next(i for i in range(len(ids)) if ids[i] != ids[0])
    x = faces.images[a[:1]]
    own = faces.images[a[1:2]].unsqueeze(1)  # a "forgery" that is another view of the same person
    other = faces.images[[b]].unsqueeze(1)  # a "protected forgery" that is somebody else
    res = identity.compute(EvalBatch(clean=x, protected=x, fake_clean=own, fake_protected=own))
    assert res["cidr"] == pytest.approx(0.0) and res["id_loss_out"] == pytest.approx(0.0, abs=1e-9)
    res = identity.compute(EvalBatch(clean=x, protected=x, fake_clean=own, fake_protected=other))
    assert res["cidr"] > 0.5 and res["id_sim_protected"] < res["id_sim_clean"]
    assert set(res) == set(identity.columns)
    none = identity.compute(EvalBatch(clean=x, protected=x))
    assert none == dict.fromkeys(identity.columns)


def test_cidr_formula_matches_pdb():
    from tsdf_bench_plugins.metrics.identity import cidr_values

    # max(0, 1 - clean / protected); 0 when the protected ID loss is 0
    assert cidr_values([0.1, 0.3, 0.2, 0.0], [0.4, 0.1, 0.0, 0.0]).tolist() == pytest.approx([0.75, 0.0, 0.0, 0.0])


def test_identity_backends_agree_on_the_embedded_faces(registry, faces, identity):
    """The default PyTorch port of dlib's ResNet gives dlib's own descriptors, hence its CIDR."""
    assert identity.backend == "torch"
    own_dlib = registry.create("metric", "identity", backend="dlib")
    x, fake = faces.images[:6], faces.images[6:18].reshape(6, 2, *faces.images.shape[1:])
    got = identity.pair_values(x, fake, fake.flip(0))
    ref = own_dlib.pair_values(x, fake, fake.flip(0))
    for column in identity.columns:
        assert np.abs(np.asarray(got[column]) - np.asarray(ref[column])).max() < 1e-4, column
    with pytest.raises(ConfigError, match="backend must be 'torch'"):
        registry.create("metric", "identity", backend="cuda")


def test_identity_box_alignment_also_separates(registry, faces):
    metric = registry.create("metric", "identity", align="box")
    emb = metric.embedder.embed(faces.images)
    n = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.array(faces.ids)
    cos = n @ n.T
    same = (ids[:, None] == ids[None]) & ~np.eye(len(ids), dtype=bool)
    assert cos[same].mean() > cos[ids[:, None] != ids[None]].mean()


# -- lpips ------------------------------------------------------------------------------
def test_lpips_without_local_weights_names_the_file_and_the_fix(registry, tmp_path, monkeypatch):
    from tsdf_bench_plugins.metrics.perceptual import ENV, LpipsWeightsMissing

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(ENV, raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(LpipsWeightsMissing) as err:
        registry.create("metric", "lpips")
    text = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in text and str(tmp_path / "torch" / "hub" / "checkpoints") in text
    assert ENV in text and "never downloads" in text
    with pytest.raises(LpipsWeightsMissing, match="vgg16-397923af.pth"):
        registry.create("metric", "lpips", net="vgg", backbone=str(tmp_path / "nope" / "vgg16-397923af.pth"))


def test_lpips_with_a_local_backbone_computes_without_downloading(registry, tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    import torchvision

    from tsdf_bench_plugins.metrics.perceptual import ENV

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None)  # stands in for the ImageNet file
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(reference.state_dict(), hub / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(ENV, raising=False)
    metric = registry.create("metric", "lpips")
    # the backbone is the local file's
    assert torch.equal(metric.model.net.slice1[0].weight, reference.features[0].weight)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    fc = torch.rand(3, 2, 3, 64, 64, generator=g) * 2 - 1
    res = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=fc))
    assert res == {"lpips": pytest.approx(0.0, abs=1e-7), "lpips_in": pytest.approx(0.0, abs=1e-7)}
    noisy = (fc + 0.3 * torch.randn(fc.shape, generator=g)).clamp(-1, 1)
    more = (fc + 0.6 * torch.randn(fc.shape, generator=g)).clamp(-1, 1)
    a = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=noisy))["lpips"]
    b = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=more))["lpips"]
    assert 0 < a < b
    # a file that is not the backbone's weights: a clear error
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(TsdfBenchError, match="not torchvision's alexnet weights"):
        registry.create("metric", "lpips", backbone=str(bad)).model


def test_identity_reuses_the_embeddings_of_recurring_batches(registry, faces):
    metric = registry.create("metric", "identity")
    calls = []
    real = metric.embedder.embed
    metric.embedder.embed = lambda images, shapes=None: calls.append(len(images)) or real(images, shapes)
    x = faces.images[:2]
    fc = faces.images[2:4].unsqueeze(1)
    first = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=fc.flip(0)))
    assert calls == [2, 2, 2]
    second = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=fc.flip(-1)))
    assert calls == [2, 2, 2, 2]  # only the new protected forgeries are embedded
    again = metric.compute(EvalBatch(clean=x, protected=x, fake_clean=fc, fake_protected=fc.flip(0)))
    assert again == first and again != second
