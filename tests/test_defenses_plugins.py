"""Every registered built-in defense: budget, range, determinism, seeds, save/load, other sizes."""
import pytest
import torch
import torch.nn.functional as F

from defense_toys import BlackBoxDetector, ToyDetector, ToyGAN, toy_attrs, toy_images  # noqa: F401
from tsdf_bench.defenses.base import Defense, UniversalDefense, load_perturbation
from tsdf_bench.plugins import get_registry

# Cheap-but-real schedules: every stage runs, on tiny inputs.
FAST = {
    "tsdf": dict(passes=1, batch_size=4, poison_steps=3, step=0.005),
    "found": dict(passes=1, batch_size=4, step=0.005),
    "cmua": dict(batch_size=4, iterations=3),
    "pgd": dict(iterations=3),
    "facepoison": dict(iterations=3, importance_masks=2),
    "noise": {},
    "none": {},
}
RANDOM = ("tsdf", "found", "cmua", "pgd", "facepoison", "noise")  # a seed changes the result


@pytest.fixture(scope="module")
def world():
    x, a = toy_images(4, 16), toy_attrs(4)
    models = [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)]
    dets = [ToyDetector("d1", 1), ToyDetector("d2", 2), BlackBoxDetector()]
    return x, a, models, dets


def make(name, **kw):
    return get_registry().create("defense", name, **{**FAST[name], **kw})


def test_all_expected_defenses_are_registered():
    assert set(FAST) <= set(get_registry().names("defense"))


@pytest.mark.parametrize("name", sorted(FAST))
def test_budget_and_range_hold(name, world):
    x, a, models, dets = world
    d = make(name, eps=0.03, seed=0).fit(x, a, models, dets)
    assert isinstance(d, Defense) and d.name == name
    p = d.protect(x, a)
    assert p.shape == x.shape
    assert (p - x).abs().max() <= 0.03 + 1e-6
    assert p.min() >= -1 and p.max() <= 1
    if name != "none":
        assert (p - x).abs().max() > 0.01  # it does perturb
    # images at the range's edge stay in range
    edge = x.sign()
    assert d.protect(edge, a).abs().max() <= 1


@pytest.mark.parametrize("name", sorted(FAST))
def test_same_seed_same_perturbation(name, world):
    x, a, models, dets = world
    p1 = make(name, seed=3).fit(x, a, models, dets).protect(x, a)
    p2 = make(name, seed=3).fit(x, a, models, dets).protect(x, a)
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("name", RANDOM)
def test_different_seed_different_perturbation(name, world):
    x, a, models, dets = world
    p1 = make(name, seed=0).fit(x, a, models, dets).protect(x, a)
    p2 = make(name, seed=1).fit(x, a, models, dets).protect(x, a)
    assert not torch.equal(p1, p2)


@pytest.mark.parametrize("name", ["tsdf", "cmua", "found"])
def test_universal_save_load_round_trip_and_other_sizes(name, world, tmp_path):
    x, a, models, dets = world
    d = make(name, seed=0).fit(x, a, models, dets)
    assert isinstance(d, UniversalDefense) and d.perturbation.shape == (1, 3, 16, 16)
    path = d.save(tmp_path / f"{name}.pt", note="test")
    delta, meta = load_perturbation(path)
    assert meta["defense"] == name and meta["note"] == "test" and meta["options"]["eps"] == 0.05
    assert meta["fit_seconds"] >= 0 and meta["models"] == ["m1", "m2"]
    fresh = make(name, seed=0).load(path)
    assert torch.equal(fresh.protect(x, a), d.protect(x, a))
    # a universal perturbation applies to images of another size (resized by the base class)
    big = F.interpolate(x, size=(24, 20), mode="bilinear", align_corners=False)
    p = fresh.protect(big)
    assert p.shape == big.shape and (p - big).abs().max() <= 0.05 + 1e-6


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
