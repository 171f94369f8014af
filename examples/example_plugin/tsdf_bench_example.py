"""An example tsdf-bench plugin: a checkerboard defense, a perturbation-energy metric and a toy model.

Install it (``pip install examples/example_plugin``) and it appears in ``tsdf-bench plugins``;
or try it unpackaged with ``tsdf-bench --plugins-dir examples/example_plugin plugins``.
"""
import torch

from tsdf_bench import DefenseEntry, MetricEntry, ModelEntry, hookimpl
from tsdf_bench.defenses import Defense
from tsdf_bench.models.base import DeepfakeModel


class CheckerboardDefense(Defense):
    """Adds ``+-eps`` in a checkerboard of ``period`` pixels: a content-blind baseline.

    Defaults: eps=0.05 on the [-1, 1] scale, period=2.  Not from any paper; it shows how
    little a defense needs: ``perturbation_for`` returns the additive perturbation, and
    ``Defense.protect`` enforces the budget and the image range.
    """

    name = "example-checkerboard"

    def __init__(self, eps=0.05, seed=0, device="cpu", period=2):
        super().__init__(eps, seed, device)
        self.period = int(period)

    def perturbation_for(self, images, attrs=None):
        h, w = images.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        board = ((yy // self.period + xx // self.period) % 2) * 2 - 1
        return (self.eps * board).to(images)[None, None]


class PerturbationEnergy:
    """Mean squared perturbation of the protected inputs (a metric plugin example)."""

    name = "example-energy"
    columns = ("energy",)

    def compute(self, batch):
        return {"energy": float(((batch.protected - batch.clean) ** 2).mean())}


class TintModel(DeepfakeModel):
    """A toy 'face editor' (a model plugin example): a 1x1 convolution whose output is tinted by the
    target attribute.  Not a real generator; it shows the interface a model needs to be attacked
    and measured at inference time (``conditions``, ``generate``).  Retraining rounds would also
    need ``losses`` and ``make_discriminator`` (see tsdf_bench/models/base.py)."""

    name = "example-tint"
    attributes = ("Blond_Hair",)

    def __init__(self, scale="demo", image_size=32):
        super().__init__(scale, image_size)
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None] * 0.9)
            self.conv.bias.zero_()

    def conditions(self, attrs):
        return [1 - attrs]  # one target: flip the attribute

    def generate(self, x, condition):
        return torch.tanh(self.conv(x) + 0.5 * condition[:, :1, None, None])


@hookimpl
def register_models(register):
    register(ModelEntry("example-tint", "A toy tinting model (example plugin).", TintModel))


@hookimpl
def register_defenses(register):
    register(DefenseEntry("example-checkerboard", "Checkerboard of +-eps (example plugin).", CheckerboardDefense))


@hookimpl
def register_metrics(register):
    register(MetricEntry("example-energy", "Mean squared perturbation (example plugin).", PerturbationEnergy))
