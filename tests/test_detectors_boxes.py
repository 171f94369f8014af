import torch

from tsdf_bench.detectors.boxes import box_iou, decode_center_offsets, nms, square_boxes


def test_nms_keeps_best_of_overlapping_and_disjoint():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5, mode="min", plus_one=True).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]


def test_iou_decode_square():
    a = torch.tensor([[0.0, 0, 10, 10]])
    assert abs(box_iou(a, torch.tensor([[5.0, 0, 15, 10]])).item() - 1 / 3) < 1e-6
    pri = torch.tensor([[10.0, 10, 4, 4]])
    assert decode_center_offsets(torch.zeros(1, 4), pri).tolist() == [[8, 8, 12, 12]]
    assert square_boxes(torch.tensor([[0.0, 0, 4, 2]]), 0.5).tolist() == [[-1, -2, 5, 4]]


def test_registry_lists_the_built_in_detectors():
    from tsdf_bench.plugins import Registry

    assert {"mtcnn", "retinaface", "haar", "lbp", "s3fd", "dsfd"} <= set(Registry().names("detector"))
