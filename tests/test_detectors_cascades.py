import pytest
import torch

from detector_fixtures import FACE_BOXES, portrait_arrays, to_tensor
from tsdf_bench.detectors.boxes import box_iou


@pytest.mark.parametrize("cls", ["HaarDetector", "LBPDetector"])
@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_finds_exactly_the_face(cls, name):
    from tsdf_bench_plugins.detectors import cascades

    det = getattr(cascades, cls)().detect(to_tensor(portrait_arrays()[name]))[0]
    assert len(det) == 1
    assert box_iou(det.boxes, torch.tensor([FACE_BOXES[name]], dtype=torch.float32)).item() > 0.6


def test_black_box_has_no_forward_attack():
    from tsdf_bench_plugins.detectors.cascades import HaarDetector

    haar = HaarDetector()
    assert not haar.differentiable
    with pytest.raises(NotImplementedError, match="black-box"):
        haar.forward_attack(torch.zeros(1, 3, 32, 32))
    assert len(haar.detect(torch.zeros(2, 3, 64, 64))) == 2
