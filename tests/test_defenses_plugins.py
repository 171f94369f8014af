"""Every registered defense: budget, range, determinism, seeds, save/load (tsdf_bench.testing's
checks, with the fast options of FAST), then behaviour specific to the built-in defenses."""
import pytest
import torch
import torch.nn.functional as F

from tsdf_bench import DefenseEntry, Registry
from tsdf_bench.defenses.base import Defense, UniversalDefense, load_perturbation
from tsdf_bench.plugins import get_registry
from tsdf_bench.testing import (DEFENSE_CHECKS, BlackBoxDetector, DefenseCase, check_defense, defense_factory,
                                toy_world)
from conftest import ROOT

# The one table of fast options: cheap-but-real schedules (every stage runs, on tiny inputs).
# Every registered defense needs an entry; a defense missing here fails test_defense_contract.
FAST = {
    "tsdf": DefenseCase(dict(passes=1, batch_size=4, poison_steps=3, step=0.005), seeded=True),
    "found": DefenseCase(dict(passes=1, batch_size=4, step=0.005), seeded=True),
    "cmua": DefenseCase(dict(batch_size=4, iterations=3), seeded=True),
    "pgd": DefenseCase(dict(iterations=3), seeded=True),
    "facepoison": DefenseCase(dict(iterations=3, importance_masks=2), seeded=True),
    "noise": DefenseCase({}, seeded=True),
    "none": DefenseCase({}, perturbs=False),
}
REGISTERED = get_registry().names("defense")


@pytest.fixture(scope="module")
def world():
    return toy_world()


def make(name, **kw):
    return get_registry().create("defense", name, **{**FAST[name].options, **kw})


def test_the_table_names_only_registered_defenses():
    assert set(FAST) <= set(REGISTERED), f"FAST names unregistered defenses: {sorted(set(FAST) - set(REGISTERED))}"


@pytest.mark.parametrize("check", list(DEFENSE_CHECKS))
@pytest.mark.parametrize("name", REGISTERED)
def test_defense_contract(name, check, world, tmp_path):
    if name not in FAST:
        dist = get_registry().get("defense", name).distribution
        pytest.fail(f"defense {name!r} (from {dist or 'a plugin'}) is registered but has no fast options in FAST "
                    "(tests/test_defenses_plugins.py): add a DefenseCase for it")
    assert make(name).name == name, f"defense {name!r} reports another name"
    reason = DEFENSE_CHECKS[check](defense_factory(name), FAST[name], world, tmp_path)
    if reason:
        pytest.skip(f"{name}: {reason}")


@pytest.mark.parametrize("name", [n for n in REGISTERED if n in FAST and make(n).universal])
def test_built_in_universal_provenance(name, world, tmp_path):
    x, a, models, dets = world
    d = make(name, seed=0).fit(x, a, models, dets)
    assert d.perturbation.shape == (1, 3, 16, 16)
    _, meta = load_perturbation(d.save(tmp_path / f"{name}.pt", note="test"))
    assert meta["defense"] == name and meta["note"] == "test" and meta["options"]["eps"] == 0.05
    assert meta["fit_seconds"] >= 0 and meta["models"] == ["m1", "m2"]


def test_a_third_party_defense_gets_the_same_checks():
    """The example plugin, loaded as a third party would be, passes through check_defense."""
    reg = Registry([ROOT / "examples" / "example_plugin"], strict=True, entry_points=False)
    outcome = check_defense("example-checkerboard", registry=reg, options={"period": 2})
    assert outcome == {"budget_and_range": "ok", "determinism": "ok",
                       "seed_changes_result": outcome["seed_changes_result"], "save_load": outcome["save_load"]}
    assert outcome["save_load"].startswith("not applicable")


class _OverBudget(Defense):
    name = "over-budget"

    def protect(self, images, attrs=None):  # skips the base class's clipping
        return images + 2 * self.eps


class _Unseeded(Defense):
    name = "unseeded"

    def perturbation_for(self, images, attrs=None):
        return torch.randn(images.shape) * self.eps  # the global RNG, not self.generator()


class _BadLoad(UniversalDefense):
    name = "bad-load"

    def fit(self, images, attrs, models, detectors):
        self.perturbation = torch.full((1, 3, 16, 16), self.eps)
        return self

    def load(self, path):  # ignores the file
        self.perturbation = torch.zeros(1, 3, 16, 16)
        return self


@pytest.mark.parametrize("defense,message", [
    (_OverBudget, "exceeds the budget"),
    (_Unseeded, "same seed gave a different perturbation"),
    (_BadLoad, "loaded perturbation protects differently"),
])
def test_check_defense_catches_a_broken_defense(defense, message, world):
    with pytest.raises(AssertionError, match=message):
        check_defense(defense, world=world)


def test_check_defense_accepts_a_registry_entry(world):
    entry = DefenseEntry("noise-entry", "noise", get_registry().get("defense", "noise").factory)
    assert check_defense(entry, seeded=True, world=world)["seed_changes_result"] == "ok"


def test_universal_perturbation_is_shared_by_all_images(world):
    x, a, models, dets = world
    d = make("found").fit(x, a, models, dets)
    inner = x.clamp(-0.9, 0.9)
    delta = d.protect(inner) - inner
    assert torch.allclose(delta[0], delta[1], atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "cmua", "found", "tsdf"])
def test_interruption_beats_noise_on_the_models_it_attacks(name, world):
    """The attacks must distort the generators' outputs more than random noise of the same size."""
    x, a, models, dets = world
    opts = {"tsdf": dict(poisoning=False, passes=3, step=0.01), "found": dict(passes=3, step=0.01),
            "cmua": dict(iterations=10), "pgd": {}}[name]
    d = make(name, **opts).fit(x, a, models, dets)
    noise = make("noise").fit(x, a, models, dets)

    def distortion(p):
        with torch.no_grad():
            return sum(F.mse_loss(m.generate_all(p, a), m.generate_all(x, a)) for m in models).item()

    assert distortion(d.protect(x, a)) > 2 * distortion(noise.protect(x, a))


def test_facepoison_moves_detector_features_more_than_noise(world):
    x, a, models, dets = world
    fp = make("facepoison", importance_masks=0, iterations=5).fit(x, a, models, dets)
    noise = make("noise").fit(x, a, models, dets)

    def shift(p):
        with torch.no_grad():
            return sum(F.mse_loss(f1, f0) for d in dets[:2]
                       for f1, f0 in zip(d.forward_attack(p).features, d.forward_attack(x).features)).item()

    assert shift(fp.protect(x)) > 2 * shift(noise.protect(x))


@pytest.mark.parametrize("name", ["tsdf", "cmua", "found", "pgd"])
def test_needs_models(name, world):
    from tsdf_bench.errors import ConfigError

    x, a, _, dets = world
    with pytest.raises(ConfigError, match="model"):
        make(name).fit(x, a, [], dets).protect(x, a)


def test_facepoison_needs_a_differentiable_detector(world):
    from tsdf_bench.errors import ConfigError

    x, a, models, _ = world
    with pytest.raises(ConfigError, match="differentiable face detector"):
        make("facepoison").fit(x, a, models, [BlackBoxDetector()])


def test_unfitted_universal_defense_says_so(world):
    x = world[0]
    with pytest.raises(RuntimeError, match="not fitted"):
        make("cmua").protect(x)


def test_bad_images_are_refused_with_a_clear_error(world):
    from tsdf_bench.errors import ConfigError

    _, a, models, dets = world
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        make("found").fit(torch.rand(4, 3, 16, 16) * 255, a, models, dets)
    with pytest.raises(ConfigError, match=r"\[B, 3, H, W\]"):
        make("found").fit(torch.rand(3, 16, 16), a, models, dets)
