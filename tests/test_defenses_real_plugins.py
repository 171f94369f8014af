"""The defenses against the real model and detector plugins at smoke scale (untrained weights)."""
import pytest
import torch

from test_defenses_plugins import FAST, REGISTERED
from tsdf_bench.plugins import get_registry
from tsdf_bench.testing import ToyWorld, check_budget_and_range, defense_factory


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


@pytest.mark.parametrize("name", REGISTERED)
def test_real_plugins_budget(real, name):
    """Every registered defense, with FAST's options, keeps the budget and range on the real plugins."""
    reg, x, models, dets = real
    if name not in FAST:
        pytest.fail(f"defense {name!r} has no fast options in FAST (tests/test_defenses_plugins.py)")
    check_budget_and_range(defense_factory(name, reg), FAST[name], ToyWorld(x, None, models, dets))


def test_tsdf_poisoning_reaches_the_real_detector(real):
    reg, x, models, dets = real
    opts = dict(passes=1, batch_size=2, poison_steps=3, step=0.005, seed=0)
    both = reg.create("defense", "tsdf", **opts).fit(x, None, models, dets)
    stage1 = reg.create("defense", "tsdf", poisoning=False, **opts).fit(x, None, models, dets)
    assert not torch.equal(both.perturbation, stage1.perturbation)
    assert both.history["poisoning"][-1] != both.history["poisoning"][0]
