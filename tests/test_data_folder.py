"""Generic image-folder dataset: recursion, label CSV, crop/resize, bad files reported and skipped."""
import numpy as np
import pytest
import torch
from PIL import Image

from tsdf_bench.data import DatasetError, FaceSet, ImageFolderDataset
from tsdf_bench.errors import ImageError, UnknownNameError


@pytest.fixture()
def photos(tmp_path):
    (tmp_path / "alice").mkdir()
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 200  # the central square is bright, the sides black
    Image.fromarray(wide).save(tmp_path / "alice" / "wide.png")
    Image.fromarray(np.full((50, 50), 30, np.uint8), "L").save(tmp_path / "bob.png")
    Image.fromarray(np.full((60, 60, 3), 90, np.uint8)).save(tmp_path / "carol.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "labels.csv").write_text(
        "filename,Male,Young\nalice/wide.png,-1,1\nbob.png,1,-1\nbroken.jpg,0,0\ngone.png,1,1\n")
    return tmp_path


def test_recursive_and_flat(photos):
    assert len(ImageFolderDataset(photos, image_size=16)) == 4
    assert len(ImageFolderDataset(photos, image_size=16, recursive=False)) == 3


def test_center_crop_and_resize(photos):
    ds = ImageFolderDataset(photos, image_size=16)
    image, attrs = ds[ds.paths.index(photos / "alice" / "wide.png")]
    assert image.shape == (3, 16, 16) and attrs.shape == (0,)
    assert image.min() > 0.5  # only the bright central square is kept


def test_labels_and_bad_files_reported(photos):
    ds = ImageFolderDataset(photos, image_size=16, attr_csv="labels.csv")
    assert ds.attr_names == ["Male", "Young"]
    assert [p.name for p in ds.unlabelled] == ["carol.jpg"]
    assert any(p.name == "gone.png" and "not found" in r for p, r in ds.failures)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        faces = ds.faceset()
    assert isinstance(faces, FaceSet)
    assert faces.ids == ["alice/wide.png", "bob.png"]
    assert faces.attrs.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # -1/1 read as 0/1
    assert faces.images.shape == (2, 3, 16, 16)
    assert any(p.name == "broken.jpg" for p, _ in ds.failures)


def test_getitem_raises_for_bad_file_and_validate_drops_it(photos):
    ds = ImageFolderDataset(photos, image_size=16, attrs=None)
    with pytest.raises(ImageError, match="broken.jpg"):
        ds[ds.paths.index(photos / "broken.jpg")]
    with pytest.warns(UserWarning):
        ds.validate()
    assert len(ds) == 3 and all(ds[i][0].shape == (3, 16, 16) for i in range(3))


def test_attribute_selection_and_errors(photos, tmp_path):
    ds = ImageFolderDataset(photos, image_size=8, attr_csv=photos / "labels.csv", attrs=["Young"])
    assert ds.attrs.shape == (3, 1)
    with pytest.raises(UnknownNameError, match="Yung"):
        ImageFolderDataset(photos, attr_csv="labels.csv", attrs=["Yung"])
    with pytest.raises(DatasetError, match="nowhere: image folder not found"):
        ImageFolderDataset(tmp_path / "nowhere")
    (photos / "bad.csv").write_text("name,Male\nbob.png,1\n")
    with pytest.raises(DatasetError, match="first line must be 'filename"):
        ImageFolderDataset(photos, attr_csv="bad.csv")
    (photos / "bad2.csv").write_text("filename,Male\nbob.png,2\n")
    with pytest.raises(DatasetError, match="line 2: values must be 0/1 or -1/1"):
        ImageFolderDataset(photos, attr_csv="bad2.csv")


def test_faceset_limit(photos):
    with pytest.warns(UserWarning):
        faces = ImageFolderDataset(photos, image_size=8).faceset(n=3)
    assert len(faces) == 3 and torch.all(faces.images.abs() <= 1)


def test_faceset_read_into_a_given_tensor_skips_bad_files_alike(photos):
    """With ``new_images`` the images are read one at a time into the given tensor (a mapped set at
    paper scale): the same images, ids and skips as the stacked set, in that tensor's storage."""
    made = []

    def new_images(shape):
        made.append(torch.full(shape, 9.0))
        return made[-1]

    with pytest.warns(UserWarning):
        stacked = ImageFolderDataset(photos, image_size=8).faceset(n=4)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        read = ImageFolderDataset(photos, image_size=8).faceset(n=4, new_images=new_images)
    assert read.ids == stacked.ids and len(read) == 3  # broken.jpg skipped: 3 of the 4 rows
    assert torch.equal(read.images, stacked.images) and read.images.data_ptr() == made[0].data_ptr()
