"""The PyTorch port of dlib's face-recognition ResNet (metrics/dlib_resnet.py): same descriptors as dlib.

Measured when written, against dlib-bin 20.0.1's ``compute_face_descriptor`` (num_jitters=0): max
|torch - dlib| = 4.6e-7 over 24 embedded demo faces' chips (descriptor entries up to ~0.46, norms
~1.3-1.5) and 4.1e-6 over all 28 chips, the worst being the uniform-noise chips.
"""
import importlib.util

import numpy as np
import pytest
import torch

from tsdf_bench.errors import TsdfBenchError

if importlib.util.find_spec("face_recognition_models") is None:
    pytest.skip("needs the face-recognition-models package (bootstrap.py installs it)", allow_module_level=True)

from tsdf_bench_plugins.metrics import dlib_resnet  # noqa: E402

TOLERANCE = 1e-5  # float32 summation order only; measured 4.6e-7 (faces), 4.1e-6 (noise)


@pytest.fixture(scope="module")
def dat_path():
    return dlib_resnet.default_dat_path()


@pytest.fixture(scope="module")
def model(dat_path):
    return dlib_resnet.DlibResNet(dlib_resnet.read_dat(dat_path))


def _face_chips(dlib, align: str, n: int) -> np.ndarray:
    """150x150 chips of embedded demo faces, cut as DlibFaceEmbedder.embed cuts them."""
    from tsdf_bench.data.embedded import load_embedded
    from tsdf_bench_plugins.metrics.identity import CHIP_PADDING, CHIP_SIZE, DlibFaceEmbedder

    images = load_embedded(image_size=128, n_train=n, n_eval=0, n_collect=0).train.images
    emb = DlibFaceEmbedder(align=align)
    arr = emb.to_uint8(images)
    return np.stack([dlib.get_face_chip(img, s, size=CHIP_SIZE, padding=CHIP_PADDING)
                     for img, s in zip(arr, emb.shapes(images))])


def test_descriptors_match_dlib(model, dat_path):
    dlib = pytest.importorskip("dlib", reason="the comparison needs dlib-bin (bootstrap.py installs it)")
    rng = np.random.default_rng(0)
    chips = np.concatenate([
        _face_chips(dlib, "landmarks", 20),
        _face_chips(dlib, "box", 4),
        rng.integers(0, 256, (2, 150, 150, 3), dtype=np.uint8),  # not faces: the arithmetic still agrees
        np.zeros((1, 150, 150, 3), np.uint8), np.full((1, 150, 150, 3), 255, np.uint8),
    ])
    recogniser = dlib.face_recognition_model_v1(str(dat_path))
    ref = np.asarray(recogniser.compute_face_descriptor(list(chips)), dtype=np.float64)  # num_jitters=0

    got = model.descriptors(chips, batch_size=7)  # batches that do not divide N
    assert got.shape == (len(chips), 128) and got.dtype == np.float64
    diff = np.abs(got - ref).max()
    faces = np.abs(got - ref)[:24].max()
    print(f"max |torch - dlib| = {diff:.3g} over {len(chips)} chips ({faces:.3g} over the faces)")
    assert diff < TOLERANCE, f"max |torch - dlib| = {diff:.3g}"
    # dlib does not normalise the fc output: neither must the port
    assert not np.allclose(np.linalg.norm(ref, axis=1), 1.0)
    # the module-level helper too (other batch sizes may round differently: oneDNN picks kernels by shape)
    assert np.abs(dlib_resnet.descriptors(chips[:3], model=model) - ref[:3]).max() < TOLERANCE


def test_weights_have_the_expected_names_and_shapes(model, dat_path):
    weights = dlib_resnet.read_dat(dat_path)
    assert {k: tuple(v.shape) for k, v in weights.items()} == dlib_resnet.expected_shapes()
    assert torch.allclose(weights["input.mean"], torch.tensor([122.782, 117.001, 104.298]))
    assert sum(k.endswith(".gamma") for k in weights) == 29  # stem + 14 blocks x 2


def _assert_clear(exc_info, path):
    message = str(exc_info.value)
    assert str(path) in message and "face-recognition-models" in message and "reinstall" in message


@pytest.mark.parametrize("damage", ["truncated", "cut-short", "empty", "bad-version", "layer-name",
                                    "nan-weights", "trailing"])
def test_a_damaged_file_gives_a_clear_error(dat_path, tmp_path, damage):
    data = bytearray(dat_path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "cut-short":
        data = data[:-3]
    elif damage == "empty":
        data = bytearray()
    elif damage == "bad-version":
        assert data[:2] == b"\x01\x01"  # the loss layer's version, 1
        data[1] = 7
    elif damage == "layer-name":
        at = data.index(b"input_rgb_image_sized")
        data[at:at + 5] = b"XXXXX"
    elif damage == "nan-weights":  # inside the weights (99% of the file): 8 bytes hold a whole NaN float
        data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8
    else:
        data += b"\x00"
    bad = tmp_path / "model.dat"
    bad.write_bytes(bytes(data))
    with pytest.raises(TsdfBenchError) as exc_info:
        dlib_resnet.read_dat(bad)
    _assert_clear(exc_info, bad)


def test_a_missing_file_gives_a_clear_error(tmp_path):
    with pytest.raises(TsdfBenchError, match="face-recognition-models"):
        dlib_resnet.load_model(tmp_path / "absent.dat")


def test_rejects_chips_of_the_wrong_shape_or_type(model):
    with pytest.raises(TsdfBenchError, match="150, 150, 3"):
        model.descriptors(np.zeros((2, 128, 128, 3), np.uint8))
    with pytest.raises(TsdfBenchError, match="uint8"):
        model.descriptors(np.zeros((2, 150, 150, 3), np.float32))
    assert model.descriptors(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)


def test_a_chips_descriptor_does_not_depend_on_the_chips_it_came_with(model):
    """Streamed metrics embed batch by batch and must equal the whole-set result exactly."""
    chips = np.random.default_rng(1).integers(0, 256, (21, 150, 150, 3), dtype=np.uint8)
    whole = model.descriptors(chips)
    assert np.array_equal(model.descriptors(chips[:5]), whole[:5])
    assert np.array_equal(model.descriptors(chips[7:9]), whole[7:9])
    assert np.array_equal(np.concatenate([model.descriptors(chips[i:i + 1]) for i in range(21)]), whole)
