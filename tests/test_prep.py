import numpy as np
import pytest
import torch

from detector_fixtures import FACE_BOXES, face_crop, portrait_arrays, to_tensor
from tsdf_bench.detectors.boxes import box_iou
from tsdf_bench.errors import ConfigError
from tsdf_bench.prep import DataPreparation, crop_ious


@pytest.fixture(scope="module")
def retina():
    from tsdf_bench_plugins.detectors.retinaface import RetinaFaceDetector

    return RetinaFaceDetector()


def batch():
    torch.manual_seed(0)
    face, _ = face_crop("astronaut", 128)
    noise = torch.rand(1, 3, 128, 128) * 2 - 1
    return torch.cat([face, noise, torch.zeros(1, 3, 128, 128)])


@pytest.mark.parametrize("crop", ["margin", "align", "frame"])
def test_crops_faces_and_reports_failures(retina, crop):
    attrs = torch.tensor([[1.0], [2.0], [3.0]])
    result = DataPreparation(retina, 64, crop=crop)(batch(), attrs)
    assert result.crops.shape == (1, 3, 64, 64)
    assert result.kept.tolist() == [0] and result.attrs.tolist() == [[1.0]]
    assert result.failures == {1: "no face detected", 2: "no face detected"}
    assert result.crops.abs().max() <= 1.0 + 1e-5 and result.crops.std() > 0.1
    assert result.success_rate == pytest.approx(1 / 3)


def test_align_puts_eyes_on_the_template(retina):
    from tsdf_bench.detectors.align import arcface_template

    image = to_tensor(portrait_arrays()["grace_hopper"])
    result = DataPreparation(retina, 112, crop="align")(image)
    again = retina.detect(torch.nn.functional.interpolate(result.crops, size=224, mode="bilinear"))[0]
    eyes = again.landmarks[0, :2] / 2
    assert (eyes - torch.tensor(arcface_template(112)[:2], dtype=torch.float32)).abs().max() < 4


def test_margin_box_and_min_face(retina):
    image = to_tensor(portrait_arrays()["astronaut"])
    result = DataPreparation(retina, 32, margin=0.5)(image)
    assert box_iou(result.boxes, torch.tensor([FACE_BOXES["astronaut"]], dtype=torch.float32)).item() > 0.8
    side = result.crop_boxes[0, 2] - result.crop_boxes[0, 0]
    assert side == pytest.approx(1.5 * float((result.boxes[0, 2:] - result.boxes[0, :2]).max()), rel=1e-4)
    small = DataPreparation(retina, 32, min_face=1000)(image)
    assert small.failures[0].startswith("face too small")


def test_crop_ious(retina):
    prep = DataPreparation(retina, 32)
    x = batch()
    clean = prep(x)
    assert crop_ious(clean, prep(x)) == {0: pytest.approx(1.0)}
    blanked = x.clone()
    blanked[0] = 0
    assert crop_ious(clean, prep(blanked)) == {0: 0.0}


def test_frame_crop_maps_a_framed_face_to_itself(tmp_path, monkeypatch):
    """The attacker's "frame" crop reproduces the models' framing: unaugmented framed demo faces
    (the embedded build's canvas, centre crop) come back within a few pixels of the whole image."""
    from tsdf_bench.data import embedded
    from tsdf_bench.imageio import read_image_uint8
    from tsdf_bench_plugins.detectors.mtcnn import MTCNNDetector

    size, faces = 128, [f for f in embedded.read_faces_csv() if f["source"].startswith(("skimage:a", "matplotlib"))]
    images = []
    for f in faces:
        canvas = embedded._face_canvas(read_image_uint8(embedded.locate_source(f["source"])), f["box"], size)
        m = (canvas.size[0] - size) // 2
        images.append(torch.tensor(np.array(canvas.crop((m, m, m + size, m + size)))))
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    result = DataPreparation(MTCNNDetector(), size, crop="frame")(x)
    assert result.kept.tolist() == list(range(len(faces)))
    whole = torch.tensor([0.0, 0.0, size, size])
    assert (result.crop_boxes - whole).abs().max() < 0.05 * size  # within ~6 px at 128 px
    margin = DataPreparation(MTCNNDetector(), size, crop="margin")(x)
    assert (margin.crop_boxes - whole).abs().max() > 0.1 * size  # the old crop zooms in


def test_crop_like_cuts_another_version_with_the_same_geometry(retina):
    prep = DataPreparation(retina, 32, crop="frame")
    x = batch()
    result = prep(x)
    assert torch.equal(prep.crop_like(x, result), result.crops)
    brighter = (x + 0.1).clamp(-1, 1)
    assert prep.crop_like(brighter, result).shape == result.crops.shape


def test_bad_configuration_is_named(retina):
    with pytest.raises(ConfigError, match="crop"):
        DataPreparation(retina, 64, crop="center")
    from tsdf_bench_plugins.detectors.cascades import HaarDetector

    with pytest.raises(ConfigError, match="landmarks"):
        DataPreparation(HaarDetector(), 64, crop="align")(to_tensor(portrait_arrays()["astronaut"]))


def test_prep_is_differentiable(retina):
    x = batch().requires_grad_()
    result = DataPreparation(retina, 32)(x)
    result.crops.sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1:].abs().sum() == 0


@pytest.mark.parametrize("crop", ["frame", "align"])
def test_in_batches_gives_the_whole_sets_result(retina, crop):
    """Prepared two photos at a time, the faces, failures, boxes and crops are those of the whole
    set at once (indices of the whole set), written into the given tensor; crop_like alike."""
    x = torch.cat([batch(), batch().flip(0)])  # face, noise, zeros, zeros, noise, face
    prep = DataPreparation(retina, 32, crop=crop)
    whole = prep(x)
    made = []

    def new_crops(shape):
        made.append(torch.full(shape, 7.0))
        return made[-1]

    parts = prep.in_batches(x, 2, new_crops)
    assert parts.kept.tolist() == whole.kept.tolist() == [0, 5]
    assert parts.failures == whole.failures and set(parts.failures) == {1, 2, 3, 4}
    assert len(made) == 1 and made[0].shape == (6, 3, 32, 32) and parts.crops.data_ptr() == made[0].data_ptr()
    torch.testing.assert_close(parts.crops, whole.crops, atol=1e-4, rtol=0)
    torch.testing.assert_close(parts.boxes, whole.boxes, atol=1e-3, rtol=0)
    assert (parts.landmarks is None) == (whole.landmarks is None)
    other = x.flip(-1)  # another version of the same photos, cut with the same geometry
    torch.testing.assert_close(prep.crop_like_in_batches(other, parts, 2), prep.crop_like(other, whole), atol=1e-4, rtol=0)
    one = prep.in_batches(x, 64)  # one batch: exactly the whole set's result
    assert torch.equal(one.crops, whole.crops) and torch.equal(one.boxes, whole.boxes)
    none = prep.in_batches(x[1:3], 1)
    assert none.crops.shape == (0, 3, 32, 32) and none.kept.numel() == 0 and set(none.failures) == {0, 1}
    assert prep.crop_like_in_batches(x[1:3], none, 1).shape == (0, 3, 32, 32)
