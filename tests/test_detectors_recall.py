"""Detectors must find the face in demo-scale images: 128x128 crops where the face fills ~60%."""
import pytest
import torch

from detector_fixtures import face_crop
from tsdf_bench.detectors.boxes import box_iou


def demo_faces():
    images, boxes = [], []
    for name in ("astronaut", "grace_hopper"):
        for fill in (0.5, 0.6, 0.7):
            x, box = face_crop(name, 128, fill)
            images += [x, x.flip(3)]
            boxes += [box, torch.stack([128 - box[2], box[1], 128 - box[0], box[3]])]
    return torch.cat(images), boxes


@pytest.mark.parametrize("name", ["mtcnn", "retinaface", "haar", "lbp"])
def test_recall_on_128px_face_crops(name):
    from tsdf_bench.plugins import Registry

    detector = Registry().create("detector", name)
    images, boxes = demo_faces()
    dets = detector.detect(images)
    found = [len(d) > 0 and box_iou(d.boxes, gt).max().item() >= 0.4 for d, gt in zip(dets, boxes)]
    assert sum(found) / len(found) >= 0.95, found
