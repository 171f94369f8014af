"""CelebA loader on a tiny CelebA-format folder written by the test."""
import random

import numpy as np
import pytest
from PIL import Image

from tsdf_bench.data import CelebA, FaceSet
from tsdf_bench.data._common import DatasetError
from tsdf_bench.data.celeba import read_attr_file, split_rows
from tsdf_bench.errors import ImageError, UnknownNameError

NAMES = ["5_o_Clock_Shadow", "Bald", "Black_Hair", "Blond_Hair", "Brown_Hair", "Male",
         "Smiling", "Young"]
N = 30


def _row_values(i):
    """Attribute values of row ``i``: the bits of ``i + 1`` (so each row is distinct), as -1/1."""
    return [1 if (i + 1) >> b & 1 else -1 for b in range(len(NAMES))]


@pytest.fixture()
def celeba_root(tmp_path):
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for i in range(N):
        arr = np.full((218, 178, 3), 8 * i, np.uint8)  # brightness encodes the row
        arr[:4, :, :] = 255  # rows that CenterCrop(170) removes (it keeps rows 24..193)
        Image.fromarray(arr).save(images / f"{i + 1:06d}.jpg", quality=95)
    lines = [str(N), " ".join(NAMES) + " "]
    lines += [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in _row_values(i)) for i in range(N)]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    part = [f"{i + 1:06d}.jpg {0 if i < 20 else 1 if i < 25 else 2}" for i in range(N)]
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return tmp_path


def test_header_lines_are_not_data(celeba_root):
    files, names, attrs = read_attr_file(celeba_root / "list_attr_celeba.txt")
    assert names == NAMES and len(files) == N and files[0] == "000001.jpg"
    assert attrs.shape == (N, len(NAMES))
    for i in (0, 7, N - 1):
        assert attrs[i].tolist() == [float(v > 0) for v in _row_values(i)]


def test_cmua_split_sizes_and_rows(celeba_root):
    train = CelebA(celeba_root, "train", "cmua", image_size=32, train_end=20, test_start=23)
    test = CelebA(celeba_root, "test", "cmua", image_size=32, train_end=20, test_start=23)
    assert len(train) == 20 and len(test) == N - 23
    assert train.files[0] == "000001.jpg" and test.files[0] == "000024.jpg"
    assert train.crop_size == 170
    image, attrs = test[0]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    expected = [float(_row_values(23)[NAMES.index(a)] > 0) for a in test.attr_names]
    assert attrs.tolist() == expected
    level = 8 * 23 / 127.5 - 1  # the row's brightness; the white band is cropped away
    assert abs(image.mean().item() - level) < 0.03


def test_paper_boundaries_are_the_defaults():
    assert len(split_rows(202599, "cmua", "test")) == 19962
    assert len(split_rows(202599, "cmua", "train")) == 182000
    assert len(split_rows(202599, "stargan", "test")) == 1999


def test_stargan_split_matches_its_loader(celeba_root):
    # What StarGAN's CelebA class does with the attribute file.
    lines = [line.rstrip() for line in open(celeba_root / "list_attr_celeba.txt")][2:]
    state = random.getstate()
    random.seed(1234)
    random.shuffle(lines)
    random.setstate(state)
    expected_test = [line.split()[0] for i, line in enumerate(lines) if (i + 1) < 6]
    expected_train = [line.split()[0] for i, line in enumerate(lines) if (i + 1) >= 6]
    test = CelebA(celeba_root, "test", "stargan", image_size=16, stargan_test_count=5)
    train = CelebA(celeba_root, "train", "stargan", image_size=16, stargan_test_count=5)
    assert test.files == expected_test and train.files == expected_train
    assert test.crop_size == 178


def test_official_partition(celeba_root):
    sizes = {s: len(CelebA(celeba_root, s, "official", image_size=16)) for s in ("train", "val", "test")}
    assert sizes == {"train": 20, "val": 5, "test": 5}


def test_attribute_selection_and_faceset(celeba_root):
    ds = CelebA(celeba_root, "train", "cmua", image_size=24, attrs=["Young", "Male"], train_end=20)
    faces = ds.faceset(n=4, start=2)
    assert isinstance(faces, FaceSet)
    assert faces.images.shape == (4, 3, 24, 24) and faces.attrs.shape == (4, 2)
    assert faces.attr_names == ["Young", "Male"] and faces.ids[0] == "000003.jpg"
    assert faces.attrs[0].tolist() == [float(_row_values(2)[7] > 0), float(_row_values(2)[5] > 0)]
    assert faces.select(["Male"]).attrs[:, 0].tolist() == faces.attrs[:, 1].tolist()
    with pytest.raises(UnknownNameError, match="Blonde_Hair.*Did you mean 'Blond_Hair'"):
        CelebA(celeba_root, "train", attrs=["Blonde_Hair"], train_end=20)


def test_missing_paths_are_named(celeba_root, tmp_path):
    with pytest.raises(DatasetError, match="CelebA folder not found"):
        CelebA(tmp_path / "nowhere")
    (celeba_root / "list_attr_celeba.txt").rename(celeba_root / "attrs.bak")
    with pytest.raises(DatasetError, match="list_attr_celeba.txt: attribute file not found"):
        CelebA(celeba_root, train_end=20, test_start=23)


def test_missing_image_is_reported(celeba_root):
    (celeba_root / "img_align_celeba" / "000026.jpg").unlink()
    with pytest.raises(DatasetError, match="missing, e.g. 000026.jpg"):
        CelebA(celeba_root, "test", train_end=20, test_start=23, check_files="all")
    ds = CelebA(celeba_root, "test", train_end=20, test_start=23, check_files=False)
    with pytest.raises(ImageError, match="000026.jpg: listed in list_attr_celeba.txt but missing"):
        ds[2]


def test_count_mismatch_is_an_error(celeba_root):
    path = celeba_root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DatasetError, match="says 30 images but 27 rows"):
        read_attr_file(path)


def test_check_files_used_needs_only_the_images_a_run_reads(celeba_root):
    """Default ``check_files="used"``: a run reading 3 train and 2 test images needs those 5 files,
    not the whole split; ``"all"`` is the full up-front check."""
    keep = {"000001.jpg", "000002.jpg", "000003.jpg", "000024.jpg", "000025.jpg"}
    for p in (celeba_root / "img_align_celeba").iterdir():
        if p.name not in keep:
            p.unlink()
    train = CelebA(celeba_root, "train", train_end=20, test_start=23)
    test = CelebA(celeba_root, "test", train_end=20, test_start=23, check_files="used")
    assert train.check_files == "used" and len(train) == 20 and len(test) == 7
    assert train.faceset(n=3).ids == ["000001.jpg", "000002.jpg", "000003.jpg"]
    test.require([0, 1])
    assert test[1][0].shape == (3, 256, 256)
    with pytest.raises(DatasetError, match=r"2 of the 4 image\(s\) this run reads .* missing, e.g. 000026.jpg, 000027.jpg"):
        test.faceset(n=4)
    for split, count in (("train", 17), ("test", 5)):
        with pytest.raises(DatasetError, match=f"{count} image\\(s\\) listed in list_attr_celeba.txt .* missing"):
            CelebA(celeba_root, split, train_end=20, test_start=23, check_files="all")
    with pytest.raises(DatasetError, match='use "used"'):
        CelebA(celeba_root, "train", train_end=20, check_files="some")
