"""The run's roles (fit, collect, eval, generator training) never share a photo or a protected person."""
import numpy as np
import pytest
import torch
from PIL import Image

from tsdf_bench.config import from_dict
from tsdf_bench.data.embedded import locate_source
from tsdf_bench.errors import ConfigError
from tsdf_bench.harness.data import Split, check_disjoint, load_run_data

HAS_INSIGHTFACE = locate_source("insightface:t1") is not None


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path / "cache"))


def _cfg(**data):
    return from_dict({"run": {"scale": "smoke"}, "models": {"names": ["stargan"]}, "defenses": {"names": ["none"]},
                      "data": {"image_size": 32, **data}})


def _split(photos, persons=None):
    n = len(photos)
    return Split(torch.zeros(n, 3, 4, 4), torch.zeros(n, 1), list(photos), list(persons or photos))


@pytest.mark.skipif(not HAS_INSIGHTFACE, reason="the protected persons ship in insightface (bootstrap installs it)")
def test_embedded_roles_are_identity_disjoint():
    data = load_run_data(_cfg(source="embedded", n_train_defense=8, n_collect=6, n_eval=9))
    fit, col, ev = (set(s.persons) for s in (data.fit, data.collect, data.eval))
    assert not fit & col and not fit & ev and not col & ev
    assert col == {"t1_2"} and ev == {"t1_4", "t1_5", "t1_6"}
    assert data.generator_train is None  # the zoo trains on the 'train' persons only
    assert data.split["kind"] == "embedded-roles" and data.split["n_eval_persons"] == 3
    assert fit <= set(data.split["persons"]["train"])  # fitting may share the generators' persons
    assert data.eval.images.shape == (9, 3, 32, 32)


def test_check_disjoint_refuses_one_shared_view():
    splits = {"fit": _split(["a", "b"]), "collect": _split(["c"]), "eval": _split(["d", "c"])}
    with pytest.raises(ConfigError, match="collect and eval splits share 1 photo"):
        check_disjoint(splits)
    ok = {"fit": _split(["a", "b"]), "collect": _split(["c"]), "eval": _split(["d"])}
    check_disjoint(ok, generator_photos=["a", "b"])  # fit may overlap generator training
    with pytest.raises(ConfigError, match="1 eval person.*never enter generator training"):
        check_disjoint(ok, generator_persons=["d"])


def test_too_few_identities_is_an_error_naming_the_counts(monkeypatch):
    from tsdf_bench.data import embedded

    real = embedded.locate_source
    monkeypatch.setattr(embedded, "locate_source", lambda s: None if s.startswith("insightface") else real(s))
    with pytest.warns(UserWarning):
        with pytest.raises(ConfigError, match=r"3 faces available \(train 3, collect 0, eval 0\).*insightface"):
            load_run_data(_cfg(source="embedded", n_train_defense=4, n_collect=4, n_eval=4))


def _folder(root, n):
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 40, 3), 6 * i, np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_folder_roles_are_disjoint_runs_of_files(tmp_path):
    root = _folder(tmp_path / "faces", 9)
    data = load_run_data(_cfg(source="folder", path=str(root), n_train_defense=3, n_collect=2, n_eval=4))
    assert data.fit.photos == ["000.png", "001.png", "002.png"]
    assert data.collect.photos == ["003.png", "004.png"] and len(data.eval.photos) == 4
    with pytest.raises(ConfigError, match="9 available, 10 needed"):
        load_run_data(_cfg(source="folder", path=str(root), n_train_defense=4, n_collect=2, n_eval=4))


def _celeba(root, persons):
    """A CelebA-format folder whose test rows (CMUA split) hold the photos of ``persons``."""
    (root / "img_align_celeba").mkdir(parents=True)
    n = len(persons)
    for i in range(n):
        Image.fromarray(np.full((218, 178, 3), 4 * i, np.uint8)).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
    names = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]
    lines = [str(n), " ".join(names)] + [f"{i + 1:06d}.jpg " + " ".join(["1"] * 5) for i in range(n)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    part = [f"{i + 1:06d}.jpg {0 if i < 2 else 2}" for i in range(n)]  # two training rows, the rest test
    (root / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return root


def test_celeba_identity_split_puts_other_photos_of_collected_persons_in_eval(tmp_path):
    persons = ["p0", "p0", "p2", "p2", "p2", "p2", "p3", "p4", "p4", "p1", "p5", "p5"]
    root = _celeba(tmp_path / "celeba", persons)
    cfg = _cfg(source="celeba", path=str(root), protocol="official", n_train_defense=2, n_collect=3, n_eval=3,
               attributes=["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"])
    data = load_run_data(cfg)
    assert data.split["kind"] == "celeba-cmua-rows"
    assert not set(data.collect.photos) & set(data.eval.photos)
    (root / "identity_CelebA.txt").write_text("\n".join(f"{i + 1:06d}.jpg {p}" for i, p in enumerate(persons)))
    data = load_run_data(cfg)
    assert data.split["kind"] == "celeba-identities"
    assert not set(data.collect.photos) & set(data.eval.photos)
    assert set(data.eval.persons) <= set(data.collect.persons)  # other photos of the collected persons


@pytest.mark.parametrize("source", ["celeba", "folder"])
def test_large_collect_and_eval_sets_are_mapped_with_the_same_values(tmp_path, monkeypatch, source):
    """Over the threshold (here: always) the photos are memory-mapped files in the given folder,
    read into them one at a time (no whole set in memory first), with the values and data hash
    of the in-memory sets."""
    from tsdf_bench.harness import mapped

    persons = [f"p{i}" for i in range(8)]
    root = _celeba(tmp_path / "celeba", persons)
    if source == "celeba":
        cfg = _cfg(source="celeba", path=str(root), protocol="official", n_train_defense=2, n_collect=3, n_eval=3,
                   attributes=["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"])
    else:
        cfg = _cfg(source="folder", path=str(root / "img_align_celeba"), n_train_defense=2, n_collect=3, n_eval=3)
    in_memory = load_run_data(cfg, folder=tmp_path / "sets")
    assert not mapped.mapped_files(tmp_path / "sets")
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    data = load_run_data(cfg, folder=tmp_path / "sets")
    # anonymous files: CelebA's collect and eval sets; a folder's photos are read into one set
    assert len(mapped.mapped_files(tmp_path / "sets")) == (2 if source == "celeba" else 1)
    assert data.data_hash == in_memory.data_hash
    for role in ("fit", "collect", "eval"):
        assert torch.equal(getattr(data, role).images, getattr(in_memory, role).images)
