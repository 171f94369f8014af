import pytest
import torch

from detector_fixtures import FACE_BOXES, face_crop, portrait_arrays, to_tensor
from tsdf_bench.detectors.boxes import box_iou
from tsdf_bench.errors import ConfigError
from tsdf_bench.prep import DataPreparation, crop_ious, crop_match_rate


@pytest.fixture(scope="module")
def retina():
    from tsdf_bench_plugins.detectors.retinaface import RetinaFaceDetector

    return RetinaFaceDetector()


def batch():
    torch.manual_seed(0)
    face, _ = face_crop("astronaut", 128)
    noise = torch.rand(1, 3, 128, 128) * 2 - 1
    return torch.cat([face, noise, torch.zeros(1, 3, 128, 128)])


@pytest.mark.parametrize("crop", ["margin", "align"])
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


def test_crop_match_rate(retina):
    prep = DataPreparation(retina, 32)
    x = batch()
    clean = prep(x)
    assert crop_match_rate(clean, prep(x)) == 1.0
    blanked = x.clone()
    blanked[0] = 0
    assert crop_ious(clean, prep(blanked)) == {0: 0.0}
    assert crop_match_rate(clean, prep(blanked)) == 0.0


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
