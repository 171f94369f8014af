"""Fake plugins that count their calls, for tests/test_speed.py (the speed switch's code paths).

Loaded next to tests/harness_fakes with ``Registry(plugins_dirs=[harness_fakes, speed_fakes])``.
The counters are class attributes (``FakeBatchedGAN.calls``, ``FakeCountingDetector.calls``);
read them through ``type(registry.create(...))`` since the module is imported per registry.
"""
import torch
from torch import nn

from tsdf_bench import DefenseEntry, DetectorEntry, ModelEntry, hookimpl
from tsdf_bench.detectors.base import Detections, FaceDetector
from tsdf_bench.models.base import DeepfakeModel


class FakeBatchedGAN(DeepfakeModel):
    """A 3x3-conv 'generator' with three targets and a batched ``generate_all`` (like the plugins)."""

    attributes = ("Male", "Young")
    calls = {"generate": 0, "batched": 0, "images": 0, "single_image": 0}

    def __init__(self, scale="smoke", name="fake-batched-gan", image_size=16):
        super().__init__(scale, image_size)
        self.name = name
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(5, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 5, 3, 3, generator=g) * 0.3)
            self.conv.bias.zero_()

    def conditions(self, attrs):
        return [1 - attrs, attrs, attrs.flip(1)]

    def _forward(self, x, cond):
        self.calls["images"] += x.shape[0]
        self.calls["single_image"] += int(x.shape[0] == 1)
        c = cond[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return torch.tanh(self.conv(torch.cat([x, c], 1)))

    def generate(self, x, condition):
        self.calls["generate"] += 1
        return self._forward(x, condition)

    def generate_all(self, x, attrs):
        self.calls["batched"] += 1
        conds = torch.stack(self.conditions(attrs))  # [T, B, A]
        t, b = conds.shape[:2]
        xs = x.unsqueeze(0).expand(t, *x.shape).reshape(t * b, *x.shape[1:])
        out = self._forward(xs, conds.reshape(t * b, -1))
        return out.view(t, b, *out.shape[1:]).transpose(0, 1)

    def encode(self, x):
        return self.conv(torch.cat([x, x[:, :2]], 1))


class FakeCountingDetector(FaceDetector):
    """One central box that moves with the image's mean; counts the images it is asked about."""

    name = "fake-count-det"
    differentiable = False
    calls = {"detect": 0, "images": 0}

    def detect(self, images):
        self.calls["detect"] += 1
        self.calls["images"] += images.shape[0]
        h, w = images.shape[-2:]
        out = []
        for img in images:
            shift = float(img.mean().clamp(-1, 1)) * 0.1 * w
            out.append(Detections(torch.tensor([[w * 0.2 + shift, h * 0.2, w * 0.8 - shift, h * 0.8]]),
                                  torch.tensor([0.9])))
        return out


def _pgd(**kw):
    from tsdf_bench_plugins.defenses.pgd import PGD

    return PGD(**kw)


@hookimpl
def register_models(register):
    register(ModelEntry("fake-batched-gan", "A counting fake generator with batched targets.", FakeBatchedGAN))


@hookimpl
def register_detectors(register):
    register(DetectorEntry("fake-count-det", "A counting fake detector.", FakeCountingDetector))


@hookimpl
def register_defenses(register):
    register(DefenseEntry("fake-pgd", "The real per-image PGD, under a fake name.", _pgd))
