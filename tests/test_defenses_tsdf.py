"""TSDF: the intensity-separation mask, the stage toggles, the poisoning's effect."""
import pytest
import torch

from defense_toys import BlackBoxDetector, ToyDetector, ToyGAN, toy_attrs, toy_images  # noqa: F401
from tsdf_bench.errors import ConfigError
from tsdf_bench_plugins.defenses.tsdf import TSDF, enhanced_copy, intensity_mask

FAST = dict(passes=1, batch_size=4, poison_steps=4, step=0.005)


@pytest.fixture(scope="module")
def world():
    return (toy_images(4, 16), toy_attrs(4), [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)],
            [ToyDetector("d1", 1), ToyDetector("d2", 2), BlackBoxDetector()])


def test_intensity_mask_matches_eq15():
    w0 = torch.tensor([0.0, 0.02, 0.039, 0.04, -0.05, -0.01])
    m = intensity_mask(w0, tau=0.04, beta=5.0)
    expected = torch.exp(-5 * w0.abs()) * (w0.abs() < 0.04).float()
    assert torch.allclose(m, expected)
    assert m[3] == 0 and m[4] == 0 and m[0] == 1


def test_poison_changes_no_pixel_outside_its_mask(world):
    x, _, _, dets = world
    g = torch.Generator().manual_seed(0)
    w0 = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1) * 0.05  # about 20% of |w0| < 0.04 is False
    d = TSDF(**{**FAST, "poison_steps": 6})
    d.detectors = dets  # stage 2 alone, on a known W0 (fit runs it below)
    delta = d._poison(x, w0)
    outside = d.poison_mask == 0
    assert outside.any() and (~outside).any()
    assert torch.all(delta[outside] == 0)
    assert delta[~outside].abs().max() > 0  # it did poison inside the mask
    assert delta.abs().max() <= d.poison_clip


def test_full_fit_equals_stage1_outside_the_mask(world):
    """With the poison after stage 1 (``poison_schedule="after"``)."""
    x, a, models, dets = world
    both = TSDF(**FAST, seed=4, poison_schedule="after").fit(x, a, models, dets)
    stage1 = TSDF(**FAST, seed=4, poisoning=False).fit(x, a, models, dets)
    outside = both.poison_mask == 0
    assert outside.any()
    assert torch.equal(both.perturbation[outside], stage1.perturbation[outside])
    assert not torch.equal(both.perturbation, stage1.perturbation)
    assert both.provenance["mask_fraction"] == pytest.approx(float((both.poison_mask > 0).float().mean()))
    assert both.provenance["detectors"] == ["d1", "d2"]  # the black-box one is skipped


def test_toggles(world):
    x, a, models, dets = world
    poison_only = TSDF(**FAST, interruption=False).fit(x, a, [], dets)  # needs no model
    assert torch.all(poison_only.poison_mask == 1)  # W0 = 0: poison allowed everywhere
    no_mask = TSDF(**FAST, mask=False).fit(x, a, models, dets)
    assert torch.all(no_mask.poison_mask == 1)
    stage1 = TSDF(**FAST, poisoning=False).fit(x, a, models, [])  # needs no detector
    assert stage1.poison_mask is None and stage1.history["poisoning"] == []
    for d in (poison_only, no_mask, stage1):
        assert d.perturbation.abs().max() <= 0.05 + 1e-7
    with pytest.raises(ConfigError, match="differentiable face detector"):
        TSDF(**FAST).fit(x, a, models, [BlackBoxDetector()])
    with pytest.raises(ConfigError, match="deepfake model"):
        TSDF(**FAST).fit(x, a, [], dets)


def test_poisoning_moves_detector_features_more_than_noise(world):
    x, a, models, dets = world
    d = TSDF(**{**FAST, "poison_steps": 15}, interruption=False).fit(x, a, models, dets)
    noise = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.05

    def shift(w):
        with torch.no_grad():
            return sum(torch.nn.functional.mse_loss(f1, f0).item() for det in dets[:2]
                       for f1, f0 in zip(det.forward_attack((x + w).clamp(-1, 1)).features,
                                         det.forward_attack(x).features))

    assert shift(d.perturbation) > 2 * shift(noise)
    assert d.history["poisoning"][-1] < d.history["poisoning"][0]  # its loss went down


def test_poisoning_gradient_reaches_every_detector_and_scale(world):
    """The release's defects (only the last scale; RetinaFace without gradient) are not reproduced."""
    x, _, _, dets = world
    from tsdf_bench.defenses.detector_losses import FixedProjections, fused_scales

    w = torch.zeros(1, 3, 16, 16, requires_grad=True)
    outs = [d.forward_attack(x + w) for d in dets[:2]]
    fused = fused_scales(outs, FixedProjections(8, 0), 8, 3)
    assert len(fused) == 3 and all(f.shape[1] == 16 for f in fused)
    for s in range(3):
        for det in dets[:2]:
            det.zero_grad()
        fused[s].sum().backward(retain_graph=True)
        for det in dets[:2]:
            assert det.b1[0].weight.grad.abs().sum() > 0


def test_enhanced_copy_amplifies_the_difference():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 2, 8, 8, generator=g)
    adv = clean + 0.3 * torch.randn(2, 2, 8, 8, generator=g)
    enh = enhanced_copy(clean, adv, temperature=0.1, alpha=0.4)
    assert enh.shape == adv.shape and torch.isfinite(enh).all()
    # same mean and std as adv, but further from the clean features
    assert torch.allclose(enh.mean((1, 2, 3)), adv.mean((1, 2, 3)), atol=1e-4)
    assert torch.allclose(enh.std((1, 2, 3)), adv.std((1, 2, 3)), atol=1e-3)
    assert (enh - clean).pow(2).mean() > (adv - clean).pow(2).mean()


def test_demo_schedule_options_are_recorded(world):
    x, a, models, dets = world
    d = TSDF(eps=0.04, step=0.004, **{k: v for k, v in FAST.items() if k != "step"}).fit(x, a, models, dets)
    opts = d.provenance["options"]
    assert opts["eps"] == 0.04 and opts["step"] == 0.004 and opts["tau"] == 0.04 and opts["scale_weights"] == [5.0, 3.0, 4.0]
    assert len(d.history["interruption"]) == 1 and len(d.history["poisoning"]) == FAST["poison_steps"]


def test_score_penalty_keeps_gradient_on_confident_faces():
    """s^2 on a probability saturates where the face is confident; -log(1 - s) does not."""
    from tsdf_bench.defenses.detector_losses import score_penalty

    logits = torch.tensor([0.0, 3.0, 7.0], requires_grad=True)  # s = 0.5, 0.95, 0.999
    (g_sq,) = torch.autograd.grad(score_penalty(torch.sigmoid(logits), "square").sum(), logits)
    (g_log,) = torch.autograd.grad(score_penalty(torch.sigmoid(logits), "log").sum(), logits)
    assert g_sq[2] < 0.01 * g_sq[0]  # the vanishing gradient of the printed s^2
    assert torch.allclose(g_log, torch.sigmoid(logits.detach()))  # d/dlogit = s: largest when confident
    assert score_penalty(torch.zeros(3), "log").abs().max() == 0 and score_penalty(torch.zeros(3), "square").max() == 0
    with pytest.raises(ValueError):
        score_penalty(torch.zeros(1), "cube")
    with pytest.raises(ValueError, match="score_loss"):
        TSDF(score_loss="cube")


def test_poison_stays_inside_the_eq17_clip(world):
    """W0 + delta never leaves [-eps, eps]: Adam does not push delta where the clip wastes it."""
    x, _, _, dets = world
    w0 = torch.full((1, 3, 16, 16), 0.03)
    w0[..., :8] = -0.01
    d = TSDF(**{**FAST, "poison_steps": 6}, mask=False)
    d.detectors = dets
    delta = d._poison(x, w0)
    total = w0 + delta
    assert total.abs().max() <= d.eps + 1e-7
    assert delta.abs().max() > 0


def test_poisoning_lowers_a_confident_detectors_face_scores(world):
    """On a toy detector that is sure of its faces (s ~ 0.998), the poison lowers the scores of the
    anchors that found them, far more than noise of the same budget."""
    x, a, _, _ = world
    det = ToyDetector("sure", 3)
    with torch.no_grad():
        for head in det.heads:
            head.bias[0] += 6.0
    det.requires_grad_(False)

    def face_score(w):
        with torch.no_grad():
            clean = det.forward_attack(x).scores
            adv = det.forward_attack((x + w).clamp(-1, 1)).scores
        weights = clean / clean.sum(1, keepdim=True)
        return float((weights * adv).sum(1).mean())

    d = TSDF(**{**FAST, "poison_steps": 20}, interruption=False).fit(x, a, [], [det])
    noise = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.05
    before, after = face_score(torch.zeros(1, 3, 16, 16)), face_score(d.perturbation)
    assert before > 0.99
    assert before - after > 3 * abs(before - face_score(noise))


# -- stage 1 against the official code's loop structure (issue 14, item 4) -----------------------------
@pytest.mark.parametrize("max_targets", [None, 2])
def test_stage1_is_bit_identical_to_the_official_structure_loop(max_targets):
    """Stage 1 (each encoder once per clean batch, input gradients only) gives the perturbation of
    the reference loop in the release's structure (clean features recomputed at every feature step,
    clean forgeries per target, weights requiring grad: ``tests/official_loops.py``) bit for bit,
    over two passes of two batches with input diversity."""
    from official_loops import official_tsdf_stage1

    x, a = toy_images(4, 16, seed=2), toy_attrs(4, seed=2)
    models = [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)]
    opts = dict(poisoning=False, passes=2, batch_size=2, feature_steps=2, step=0.005, seed=3,
                max_targets=max_targets)
    ours = TSDF(**opts).fit(x, a, models, [])
    reference = official_tsdf_stage1(TSDF(**opts), [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)], x, a)
    assert torch.equal(ours.perturbation, reference)


def test_stage1_runs_each_encoder_once_on_the_clean_batch():
    """Per batch and model: one clean encoder pass (the channel sums of the clean features are taken
    from the per-model features, not from a second pass), one per feature step, one at the
    end-to-end step."""
    x, a = toy_images(4, 16), toy_attrs(4)
    models = [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)]
    calls = []
    for m in models:
        m.encode = (lambda f, name: lambda z: calls.append(name) or f(z))(m.encode, m.name)
    TSDF(poisoning=False, passes=1, batch_size=2, feature_steps=3).fit(x, a, models, [])
    assert calls.count("m1") == calls.count("m2") == 2 * (1 + 3 + 1)  # 2 batches
