"""DSFD (Li et al., "DSFD: Dual Shot Face Detector", CVPR 2019), ResNet-152 variant.

ResNet-152 (conv3_3 .. fc7 = layer1 .. layer4) plus two extra stride-2 blocks; a feature pyramid
that multiplies each lateral map by the upsampled (bilinear, align_corners) higher map; a Feature
Enhance Module (FEM: dilated 3x3 branches, 256 + 128 + 128 channels) on each of the six sources;
deep heads (three 3x3 convs + 1x1) with max-in-out on the class scores; progressive anchors
(one 1.5-aspect anchor per cell, 16..512 px, strides 4..128).  Only the second shot (the
enhanced features) is used at test time, as in the paper.

State-dict keys follow ``hukkelas/DSFD-Pytorch-Inference`` (the ``face-detection`` package),
whose ``WIDERFace_DSFD_RES152.pth`` loads as is.  The official Tencent release uses other key
names and is not supported.  Pass ``checkpoint=PATH`` or set ``TSDF_BENCH_DSFD``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.detectors.common import load_state_dict_file, load_strict, resolve_checkpoint
from tsdf_bench.detectors.ssd import SSDFaceDetector

from .s3fd import ssd_priors

ENV_VAR = "TSDF_BENCH_DSFD"
WHERE = ("use WIDERFace_DSFD_RES152.pth, the ResNet-152 DSFD checkpoint that the 'face-detection' "
         "package (github.com/hukkelas/DSFD-Pytorch-Inference) downloads, fetched on a machine with "
         "internet access.")
STEPS = (4, 8, 16, 32, 64, 128)
ANCHORS = (16, 32, 64, 128, 256, 512)
ASPECT = 1.5
RESNET152 = (3, 8, 36, 3)


class FEM(nn.Module):
    """Feature Enhance Module: one 3x3 branch and dilated cascades -> 512 channels."""

    def __init__(self, cin):
        super().__init__()
        self.cpm1 = nn.Conv2d(cin, 256, 3, padding=1)
        self.cpm2 = nn.Conv2d(cin, 256, 3, dilation=2, padding=2)
        self.cpm3 = nn.Conv2d(256, 128, 3, padding=1)
        self.cpm4 = nn.Conv2d(256, 128, 3, dilation=2, padding=2)
        self.cpm5 = nn.Conv2d(128, 128, 3, padding=1)

    def forward(self, x):
        b = F.relu(self.cpm2(x))
        return torch.cat([F.relu(self.cpm1(x)), F.relu(self.cpm3(b)), F.relu(self.cpm5(F.relu(self.cpm4(b))))], 1)


class DeepHead(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = min(cin, 256)
        self.conv1, self.conv2 = nn.Conv2d(cin, mid, 3, padding=1), nn.Conv2d(mid, mid, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(mid, mid, 3, padding=1), nn.Conv2d(mid, cout, 1)

    def forward(self, x):
        return self.conv4(F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))))


def _extra(cin, mid, cout):
    return nn.Sequential(nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, cout, 3, padding=1, stride=2), nn.BatchNorm2d(cout), nn.ReLU())


class DSFDNet(nn.Module):
    def __init__(self, resnet_layers=RESNET152):
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        resnet = ResNet(Bottleneck, list(resnet_layers))
        self.layer1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
        self.layer2 = nn.Sequential(resnet.layer2)
        self.layer3 = nn.Sequential(resnet.layer3)
        self.layer4 = nn.Sequential(resnet.layer4)
        self.layer5 = _extra(2048, 512, 512)
        self.layer6 = _extra(512, 128, 256)
        ch = (256, 512, 1024, 2048, 512, 256)
        self.latlayer3, self.latlayer2, self.latlayer1 = (nn.Conv2d(ch[3], ch[2], 1), nn.Conv2d(ch[2], ch[1], 1),
                                                          nn.Conv2d(ch[1], ch[0], 1))
        self.smooth3, self.smooth2, self.smooth1 = (nn.Conv2d(ch[2], ch[2], 1), nn.Conv2d(ch[1], ch[1], 1),
                                                    nn.Conv2d(ch[0], ch[0], 1))
        self.cpm3_3, self.cpm4_3, self.cpm5_3 = FEM(ch[0]), FEM(ch[1]), FEM(ch[2])
        self.cpm7, self.cpm6_2, self.cpm7_2 = FEM(ch[3]), FEM(ch[4]), FEM(ch[5])
        self.loc = nn.ModuleList([DeepHead(512, 4 * min(k + 1, 3)) for k in range(6)])
        self.conf = nn.ModuleList([DeepHead(512, 2 + 2 * min(k + 1, 3)) for k in range(6)])

    @staticmethod
    def _up_mul(top, lateral):
        return lateral * F.interpolate(top, size=lateral.shape[2:], mode="bilinear", align_corners=True)

    def forward(self, x):
        height, width = x.shape[2:]
        c3 = self.layer1(x)
        c4 = self.layer2(c3)
        c5 = self.layer3(c4)
        fc7 = self.layer4(c5)
        c6 = self.layer5(fc7)
        c7 = self.layer6(c6)
        p5 = self._up_mul(self.latlayer3(fc7), self.smooth3(c5))
        p4 = self._up_mul(self.latlayer2(p5), self.smooth2(c4))
        p3 = self._up_mul(self.latlayer1(p4), self.smooth1(c3))
        sources = [self.cpm3_3(p3), self.cpm4_3(p4), self.cpm5_3(p5), self.cpm7(fc7), self.cpm6_2(c6), self.cpm7_2(c7)]
        b = x.shape[0]
        locs, confs = [], []
        for k, src in enumerate(sources):
            locs.append(self.loc[k](src)[:, :4].permute(0, 2, 3, 1).reshape(b, -1, 4))
            c = self.conf[k](src)
            face_max = c[:, :3].max(1, keepdim=True).values  # max-in-out over 3 channels
            c = torch.cat([face_max, c[:, 3:4]] if k == 0 else [c[:, 3:4], face_max], 1)
            confs.append(c.permute(0, 2, 3, 1).reshape(b, -1, 2))
        priors = ssd_priors([s.shape[2:] for s in sources], STEPS, ANCHORS, height, width, aspect=ASPECT, clip=True)
        return sources, torch.cat(confs, 1), torch.cat(locs, 1), priors


class DSFDDetector(SSDFaceDetector):
    """DSFD (ResNet-152) from a local checkpoint.  Args: ``checkpoint=None`` (else
    ``$TSDF_BENCH_DSFD``), ``score_threshold=0.5``, ``nms_threshold=0.3``, ``min_size=0``,
    ``resnet_layers=(3, 8, 36, 3)`` (blocks per ResNet stage; change only for tests), ``device=None``."""

    name = "dsfd"
    differentiable = True

    def __init__(self, checkpoint=None, score_threshold: float = 0.5, nms_threshold: float = 0.3,
                 min_size: int = 0, resnet_layers=RESNET152, device=None):
        super().__init__()
        path = resolve_checkpoint(checkpoint, ENV_VAR, self.name, WHERE)
        self.net = DSFDNet(resnet_layers)
        load_strict(self.net, load_state_dict_file(path, self.name), path, self.name)
        self.checkpoint = str(path)
        self._setup(score_threshold, nms_threshold, min_size, device)
