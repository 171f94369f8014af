"""Fake 256 px generators for the peak-RSS benchmark (``benchmarks/test_bench_memory.py``).

Each is a 1x1 convolution (no compute to speak of) with the paper models' input size and number
of protocol targets, so a run holds tensors of the paper path's sizes: ``mem-stargan`` and
``mem-attentiongan`` 5 targets, ``mem-hisd`` 1 (AttGAN's 14 would need several GB at the larger
n_eval on a small machine).  Loaded with ``--plugins-dir`` beside ``tests/harness_fakes``.
"""
import torch
from torch import nn

from tsdf_bench import ModelEntry, hookimpl
from tsdf_bench.models.base import DeepfakeModel


class MemGAN(DeepfakeModel):
    attributes = ("Male", "Young")

    def __init__(self, scale="smoke", name="mem", targets=5, image_size=256):
        super().__init__(scale, image_size)
        self.name, self.targets = name, int(targets)
        g = torch.Generator().manual_seed(len(name))
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 3, 1, 1, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(3, generator=g) * 0.1)

    def conditions(self, attrs):
        return [attrs * (t + 1) / self.targets for t in range(self.targets)]

    def generate(self, x, condition):
        return torch.tanh(self.conv(x) + condition.sum(1)[:, None, None, None] * 0.4)

    def encode(self, x):
        return self.conv(x)


@hookimpl
def register_models(register):
    for name, targets in (("mem-stargan", 5), ("mem-attentiongan", 5), ("mem-hisd", 1)):
        register(ModelEntry(name, f"A fake 256 px generator with {targets} targets.",
                            lambda targets=targets, name=name, **kw: MemGAN(name=name, targets=targets, **kw)))
