"""Box utilities shared by the detector plugins and the attacker's data preparation.

Boxes are ``[N, 4]`` float tensors ``x1, y1, x2, y2`` in pixels.  Everything here is plain
torch (no torchvision), so it is differentiable where it makes sense (decoding) and cheap to
import.
"""
from __future__ import annotations

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, M]`` of two sets of xyxy boxes."""
    a, b = a.reshape(-1, 4).float(), b.reshape(-1, 4).float()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, mode: str = "union",
        plus_one: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    ``mode="union"`` is the usual IoU; ``mode="min"`` divides the intersection by the smaller
    area (MTCNN's last stage).  ``plus_one`` counts box sides as ``x2 - x1 + 1`` (the MTCNN
    convention of inclusive pixel boxes).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes, scores = boxes.detach().float(), scores.detach().float()
    if mode == "union" and not plus_one:
        try:  # the compiled kernel when torchvision is importable (same greedy result)
            from torchvision.ops import nms as tv_nms

            return tv_nms(boxes, scores, iou_threshold)
        except (ImportError, RuntimeError):
            pass
    add = 1.0 if plus_one else 0.0
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + add) * (y2 - y1 + add)
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + add).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + add).clamp(min=0)
        inter = w * h
        if mode == "min":
            overlap = inter / torch.minimum(areas[i], areas[rest]).clamp(min=1e-9)
        else:
            overlap = inter / (areas[i] + areas[rest] - inter).clamp(min=1e-9)
        order = rest[overlap <= iou_threshold]
    return torch.stack(keep)


def batched_nms(boxes, scores, groups, iou_threshold, mode="union", plus_one=False):
    """NMS run independently inside each group (e.g. image index); kept indices by score."""
    keep = []
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        keep.append(idx[nms(boxes[idx], scores[idx], iou_threshold, mode, plus_one)])
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = torch.cat(keep)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def decode_center_offsets(loc: torch.Tensor, priors: torch.Tensor, variances=(0.1, 0.2)) -> torch.Tensor:
    """SSD-style decoding: ``loc [..., A, 4]`` offsets against ``priors [A, 4]`` (cx, cy, w, h)
    to xyxy boxes in the priors' units.  Differentiable in ``loc``."""
    centers = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variance: float = 0.1) -> torch.Tensor:
    """Decode ``pre [..., A, 10]`` landmark offsets to ``[..., A, 5, 2]`` points."""
    pts = pre.reshape(*pre.shape[:-1], 5, 2)
    return priors[..., None, :2] + pts * variance * priors[..., None, 2:]


def square_boxes(boxes: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Squares around the boxes' centres with side ``max(w, h) * (1 + margin)``."""
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    side = torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]) * (1 + margin)
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=-1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                        boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], dim=-1)
