"""MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016) with the P/R/O-Net weights shipped in facenet-pytorch.

The three nets are defined here in torch (same state_dict keys as facenet-pytorch) and load
``facenet_pytorch/data/{pnet,rnet,onet}.pt`` from the installed wheel; facenet-pytorch itself is
never imported.

* :meth:`MTCNNDetector.detect` is the attacker's usual non-differentiable cascade (image pyramid
  with ``factor`` 0.709 from ``min_face_size`` 20, P-Net + NMS, R-Net, O-Net with 5 landmarks,
  thresholds 0.6/0.7/0.7), numerically the facenet-pytorch pipeline.
* :meth:`MTCNNDetector.forward_attack` is a differentiable path for poisoning attacks: P-Net on
  every pyramid scale (``F.interpolate`` with area resampling, as the cascade uses), and R-Net /
  O-Net on bilinear ``roi_align``-style crops (``grid_sample``) at boxes found by the
  non-differentiable pass (treated as constants).  Scores of all three stages pass gradients to
  the input.

Small inputs: faces below ``min_face_size`` pixels are not searched for; ``upscale_to`` (default
0 = off) first upsamples images whose short side is below it, and the boxes are mapped back.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.detectors.align import bilinear_crops
from tsdf_bench.detectors.base import Detections, DetectorOutput, FaceDetector
from tsdf_bench.detectors.boxes import batched_nms
from tsdf_bench.detectors.common import check_images, to_pixels
from tsdf_bench.errors import CheckpointError


def _weights_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("detector 'mtcnn' needs the MTCNN weights shipped in facenet-pytorch: "
                              "pip install --no-deps facenet-pytorch==2.6.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        """-> (box regression [B,4,h,w], face logits [B,2,h,w], feature map [B,32,h,w])."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        feat = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(feat), self.conv4_1(feat), feat


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        """-> (box regression [N,4], face logits [N,2], feature [N,128])."""
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # Caffe order
        feat = self.prelu4(self.dense4(x))
        return self.dense5_2(feat), self.dense5_1(feat), feat


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, landmarks, face logits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        """-> (box regression [N,4], landmarks [N,10] (x1..x5, y1..y5), face logits [N,2], feature [N,256])."""
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        feat = self.prelu5(self.dense5(x))
        return self.dense6_2(feat), self.dense6_3(feat), self.dense6_1(feat), feat


def _normalise(pixels):
    """MTCNN's input scaling of 0..255 pixels."""
    return (pixels - 127.5) * 0.0078125


def _rerec(boxes):
    """Squares around the boxes (MTCNN's ``rerec``), in place on a copy."""
    boxes = boxes.clone()
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _bbreg(boxes, reg):
    """Apply box regression (offsets relative to inclusive box sides)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return torch.stack([boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
                        boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h], dim=1)


def _crop_resize(pixels, image_inds, boxes, size):
    """Integer crops clipped to the image (MTCNN's ``pad``), area-resized to ``size``."""
    h, w = pixels.shape[2:]
    b = boxes.trunc().long()
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
    crops, valid = [], []
    for k in range(len(b)):
        if ey[k] > y[k] - 1 and ex[k] > x[k] - 1:
            crop = pixels[image_inds[k], :, y[k] - 1:ey[k], x[k] - 1:ex[k]].unsqueeze(0)
            crops.append(F.interpolate(crop, size=(size, size), mode="area"))
            valid.append(k)
    if not crops:
        return pixels.new_zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return torch.cat(crops), torch.tensor(valid, dtype=torch.long)


class MTCNNDetector(FaceDetector):
    """MTCNN with facenet-pytorch's shipped weights (see the module docstring).

    Args (defaults as facenet-pytorch): ``min_face_size=20``, ``thresholds=(0.6, 0.7, 0.7)``,
    ``factor=0.709``, ``upscale_to=0`` (upsample images whose short side is smaller, before
    detection; 0 = never), ``refine_per_image=1`` (boxes per image given to R-Net/O-Net in
    :meth:`forward_attack`), ``device=None``.
    """

    name = "mtcnn"
    differentiable = True

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 upscale_to: int = 0, refine_per_image: int = 1, device=None):
        super().__init__()
        if min_face_size < 12:
            raise ValueError(f"mtcnn: min_face_size must be >= 12 (P-Net's window), got {min_face_size}")
        if not 0 < factor < 1:
            raise ValueError(f"mtcnn: factor must be in (0, 1), got {factor}")
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor
        self.upscale_to, self.refine_per_image = int(upscale_to), int(refine_per_image)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        folder = _weights_dir()
        for net, file in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            path = folder / file
            if not path.is_file():
                raise CheckpointError(f"mtcnn: {path} is missing; reinstall facenet-pytorch==2.6.0")
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    # -- helpers -----------------------------------------------------------------------------
    def _upscale(self, images):
        h, w = images.shape[2:]
        if self.upscale_to and min(h, w) < self.upscale_to:
            s = self.upscale_to / min(h, w)
            size = (round(h * s), round(w * s))
            return F.interpolate(images, size=size, mode="bilinear", align_corners=False), (size[1] / w, size[0] / h)
        return images, (1.0, 1.0)

    def scales(self, height: int, width: int) -> list[float]:
        """The image pyramid's scales (facenet-pytorch's rule)."""
        m = 12.0 / self.min_face_size
        minl = min(height, width) * m
        scales, s = [], m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor
        return scales

    def _pnet_stage(self, pixels):
        """P-Net on the pyramid: candidate boxes [N, 9] (x1,y1,x2,y2,score,reg4) and image indices."""
        h, w = pixels.shape[2:]
        all_boxes, all_inds = [], []
        for scale in self.scales(h, w):
            data = F.interpolate(pixels, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, logits, _ = self.pnet(_normalise(data))
            probs = logits.softmax(1)[:, 1]
            mask = probs >= self.thresholds[0]
            idx = mask.nonzero()
            if idx.numel() == 0:
                continue
            bb = idx[:, 1:].to(pixels.dtype).flip(1)  # (x, y) cell
            q1 = ((2 * bb + 1) / scale).floor()
            q2 = ((2 * bb + 12) / scale).floor()
            r = reg.permute(1, 0, 2, 3)[:, mask].T
            boxes = torch.cat([q1, q2, probs[mask][:, None], r], dim=1)
            pick = batched_nms(boxes[:, :4], boxes[:, 4], idx[:, 0], 0.5)
            all_boxes.append(boxes[pick])
            all_inds.append(idx[pick, 0])
        if not all_boxes:
            return pixels.new_zeros(0, 9), torch.zeros(0, dtype=torch.long)
        boxes, inds = torch.cat(all_boxes), torch.cat(all_inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        reg = torch.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                           boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh], dim=1)
        return torch.cat([_rerec(reg), boxes[:, 4:5]], dim=1), inds

    # -- the attacker's pipeline -------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[Detections]:
        images = check_images(images, self.name)
        batch = images.shape[0]
        work, (sx, sy) = self._upscale(images.float())
        pixels = to_pixels(work)
        boxes, inds = self._pnet_stage(pixels)
        points = pixels.new_zeros(0, 5, 2)
        if len(boxes):  # R-Net
            crops, valid = _crop_resize(pixels, inds, boxes, 24)
            boxes, inds = boxes[valid], inds[valid]
            reg, logits, _ = self.rnet(_normalise(crops))
            score = logits.softmax(1)[:, 1]
            ok = score > self.thresholds[1]
            boxes, inds, reg, score = boxes[ok, :4], inds[ok], reg[ok], score[ok]
            pick = batched_nms(boxes, score, inds, 0.7)
            boxes = _rerec(_bbreg(boxes[pick], reg[pick]))
            boxes, inds = torch.cat([boxes, score[pick, None]], 1), inds[pick]
        if len(boxes):  # O-Net
            crops, valid = _crop_resize(pixels, inds, boxes, 48)
            boxes, inds = boxes[valid], inds[valid]
            reg, lms, logits, _ = self.onet(_normalise(crops))
            score = logits.softmax(1)[:, 1]
            ok = score > self.thresholds[2]
            boxes, inds, reg, lms, score = boxes[ok, :4], inds[ok], reg[ok], lms[ok], score[ok]
            wi = boxes[:, 2] - boxes[:, 0] + 1
            hi = boxes[:, 3] - boxes[:, 1] + 1
            points = torch.stack([wi[:, None] * lms[:, :5] + boxes[:, 0:1] - 1,
                                  hi[:, None] * lms[:, 5:] + boxes[:, 1:2] - 1], dim=-1)
            boxes = _bbreg(boxes, reg)
            pick = batched_nms(boxes, score, inds, 0.7, mode="min", plus_one=True)
            boxes, score, inds, points = boxes[pick], score[pick], inds[pick], points[pick]
            boxes = torch.cat([boxes, score[:, None]], 1)
        scale = boxes.new_tensor([sx, sy, sx, sy])
        out = []
        for b in range(batch):
            sel = inds == b if len(boxes) else torch.zeros(0, dtype=torch.bool)
            bx = boxes[sel] if len(boxes) else boxes.new_zeros(0, 5)
            pts = points[sel] if len(boxes) else points
            out.append(Detections(boxes=(bx[:, :4] / scale).cpu(), scores=bx[:, 4].cpu(),
                                  landmarks=(pts / scale[:2]).cpu()))
        return out

    # -- the differentiable view -------------------------------------------------------------
    def forward_attack(self, images: torch.Tensor, refine_boxes: list[torch.Tensor] | None = None) -> DetectorOutput:
        """Differentiable features, scores and boxes.

        ``features``: P-Net's last feature map at each pyramid scale, then R-Net's and O-Net's
        dense features reshaped to ``[B, C*K, 1, 1]``.  ``scores [B, A]``: P-Net face
        probabilities at every cell of every scale, then the R-Net and O-Net probabilities of
        the ``refine_per_image`` (K) refine boxes.  ``boxes [B, A, 4]``: the regressed boxes of
        the same candidates.  ``refine_boxes`` (list of ``[K, 4]`` per image) defaults to the
        top-K detections of :meth:`detect` on the detached input; missing ones are filled with
        a centred square of 80% of the short side (where a portrait's face would be).
        """
        images = check_images(images, self.name)
        batch, _, h0, w0 = images.shape
        work, (sx, sy) = self._upscale(images)
        pixels = to_pixels(work)
        h, w = pixels.shape[2:]
        feats, scores, boxes = [], [], []
        for scale in self.scales(h, w):
            data = F.interpolate(pixels, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, logits, feat = self.pnet(_normalise(data))
            feats.append(feat)
            scores.append(logits.softmax(1)[:, 1].flatten(1))
            gy, gx = torch.meshgrid(torch.arange(reg.shape[2], device=reg.device),
                                    torch.arange(reg.shape[3], device=reg.device), indexing="ij")
            x1 = (2 * gx + 1).to(reg.dtype) / scale
            y1 = (2 * gy + 1).to(reg.dtype) / scale
            x2, y2 = (2 * gx + 12).to(reg.dtype) / scale, (2 * gy + 12).to(reg.dtype) / scale
            bw, bh = x2 - x1, y2 - y1
            cand = torch.stack([x1 + reg[:, 0] * bw, y1 + reg[:, 1] * bh, x2 + reg[:, 2] * bw, y2 + reg[:, 3] * bh], -1)
            boxes.append(cand.flatten(1, 2))
        if refine_boxes is None:
            dets = self.detect(images.detach())
            refine_boxes = [d.boxes[torch.argsort(d.scores, descending=True)[: self.refine_per_image]] for d in dets]
        k = self.refine_per_image
        side = 0.8 * min(h0, w0)
        fallback = torch.tensor([(w0 - side) / 2, (h0 - side) / 2, (w0 + side) / 2, (h0 + side) / 2])
        rows = []
        for b in range(batch):
            given = torch.as_tensor(refine_boxes[b], dtype=torch.float32).reshape(-1, 4)[:k].cpu()
            fill = fallback.expand(k - len(given), 4)
            rows.append(torch.cat([torch.full((k, 1), float(b)), torch.cat([given, fill]) *
                                   torch.tensor([sx, sy, sx, sy])], 1))
        rois = torch.cat(rows).to(pixels.device)
        rois[:, 1:] = _rerec(rois[:, 1:])
        # MTCNN crops span pixels x1-1 .. x2 (inclusive boxes, 1-based): continuous [x1-1, x2].
        crop_rois = rois.clone()
        crop_rois[:, 1:3] -= 1
        for net, size in ((self.rnet, 24), (self.onet, 48)):
            out = net(_normalise(bilinear_crops(pixels, crop_rois, size)))
            reg, logits, feat = out[0], out[-2], out[-1]
            scores.append(logits.softmax(1)[:, 1].reshape(batch, k))
            boxes.append(_bbreg(rois[:, 1:], reg).reshape(batch, k, 4))
            feats.append(feat.reshape(batch, -1, 1, 1))
        scale = pixels.new_tensor([sx, sy, sx, sy])
        return DetectorOutput(features=feats, scores=torch.cat(scores, 1), boxes=torch.cat(boxes, 1) / scale)
