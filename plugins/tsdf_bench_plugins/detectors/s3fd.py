"""S3FD (Zhang et al., "S3FD: Single Shot Scale-invariant Face Detector", ICCV 2017).

VGG16 (conv1_1 .. conv5_3, pool5, dilated fc6 3x3/1024 and fc7 1x1/1024) with L2Norm (scales 10,
8, 5) on conv3_3, conv4_3 and conv5_3, two extra blocks (conv6_2, conv7_2), and 3x3 heads on six
sources at strides 4..128 with one square anchor each (16..512 px).  The first head's
background score is a max-out over 3 channels.  State-dict keys follow the widely used
re-implementation ``yxlijun/S3FD.pytorch`` (``vgg.N``, ``L2Norm3_3``, ``extras.N``, ``loc.N``,
``conf.N``), so its ``sfd_face.pth`` loads as is.

No weights ship in any installable package: pass ``checkpoint=PATH`` or set ``TSDF_BENCH_S3FD``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.detectors.common import load_state_dict_file, load_strict, resolve_checkpoint
from tsdf_bench.detectors.ssd import SSDFaceDetector

ENV_VAR = "TSDF_BENCH_S3FD"
WHERE = ("use sfd_face.pth from the README of github.com/yxlijun/S3FD.pytorch (VGG16 S3FD trained on "
         "WIDER FACE), downloaded on a machine with internet access.")
STEPS = (4, 8, 16, 32, 64, 128)
ANCHORS = (16, 32, 64, 128, 256, 512)
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512, "M")


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet)."""

    def __init__(self, channels, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x):
        return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * self.weight.view(1, -1, 1, 1)


def _vgg():
    layers, cin = [], 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return layers + [nn.Conv2d(512, 1024, 3, padding=6, dilation=6), nn.ReLU(), nn.Conv2d(1024, 1024, 1), nn.ReLU()]


def ssd_priors(sizes_hw, steps, anchors, height, width, aspect=1.0, clip=False):
    """One anchor per cell: (cx, cy, w, h) pixels, w = a / sqrt(aspect), h = a * sqrt(aspect)."""
    out = []
    for (fh, fw), step, a in zip(sizes_hw, steps, anchors):
        ys, xs = torch.meshgrid(torch.arange(fh, dtype=torch.float32), torch.arange(fw, dtype=torch.float32), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * step, (ys.flatten() + 0.5) * step
        w = torch.full_like(cx, a / aspect ** 0.5)
        h = torch.full_like(cx, a * aspect ** 0.5)
        pri = torch.stack([cx, cy, w, h], 1)
        if clip:  # the reference clamps normalised priors to [0, 1]
            pri = torch.minimum(pri, torch.tensor([width, height, width, height], dtype=torch.float32))
        out.append(pri)
    return torch.cat(out)


class S3FDNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.vgg = nn.ModuleList(_vgg())
        self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3 = L2Norm(256, 10), L2Norm(512, 8), L2Norm(512, 5)
        self.extras = nn.ModuleList([nn.Conv2d(1024, 256, 1), nn.Conv2d(256, 512, 3, 2, 1),
                                     nn.Conv2d(512, 128, 1), nn.Conv2d(128, 256, 3, 2, 1)])
        chans = (256, 512, 512, 1024, 512, 256)
        self.loc = nn.ModuleList([nn.Conv2d(c, 4, 3, padding=1) for c in chans])
        self.conf = nn.ModuleList([nn.Conv2d(c, 4 if i == 0 else 2, 3, padding=1) for i, c in enumerate(chans)])

    def forward(self, x):
        height, width = x.shape[2:]
        sources = []
        for lo, hi, norm in ((0, 16, self.L2Norm3_3), (16, 23, self.L2Norm4_3), (23, 30, self.L2Norm5_3)):
            for k in range(lo, hi):
                x = self.vgg[k](x)
            sources.append(norm(x))
        for k in range(30, len(self.vgg)):
            x = self.vgg[k](x)
        sources.append(x)
        for k, conv in enumerate(self.extras):
            x = F.relu(conv(x))
            if k % 2 == 1:
                sources.append(x)
        b = x.shape[0]
        locs, confs = [], []
        for i, src in enumerate(sources):
            c = self.conf[i](src)
            if i == 0:  # max-out background label
                c = torch.cat([c[:, :3].max(1, keepdim=True).values, c[:, 3:]], 1)
            confs.append(c.permute(0, 2, 3, 1).reshape(b, -1, 2))
            locs.append(self.loc[i](src).permute(0, 2, 3, 1).reshape(b, -1, 4))
        priors = ssd_priors([s.shape[2:] for s in sources], STEPS, ANCHORS, height, width)
        return sources, torch.cat(confs, 1), torch.cat(locs, 1), priors


class S3FDDetector(SSDFaceDetector):
    """S3FD from a local checkpoint.  Args: ``checkpoint=None`` (else ``$TSDF_BENCH_S3FD``),
    ``score_threshold=0.5``, ``nms_threshold=0.3``, ``min_size=0`` (upsample smaller images),
    ``device=None``."""

    name = "s3fd"
    differentiable = True

    def __init__(self, checkpoint=None, score_threshold: float = 0.5, nms_threshold: float = 0.3,
                 min_size: int = 0, device=None):
        super().__init__()
        path = resolve_checkpoint(checkpoint, ENV_VAR, self.name, WHERE)
        self.net = S3FDNet()
        load_strict(self.net, load_state_dict_file(path, self.name), path, self.name)
        self.checkpoint = str(path)
        self._setup(score_threshold, nms_threshold, min_size, device)
