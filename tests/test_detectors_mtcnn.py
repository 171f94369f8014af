import numpy as np
import pytest
import torch

from detector_fixtures import FACE_BOXES, face_crop, portrait_arrays, to_tensor
from tsdf_bench.detectors.boxes import box_iou


@pytest.fixture(scope="module")
def mtcnn():
    from tsdf_bench_plugins.detectors.mtcnn import MTCNNDetector

    return MTCNNDetector()


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_finds_exactly_the_face(mtcnn, name):
    det = mtcnn.detect(to_tensor(portrait_arrays()[name]))[0]
    assert len(det) == 1
    assert box_iou(det.boxes, torch.tensor([FACE_BOXES[name]], dtype=torch.float32)).item() > 0.8
    assert det.landmarks.shape == (1, 5, 2)
    assert det.scores[0] > 0.99


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_matches_facenet_pytorch_pipeline(mtcnn, name):
    facenet = pytest.importorskip("facenet_pytorch")
    ref = facenet.MTCNN(keep_all=True, device="cpu")
    image = portrait_arrays()[name]
    boxes, probs, points = ref.detect(image, landmarks=True)
    det = mtcnn.detect(to_tensor(image))[0]
    assert det.boxes.shape == boxes.shape
    np.testing.assert_allclose(det.boxes.numpy(), boxes.astype(np.float32), atol=2.0)
    np.testing.assert_allclose(det.landmarks.numpy(), points.astype(np.float32), atol=2.0)


def test_forward_attack_gradients_reach_the_input(mtcnn):
    x, _ = face_crop("astronaut", 128)
    x = x.repeat(2, 1, 1, 1).requires_grad_()
    out = mtcnn.forward_attack(x)
    assert out.scores.shape[0] == 2 and out.boxes.shape == (*out.scores.shape, 4)
    assert len(out.features) >= 3 and out.features[0].dim() == 4
    # the last two scores are R-Net's and O-Net's on the detected face: both confident
    assert (out.scores[:, -2:] > 0.9).all()
    out.scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rnet_onet_scores_alone_have_gradients(mtcnn):
    x, _ = face_crop("grace_hopper", 128)
    x.requires_grad_()
    out = mtcnn.forward_attack(x)
    out.scores[:, -1].sum().backward()  # O-Net's score only
    assert x.grad.abs().sum() > 0


def test_blank_image_has_no_face_and_bad_input_is_named(mtcnn):
    assert len(mtcnn.detect(torch.zeros(1, 3, 96, 96))[0]) == 0
    with pytest.raises(ValueError, match="mtcnn"):
        mtcnn.detect(torch.zeros(1, 1, 96, 96))
    with pytest.raises(ValueError, match="min_face_size"):
        type(mtcnn)(min_face_size=5)
