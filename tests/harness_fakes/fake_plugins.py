"""Tiny fake plugins so the harness tests run without the real models, defenses and detectors.

Loaded with ``Registry(plugins_dirs=[this folder])`` or ``--plugins-dir``.  Names start with
``fake-`` so they never clash with the built-in plugins.  ``TSDF_FAKE_KILL_AFTER=N`` makes the
process SIGKILL itself when the metric is asked for its (N+1)-th cell (N cells are then stored);
``TSDF_FAKE_INTERRUPT_AFTER=N`` raises KeyboardInterrupt there instead.  Both count in the file
``TSDF_FAKE_COUNTER``.
"""
import copy
import os
import signal
from pathlib import Path

import torch
from torch import nn

from tsdf_bench import (AdaptationEntry, DefenseEntry, DetectorEntry, MetricEntry, ModelEntry, hookimpl)
from tsdf_bench.adaptations.base import Adaptation
from tsdf_bench.defenses.base import Defense, UniversalDefense
from tsdf_bench.detectors.base import Detections, FaceDetector
from tsdf_bench.models.base import DeepfakeModel


class FakeGAN(DeepfakeModel):
    """A 1x1 conv 'generator': each target adds the condition's sum to the conv output."""

    attributes = ("Male", "Young")

    def __init__(self, scale="smoke", name="fake-gan", image_size=16):
        super().__init__(scale, image_size)
        self.name = name
        g = torch.Generator().manual_seed(len(name))
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(3, 3, 1, 1, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(3, generator=g) * 0.1)

    def conditions(self, attrs):
        return [1 - attrs, attrs]

    def generate(self, x, condition):
        return torch.tanh(self.conv(x) + condition.sum(1)[:, None, None, None] * 0.4)

    def encode(self, x):
        return self.conv(x)


class FakeShift(UniversalDefense):
    """Universal: ``eps * sign(mean image)`` at 8x8 (then resized by the base class)."""

    name = "fake-shift"

    def __init__(self, eps=0.05, seed=0, device="cpu", strength=1.0):
        super().__init__(eps, seed, device)
        self.strength = strength

    def fit(self, images, attrs, models, detectors):
        super().fit(images, attrs, models, detectors)
        assert isinstance(attrs, dict) and set(attrs) == {m.name for m in models}
        small = torch.nn.functional.interpolate(images.mean(0, keepdim=True), size=(8, 8), mode="bilinear")
        noise = torch.rand(1, 3, 8, 8, generator=self.generator()) * 0.1
        self.perturbation = (self.strength * self.eps * torch.sign(small + noise - 0.05)).cpu()
        return self


class FakePerImage(Defense):
    """Per image: ``eps * sign(x)`` (no fit)."""

    name = "fake-perimage"

    def perturbation_for(self, images, attrs):
        return self.eps * torch.sign(images)


class FakeBroken(Defense):
    name = "fake-broken"

    def fit(self, images, attrs, models, detectors):
        raise RuntimeError("the fake defense failed on purpose")


class FakeDetector(FaceDetector):
    """One central box whose size shrinks with the image's mean brightness (so protection moves it)."""

    name = "fake-det"
    differentiable = False

    def detect(self, images):
        out = []
        h, w = images.shape[-2:]
        for img in images:
            shrink = float(img.mean().clamp(-1, 1)) * 0.1 * w
            box = torch.tensor([[w * 0.2 + shrink, h * 0.2, w * 0.8 - shrink, h * 0.8]])
            out.append(Detections(box, torch.tensor([0.95])))
        return out


class FakeBlindDetector(FakeDetector):
    """Finds no face in any image whose pixels average above ``threshold`` (-2: never finds one)."""

    name = "fake-blind"

    def __init__(self, threshold=-0.05):
        super().__init__()
        self.threshold = threshold

    def detect(self, images):
        dets = super().detect(images)
        return [d if float(img.mean()) < self.threshold else Detections(torch.zeros(0, 4), torch.zeros(0))
                for d, img in zip(dets, images)]


class FakeRetrain(Adaptation):
    """'Fine-tuning': move the conv bias towards the crops' mean (a copy; the input is untouched)."""

    name = "fake-retrain"
    retrains = True

    def adapt(self, model, crops, attrs, *, steps, seed, progress=False):
        assert crops.shape[-1] == model.image_size and attrs.shape == (crops.shape[0], len(model.attributes))
        new = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            new.conv.bias.add_(crops.mean() * 0.01 * steps + torch.randn(3, generator=g) * 0.01)
        self.last_info = {"images": int(crops.shape[0]), "g_steps": steps}
        return new


class FakePurify(Adaptation):
    name = "fake-purify"

    def __init__(self, factor=0.9):
        self.factor = factor

    def purify(self, images):
        return images * self.factor


class FakeMetric:
    name = "fake-metric"
    columns = ("fake_l2", "sr_mask", "fake_crop_yield", "fake_boxes")

    def compute(self, batch):
        for var in ("TSDF_FAKE_KILL_AFTER", "TSDF_FAKE_INTERRUPT_AFTER"):
            limit = os.environ.get(var)
            if not limit:
                continue
            counter = Path(os.environ["TSDF_FAKE_COUNTER"])
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n >= int(limit):
                if var == "TSDF_FAKE_KILL_AFTER":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt
        crop = None if batch.crop_kept is None else sum(batch.crop_kept) / len(batch.crop_kept)
        if batch.fake_protected is None:
            return {"fake_l2": None, "sr_mask": None, "fake_crop_yield": crop, "fake_boxes": None}
        per_pair = ((batch.fake_protected - batch.fake_clean) ** 2).flatten(2).mean(-1)
        return {"fake_l2": float(per_pair.mean()), "sr_mask": float((per_pair > 2e-4).float().mean()),
                "fake_crop_yield": crop,
                "fake_boxes": float(sum(len(d) for dets in batch.detections_protected.values() for d in dets))}


class FakeBrokenMetric:
    name = "fake-broken-metric"

    def compute(self, batch):
        raise ValueError("the fake metric failed on purpose")


@hookimpl
def register_models(register):
    register(ModelEntry("fake-gan", "A fake 1x1-conv generator.", lambda **kw: FakeGAN(name="fake-gan", **kw)))
    register(ModelEntry("fake-gan8", "A fake 1x1-conv generator at 8 px.",
                        lambda **kw: FakeGAN(name="fake-gan8", image_size=8, **kw)))


@hookimpl
def register_defenses(register):
    register(DefenseEntry("fake-shift", "A fake universal defense.", FakeShift))
    register(DefenseEntry("fake-perimage", "A fake per-image defense.", FakePerImage))
    register(DefenseEntry("fake-broken", "A fake defense that fails.", FakeBroken))


@hookimpl
def register_detectors(register):
    register(DetectorEntry("fake-det", "A fake detector.", FakeDetector))
    register(DetectorEntry("fake-blind", "A fake detector that misses bright images.", FakeBlindDetector))


@hookimpl
def register_adaptations(register):
    register(AdaptationEntry("fake-retrain", "A fake retraining attacker.", FakeRetrain))
    register(AdaptationEntry("fake-purify", "A fake purification.", FakePurify))


@hookimpl
def register_metrics(register):
    register(MetricEntry("fake-metric", "A fake metric.", FakeMetric))
    register(MetricEntry("fake-broken-metric", "A fake metric that fails.", FakeBrokenMetric))
