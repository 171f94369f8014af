"""The embedded default dataset built from face photos that ship inside installed packages."""
import warnings

import pytest
import torch

from tsdf_bench.data import ATTGAN_ATTRS, DatasetError, load_embedded
from tsdf_bench.data import embedded as embedded_module
from tsdf_bench.data.embedded import locate_source, read_faces_csv

SMALL = dict(image_size=64, n_train=40, n_eval=20)
HAS_INSIGHTFACE = locate_source("insightface:t1") is not None


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "cache"))


def _col(name):
    return ATTGAN_ATTRS.index(name)


def test_shapes_ranges_and_names():
    data = load_embedded(**SMALL, use_cache=False)
    assert data.train.images.shape == (40, 3, 64, 64) and data.eval.images.shape == (20, 3, 64, 64)
    assert data.train.attrs.shape == (40, 13) and data.attr_names == list(ATTGAN_ATTRS)
    for fs in (data.train, data.eval):
        assert fs.images.dtype == torch.float32
        assert fs.images.min() >= -1 and fs.images.max() <= 1 and fs.images.std() > 0.2
        assert set(fs.attrs.unique().tolist()) <= {0.0, 1.0}
    assert len(data.data_hash) == 64
    assert {"astronaut", "grace_hopper", "cameraman"} <= set(data.identities)


def test_same_seed_same_tensors_other_seed_differs():
    a = load_embedded(**SMALL, seed=3, use_cache=False)
    b = load_embedded(**SMALL, seed=3, use_cache=False)
    c = load_embedded(**SMALL, seed=4, use_cache=False)
    assert torch.equal(a.train.images, b.train.images) and a.train.ids == b.train.ids
    assert torch.equal(a.eval.images, b.eval.images) and a.data_hash == b.data_hash
    assert not torch.equal(a.train.images, c.train.images) and a.data_hash != c.data_hash


@pytest.mark.skipif(not HAS_INSIGHTFACE, reason="the collect/eval persons ship in insightface (bootstrap installs it)")
def test_roles_are_identity_disjoint():
    data = load_embedded(**SMALL, n_collect=12, use_cache=False)
    ids = {role: set(getattr(data, role).ids) for role in ("train", "collect", "eval")}
    assert ids["train"] == set(data.roles["train"]) and len(ids["train"]) == 6
    assert ids["collect"] == {"t1_2"} and ids["eval"] == {"t1_4", "t1_5", "t1_6"}
    assert not ids["train"] & ids["collect"] and not ids["train"] & ids["eval"] and not ids["collect"] & ids["eval"]
    assert set(data.heldout) == ids["collect"] | ids["eval"]
    distance = torch.cdist(data.eval.images.flatten(1), data.train.images.flatten(1))
    assert distance.min() > 1.0  # no eval image is a copy of a train image


def test_unknown_role_is_an_error(tmp_path):
    bad = tmp_path / "faces.csv"
    text = embedded_module.FACES_CSV.read_text().replace(",collect,", ",colect,", 1)
    bad.write_text(text)
    with pytest.raises(DatasetError, match="t1_2.*'colect'.*train, collect, eval"):
        read_faces_csv(bad)


def test_cache_is_reused(monkeypatch, tmp_path):
    first = load_embedded(**SMALL)
    files = list((tmp_path / "cache" / "data" / "embedded").glob("*.pt"))
    assert len(files) == 1 and first.data_hash[:20] in files[0].name

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(embedded_module, "_augment", no_rebuild)
    second = load_embedded(**SMALL)
    assert torch.equal(first.train.images, second.train.images)
    assert first.eval.ids == second.eval.ids and first.data_hash == second.data_hash
    with pytest.raises(AssertionError, match="rebuilt"):
        load_embedded(**dict(SMALL, n_eval=21))  # other parameters -> other key -> rebuild


def test_labels_line_up_with_faces():
    data = load_embedded(**SMALL, use_cache=False)
    faces = {f["face_id"]: f for f in data.faces}
    for fs in (data.train, data.collect, data.eval):
        for i, face_id in enumerate(fs.ids):
            assert fs.attrs[i].tolist() == faces[face_id]["attrs"]
            grey_source = face_id in ("cameraman", "tom_hanks")
            spread = (fs.images[i] - fs.images[i].mean(0, keepdim=True)).abs().mean().item()
            assert (spread < 0.01) == grey_source, (face_id, spread)  # ids match the pixels
    astronaut, hopper = faces["astronaut"]["attrs"], faces["grace_hopper"]["attrs"]
    assert astronaut[_col("Male")] == 0 and astronaut[_col("Brown_Hair")] == 1
    assert hopper[_col("Male")] == 0 and hopper[_col("Young")] == 0 and hopper[_col("Eyeglasses")] == 1
    assert faces["cameraman"]["attrs"][_col("Male")] == 1


def test_face_table_is_complete():
    faces = read_faces_csv()
    assert len(faces) == 10 and len({f["face_id"] for f in faces}) == 10
    for f in faces:
        x1, y1, x2, y2 = f["box"]
        assert x2 - x1 > 40 and y2 - y1 > 50 and len(f["attrs"]) == 13
        hair = [f["attrs"][_col(a)] for a in ("Black_Hair", "Blond_Hair", "Brown_Hair")]
        assert sum(hair) <= 1, f["face_id"]


def test_missing_optional_source_warns_and_shrinks(monkeypatch):
    real = embedded_module.locate_source
    monkeypatch.setattr(embedded_module, "locate_source",
                        lambda s: None if s.startswith("insightface") else real(s))
    with pytest.warns(UserWarning, match="insightface"):
        data = load_embedded(**SMALL, use_cache=False)
    assert set(data.identities) == {"astronaut", "grace_hopper", "cameraman"}
    assert data.heldout == [] and len(data.collect) == 0 and len(data.eval) == 0
    assert sorted(data.missing_sources) == ["insightface:t1",
                                                                  "insightface:tom_hanks"]
    with pytest.raises(DatasetError, match="pip install --no-deps insightface"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_embedded(**SMALL, use_cache=False, require_all=True)


def test_missing_required_source_is_an_error(monkeypatch):
    real = embedded_module.locate_source
    monkeypatch.setattr(embedded_module, "locate_source",
                        lambda s: None if s == "matplotlib:grace_hopper" else real(s))
    with pytest.raises(DatasetError, match="grace_hopper.jpg.*reinstall matplotlib"):
        load_embedded(**SMALL, use_cache=False)
