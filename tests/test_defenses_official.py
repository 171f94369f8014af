"""The defenses as their official code runs them (issue 14): CMUA's start, HiSD call and order;
TSDF's poisoning schedule, candidates, mask and score term; FOUND's targets; FacePoison's steps."""
import pytest
import torch

from defense_toys import BlackBoxDetector, ToyDetector, ToyGAN, toy_attrs, toy_images  # noqa: F401
from tsdf_bench.plugins import get_registry


def cmua(**kw):
    return get_registry().create("defense", "cmua", **{**dict(batch_size=4, iterations=2, max_images=4), **kw})


# -- the official code's behaviours (issue 14) ----------------------------------------------------
def _named(name, seed):
    m = ToyGAN(name, seed=seed)
    m.requires_grad_(False)
    return m


def test_random_start_is_not_clamped():
    """CMUA's first step on images with pixels at +-1 equals the official step computed by hand:
    ``X = X_nat + U(-eps, eps)`` unclamped, one signed step, ``eta`` the batch mean of the clipped
    difference (the old start clamped X to [-1, 1] first, which moves eta at those pixels)."""
    x = toy_images(2, 16)
    x[:, :, :4] = 1.0
    x[:, :, -4:] = -1.0
    m = _named("m1", 1)
    attrs = toy_attrs(2)
    eps, step = 0.05, 0.01
    d = get_registry().create("defense", "cmua", eps=eps, step=step, iterations=1, batch_size=2, max_images=2,
                              max_targets=1, seed=3).fit(x, attrs, [m], [])
    # by hand, in the official structure
    gen = torch.Generator().manual_seed(3)
    X = x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    c = m.conditions(attrs)[0]
    with torch.no_grad():
        y = m.generate(x, c)
    X.requires_grad_(True)
    torch.nn.functional.mse_loss(m.generate(X, c), y).backward()
    x_adv = X.detach() + step * X.grad.sign()
    expected = (x_adv - x).clamp(-eps, eps).mean(0, keepdim=True)
    assert torch.equal(d.perturbation, expected)
    # the clamped start gives another perturbation on these images
    clamped = (X.detach().clamp(-1, 1) + step * X.grad.sign() - x).clamp(-eps, eps).mean(0, keepdim=True)
    assert not torch.equal(d.perturbation, clamped)


def test_hisd_starts_from_w_and_targets_the_offset_forgery():
    """A model in ``w_start_models`` starts from ``x + W`` (no random draw) and ascends the MSE to
    its clean forgery + offset, as the official code does for HiSD."""
    x, attrs = toy_images(2, 16), toy_attrs(2)
    first, hisd = _named("stargan", 1), _named("hisd", 2)
    eps, step = 0.05, 0.01
    d = get_registry().create("defense", "cmua", eps=eps, step=step, iterations=1, batch_size=2, max_images=2,
                              max_targets=1, seed=5).fit(x, attrs, [hisd, first], [])
    assert d.provenance["model_order"] == ["stargan", "hisd"]
    gen = torch.Generator().manual_seed(5)
    # stargan: random start, one step
    X = x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    c = first.conditions(attrs)[0]
    with torch.no_grad():
        y = first.generate(x, c)
    X.requires_grad_(True)
    torch.nn.functional.mse_loss(first.generate(X, c), y).backward()
    w = ((X.detach() + step * X.grad.sign()) - x).clamp(-eps, eps).mean(0, keepdim=True)
    # hisd: from x + W, target G(x) + 0.002
    c = hisd.conditions(attrs)[0]
    with torch.no_grad():
        y = hisd.generate(x, c) + 0.002
    X = (x + w).requires_grad_(True)
    torch.nn.functional.mse_loss(hisd.generate(X, c), y).backward()
    eta = ((X.detach() + step * X.grad.sign()) - x).clamp(-eps, eps).mean(0, keepdim=True)
    assert torch.allclose(d.perturbation, 0.5 * w + 0.5 * eta, atol=1e-7)
    # treated like the others, HiSD would give another perturbation
    plain = get_registry().create("defense", "cmua", eps=eps, step=step, iterations=1, batch_size=2, max_images=2,
                                  max_targets=1, seed=5, w_start_models=(), target_offsets={}).fit(
        x, attrs, [hisd, first], [])
    assert not torch.allclose(plain.perturbation, d.perturbation)


def test_model_order_defaults_to_the_official_one_and_is_recorded():
    x, attrs = toy_images(2, 16), toy_attrs(2)
    models = [_named(n, i) for i, n in enumerate(["attgan", "extra", "hisd", "stargan", "attentiongan"])]
    d = cmua(iterations=1, max_targets=1).fit(x, attrs, models, [])
    assert d.provenance["model_order"] == ["stargan", "attentiongan", "hisd", "attgan", "extra"]
    assert d.info["model_order"] == d.provenance["model_order"]
    assert d.info["defense_options"]["model_order"] == ["stargan", "attentiongan", "hisd", "attgan"]
    given = cmua(iterations=1, max_targets=1, model_order=None).fit(x, attrs, models, [])
    assert given.provenance["model_order"] == ["attgan", "extra", "hisd", "stargan", "attentiongan"]
    # the order changes the perturbation (the EMA weights the last calls most)
    assert not torch.equal(d.perturbation, given.perturbation)
