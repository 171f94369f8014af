"""The defenses against the real model and detector plugins at smoke scale (untrained weights)."""
import pytest
import torch

from tsdf_bench.plugins import get_registry


@pytest.fixture(scope="module")
def real():
    reg = get_registry()
    if "stargan" not in reg.names("model") or "retinaface" not in reg.names("detector"):
        pytest.fail("the built-in stargan model and retinaface detector plugins must be registered")
    model = reg.create("model", "stargan", scale="smoke").eval()
    det = reg.create("detector", "retinaface").eval()
    s = model.image_size
    x = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    return reg, x, [model], [det]


@pytest.mark.parametrize("name,opts", [
    ("tsdf", dict(passes=1, batch_size=2, poison_steps=2, step=0.005)),
    ("cmua", dict(batch_size=2, iterations=2, joint_targets=True)),
    ("found", dict(passes=1, batch_size=2)),
    ("pgd", dict(iterations=2)),
    ("facepoison", dict(iterations=2, importance_masks=1)),
])
def test_real_plugins_budget(real, name, opts):
    reg, x, models, dets = real
    d = reg.create("defense", name, **opts).fit(x, None, models, dets)
    p = d.protect(x)
    assert (p - x).abs().max() <= 0.05 + 1e-6 and (p - x).abs().max() > 0.01


def test_tsdf_poisoning_reaches_the_real_detector(real):
    reg, x, models, dets = real
    opts = dict(passes=1, batch_size=2, poison_steps=3, step=0.005, seed=0)
    both = reg.create("defense", "tsdf", **opts).fit(x, None, models, dets)
    stage1 = reg.create("defense", "tsdf", poisoning=False, **opts).fit(x, None, models, dets)
    assert not torch.equal(both.perturbation, stage1.perturbation)
    assert both.history["poisoning"][-1] != both.history["poisoning"][0]
