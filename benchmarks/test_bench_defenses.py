"""Protection throughput (images/s) per defense at demo scale: 8 photos at 128 px against the
demo StarGAN (random weights: throughput does not depend on them), with tiny schedules.

``extra_info`` holds ``images_per_s`` (protection) and ``fit_s`` (the fit, timed once).  PGD,
the per-image defense with a straightforward counterpart, also times the one-image-at-a-time
loop (``defense.optimize = False``) and records the ratio.
"""
import time

import pytest

from measure import compare, peak_memory, sync
from tsdf_bench import speed
from tsdf_bench.harness.data import select_attrs

SCHEDULES = {  # tiny versions of configs/demo.toml's schedules
    "tsdf": dict(passes=1, max_images=4, batch_size=4, feature_steps=1, poison_steps=2),
    "cmua": dict(iterations=1, max_images=4, batch_size=4, joint_targets=True),
    "found": dict(passes=1, max_images=4, batch_size=4, feature_steps=1),
    "pgd": dict(iterations=2, max_targets=2),
    "facepoison": dict(iterations=2, importance_masks=1),
    "noise": {},
    "none": {},
}


@pytest.fixture(scope="module")
def white_box(registry, device):
    model = registry.create("model", "stargan", scale="demo").to(device).eval()
    detector = registry.create("detector", "retinaface").to(device).eval()
    return model, detector


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_protect_throughput(benchmark, registry, faces, device, white_box, name):
    model, detector = white_box
    x = faces.images.to(device)
    attrs = {model.name: select_attrs(faces.attrs, faces.attr_names, model.attributes, model.name).to(device)}
    defense = registry.create("defense", name, eps=0.05, seed=0, device=str(device), **SCHEDULES[name])
    t0 = time.perf_counter()
    with speed.autocast(device, True):
        defense.fit(x[:4], {k: v[:4] for k, v in attrs.items()}, [model], [detector])
    sync(device)
    fit_s = time.perf_counter() - t0

    def protect(optimize: bool = True):
        defense.optimize = model.optimize = optimize
        with speed.autocast(device, optimize):
            return defense.protect(x, attrs)

    if name == "pgd":
        def straightforward():
            protect(optimize=False)

        compare(benchmark, protect, straightforward, device)
    else:
        benchmark.pedantic(protect, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images=x.shape[0], image_size=x.shape[-1], fit_s=round(fit_s, 4),
                                images_per_s=round(x.shape[0] / benchmark.stats.stats.median, 2),
                                device=str(device), **peak_memory(protect, device))
