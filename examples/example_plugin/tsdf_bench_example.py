"""An example tsdf-bench plugin: a checkerboard defense and a perturbation-energy metric.

Install it (``pip install examples/example_plugin``) and it appears in ``tsdf-bench plugins``;
or try it unpackaged with ``tsdf-bench --plugins-dir examples/example_plugin plugins``.
"""
import torch

from tsdf_bench import DefenseEntry, MetricEntry, hookimpl
from tsdf_bench.defenses import Defense


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


@hookimpl
def register_defenses(register):
    register(DefenseEntry("example-checkerboard", "Checkerboard of +-eps (example plugin).", CheckerboardDefense))


@hookimpl
def register_metrics(register):
    register(MetricEntry("example-energy", "Mean squared perturbation (example plugin).", PerturbationEnergy))
