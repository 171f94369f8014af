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


# -- TSDF -----------------------------------------------------------------------------------------
from tsdf_bench.defenses.detector_losses import clean_candidates, output_loss  # noqa: E402
from tsdf_bench.detectors.base import Detections, DetectorOutput  # noqa: E402
from tsdf_bench_plugins.defenses.tsdf import TSDF, intensity_mask  # noqa: E402

TSDF_FAST = dict(passes=1, batch_size=4, poison_steps=4, step=0.005)


@pytest.fixture(scope="module")
def world():
    return (toy_images(8, 16), toy_attrs(8), [ToyGAN("m1", seed=1), ToyGAN("m2", seed=2)],
            [ToyDetector("d1", 1), ToyDetector("d2", 2), BlackBoxDetector()])


def _spy_poison(d):
    calls = []
    original = d._poison

    def spy(x, w0, slices=None):
        calls.append(([(s.start, s.stop) for s in slices] if slices is not None else None, w0.detach().clone()))
        return original(x, w0, slices)

    d._poison = spy
    return calls


def test_release_schedule_poisons_every_batch_of_every_pass(world):
    """``poison_schedule="release"``: a poison call of ``poison_steps`` on each batch of each pass,
    between the feature steps and the end-to-end step, its mask from the W of that moment."""
    x, a, models, dets = world
    d = TSDF(**{**TSDF_FAST, "passes": 2, "poison_steps": 3}, seed=1)
    assert d.poison_schedule == "release"  # the default
    calls = _spy_poison(d)
    d.fit(x, a, models, dets)
    assert [c[0] for c in calls] == [[(0, 4)], [(4, 8)], [(0, 4)], [(4, 8)]]
    assert len(d.history["poisoning"]) == 2 * 2 * 3 and d.provenance["poison_calls"] == 4
    assert d.provenance["poison_steps_total"] == 12 and d.provenance["poison_schedule"] == "release"
    # the W each call starts from moves between calls (stage 1 and the poison continue from it)
    assert all(not torch.equal(calls[i][1], calls[i + 1][1]) for i in range(3))
    assert torch.equal(d.poison_mask, intensity_mask(calls[-1][1], d.tau, d.beta))
    # "after": one call over every batch once stage 1 is done
    after = TSDF(**{**TSDF_FAST, "passes": 2, "poison_steps": 3}, seed=1, poison_schedule="after")
    calls = _spy_poison(after)
    after.fit(x, a, models, dets)
    assert len(calls) == 1 and calls[0][0] is None and len(after.history["poisoning"]) == 3
    assert not torch.equal(after.perturbation, d.perturbation)
    for p in (d, after):
        assert p.perturbation.abs().max() <= 0.05 + 1e-7
    with pytest.raises(ValueError, match="poison_schedule"):
        TSDF(poison_schedule="during")


def test_release_schedule_without_interruption_only_poisons(world):
    x, a, _, dets = world
    d = TSDF(**{**TSDF_FAST, "passes": 2, "poison_steps": 2}, interruption=False).fit(x, a, [], dets)
    assert d.provenance["poison_calls"] == 4 and d.history["interruption"] == []
    assert d.perturbation.abs().max() > 0


class RefineDetector(ToyDetector):
    """A two-stage toy: dense first stage, then a refine stage that scores given candidate boxes
    (like MTCNN's R-Net / O-Net); without candidates it re-detects its input."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.refine = torch.nn.Linear(4 + 4, 5)
        self.seen = []

    def forward_attack(self, images, refine_boxes=None):
        dense = super().forward_attack(images)
        if refine_boxes is None:
            refine_boxes = [d.boxes[torch.argsort(d.scores, descending=True)] for d in self.detect(images.detach())]
        self.seen.append(refine_boxes)
        k = 2
        rows = []
        for b, given in enumerate(refine_boxes):
            given = torch.as_tensor(given, dtype=images.dtype).reshape(-1, 4)[:k]
            given = torch.cat([given, images.new_full((k - len(given), 4), 8.0)])
            pooled = dense.features[2][b].mean((1, 2))  # [C] (C = 4)
            rows.append(self.refine(torch.cat([pooled.expand(k, -1), given / 16], 1)))
        out = torch.stack(rows)  # [B, k, 5]
        boxes = torch.stack([torch.as_tensor(r, dtype=images.dtype).reshape(-1, 4)[:k] for r in refine_boxes]) \
            if all(len(r) >= k for r in refine_boxes) else out[..., 1:] * 16
        return DetectorOutput(dense.features, torch.cat([dense.scores, torch.sigmoid(out[..., 0])], 1),
                              torch.cat([dense.boxes, boxes + out[..., 1:]], 1))

    def detect(self, images):
        out = ToyDetector.forward_attack(self, images)
        return [Detections(b[torch.argsort(s, descending=True)[:3]], s[torch.argsort(s, descending=True)[:3]])
                for s, b in zip(out.scores, out.boxes)]


def test_poison_scores_the_clean_candidates(world):
    """A multi-stage detector's refine stage scores the candidates found on the clean batch, in the
    clean and in the adversarial pass (the old code re-detected the adversarial image, so eq. 13
    matched scores and box targets of different boxes by index)."""
    x, _, _, _ = world
    det = RefineDetector("refine", 4)
    det.requires_grad_(False)
    xb = x[:4]
    expected = clean_candidates(det, xb)
    d = TSDF(**{**TSDF_FAST, "poison_steps": 3}, mask=False)
    d.detectors = [det]
    det.seen.clear()
    d._poison(xb, torch.zeros(1, 3, 16, 16))
    assert len(det.seen) == 1 + 3  # the clean pass once, then every step
    for boxes in det.seen:
        assert boxes is not None and all(torch.equal(b, e) for b, e in zip(boxes, expected))


def test_mask_weights_the_poison_once_by_default(world):
    """``mask_mode="weight"``: delta = M_d * d, so a mask of 0.82 scales the poison by 0.82; the
    release's per-step ``delta *= M_d`` compounds and keeps it below lr * M / (1 - M)."""
    x, _, _, dets = world
    w0 = torch.full((1, 3, 16, 16), 0.039)  # M_d = exp(-0.195) = 0.82 everywhere
    common = dict(**{**TSDF_FAST, "poison_steps": 30}, poison_lr=1e-3, eps=0.5, poison_schedule="after")
    sizes = {}
    for mode in ("weight", "multiply"):
        d = TSDF(**common, mask_mode=mode)
        d.detectors = dets
        sizes[mode] = float(d._poison(x, w0).abs().max())
    m = float(torch.exp(torch.tensor(-5 * 0.039)))
    assert sizes["multiply"] <= 1.1 * 1e-3 * m / (1 - m)
    assert sizes["weight"] > 2 * sizes["multiply"]
    with pytest.raises(ValueError, match="mask_mode"):
        TSDF(mask_mode="twice")


def test_log_score_term_keeps_its_gradient_on_saturated_scores():
    """-log(1 - s) from the logit margin: at margin 20 (s rounds to 1 in float32) its gradient is
    still ~1; computed from s (floored at 1e-6) it is 0."""
    margins = torch.tensor([[20.0, 0.0]], requires_grad=True)
    scores = torch.sigmoid(margins)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 6.0, 6.0]]])
    clean = DetectorOutput([], torch.tensor([[1.0, 1.0]]), boxes)
    adv = DetectorOutput([], scores, boxes)
    (g_plain,) = torch.autograd.grad(output_loss(adv, clean, 16), margins, retain_graph=True)
    adv.margins = margins
    (g_margin,) = torch.autograd.grad(output_loss(adv, clean, 16), margins)
    assert g_plain[0, 0] == 0
    assert g_margin[0, 0] == pytest.approx(0.5, rel=1e-4)  # weight 1/2 x d softplus / d margin = 1/2
    # where s is representable, the two forms agree
    small = torch.tensor([[1.5, -2.0]])
    plain = output_loss(DetectorOutput([], torch.sigmoid(small), boxes), clean, 16)
    adv = DetectorOutput([], torch.sigmoid(small), boxes)
    adv.margins = small
    assert float(output_loss(adv, clean, 16)) == pytest.approx(float(plain), rel=1e-5)


# -- FOUND's target set ---------------------------------------------------------------------------
def test_found_target_set_is_configurable_like_tsdfs(world):
    from tsdf_bench.defenses.attack_utils import model_outputs
    from tsdf_bench.errors import ConfigError

    x, a, models, dets = world
    fast = dict(passes=1, batch_size=4, step=0.005)
    found = lambda **kw: get_registry().create("defense", "found", **fast, **kw).fit(x, a, models, [])  # noqa: E731
    one = found()
    assert one.provenance["targets"] == {"m1": [0], "m2": [0]}  # FOUND's default: one target
    every = found(max_targets="all")
    assert every.provenance["targets"] == {"m1": "all", "m2": "all"}
    assert torch.equal(every.perturbation, found(max_targets=None).perturbation)
    assert not torch.equal(every.perturbation, one.perturbation)
    picked = found(targets={"m1": [2]})
    assert picked.provenance["targets"] == {"m1": [2], "m2": [0]}
    # TSDF takes the same options and records the same way
    tsdf = TSDF(**TSDF_FAST, poisoning=False, targets={"m1": [2]}, max_targets=1).fit(x, a, models, [])
    assert tsdf.provenance["targets"] == {"m1": [2], "m2": [0]}
    assert TSDF(**TSDF_FAST, poisoning=False).fit(x, a, models, []).provenance["targets"] == {"m1": "all", "m2": "all"}
    # the listed target is the one generated
    m = models[0]
    with torch.no_grad():
        got = model_outputs(m, x[:2], a[:2], 1, {"m1": [2]})
        assert torch.equal(got[:, 0], m.generate(x[:2], m.conditions(a[:2])[2]))
    for bad in (dict(max_targets=0), dict(max_targets="some"), dict(targets={"m1": []}), dict(targets={"m1": [7]})):
        with pytest.raises(ConfigError):
            found(**bad)


# -- FacePoison -----------------------------------------------------------------------------------
def _facepoison_reference(x, det, eps, step, n_ens, keep_p, iters, copies, sigma, rho, seed):
    """The official FacePoisonPP loop (hybrid_mode 2, avgerage_grad 1, fdmean 1, term weights 1, 1),
    one image at a time, on [-1, 1] with the defense's random draws sliced per image."""
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(x.shape, generator=gen) < keep_p for _ in range(n_ens)]
    start = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    draws = []
    for it in range(iters):
        if it % 2 == 1:
            draws.append([(torch.randn(x.shape, generator=gen) * 2 * sigma,
                           torch.rand(x.shape, generator=gen) * 2 * rho + 1 - rho) for _ in range(copies)])
        else:
            draws.append(None)
    n = x.shape[-1]
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i_ = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    D = torch.cos(torch.pi * (2 * i_ + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    D[0] /= 2 ** 0.5
    D = D.float()
    weights = (0.2, 0.3, 0.5)
    out = []
    for b in range(x.shape[0]):
        org = x[b:b + 1]
        feats = lambda z: det.forward_attack(z).features[:3]  # noqa: E731
        with torch.no_grad():
            origin = feats(org)
        acc = [0, 0, 0]
        origin_for_loss = [origin[-1]]
        for m in masks:
            z = (org * m[b:b + 1].float()).requires_grad_(True)
            f = feats(z)
            grads = torch.autograd.grad(torch.nn.functional.l1_loss(origin[-1], f[-1]), f, allow_unused=True)
            acc = [a + (torch.zeros_like(ff) if g is None else g) for a, ff, g in zip(acc, f, grads)]
            origin_for_loss.append(f[-1].detach())
        imp = [a / a.pow(2).sum().sqrt() for a in acc]
        refs = torch.cat(origin_for_loss)

        def grad_of(z):
            z = z.detach().requires_grad_(True)
            f = feats(z)
            lv = sum(w * torch.mean(i * ff) for w, i, ff in zip(weights, imp, f))
            sims = torch.stack([torch.nn.functional.cosine_similarity(r.flatten(), f[-1][0].flatten(), dim=0, eps=1e-5)
                                for r in refs])
            (g,) = torch.autograd.grad(lv - sims.mean(), z)
            return g

        adv = (org + start[b:b + 1]).clamp(-1, 1)
        pre = []
        for it in range(iters):
            if draws[it] is None:
                g = grad_of(adv)
            else:
                g = sum(grad_of(D.T @ ((D @ (adv + nz[b:b + 1]) @ D.T) * sc[b:b + 1]) @ D) for nz, sc in draws[it])
                g = g / copies
            pre.append(g)
            g = torch.stack(pre).mean(0)  # the code's avgerage_grad: flips and momentum do not reach the step
            adv = adv + step * torch.sign(g / g.abs().sum())
            adv = (org + (adv - org).clamp(-eps, eps)).clamp(-1, 1)
        out.append(adv - org)
    return torch.cat(out)


def test_facepoison_matches_the_official_loop():
    x = toy_images(3, 16)
    det = ToyDetector("d1", 3, ch=8)  # a detector whose last layer is alive on every image
    det.requires_grad_(False)
    opts = dict(eps=0.05, step=0.0125, importance_masks=3, keep_prob=0.4, iterations=4, spectrum_copies=2,
                sigma=16 / 255, rho=0.5)
    d = get_registry().create("defense", "facepoison", seed=7, **opts).fit(x, None, [], [det])
    got = d.perturbation_for(x)
    ref = _facepoison_reference(x, det, 0.05, 0.0125, 3, 0.4, 4, 2, 16 / 255, 0.5, seed=7)
    assert torch.allclose(got, ref, atol=1e-6)
    assert got.abs().max() <= 0.05 + 1e-7


def test_facepoison_moves_detector_features_more_than_noise():
    x = toy_images(4, 16)
    dets = [ToyDetector("d1", 1), ToyDetector("d2", 2)]
    d = get_registry().create("defense", "facepoison", iterations=6, importance_masks=4, spectrum_copies=2
                              ).fit(x, None, [], dets)
    w = d.perturbation_for(x)
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.05

    def shift(p):
        with torch.no_grad():
            return sum(torch.nn.functional.l1_loss(det.forward_attack((x + p).clamp(-1, 1)).features[2],
                                                   det.forward_attack(x).features[2]).item() for det in dets)

    assert shift(w) > 1.5 * shift(noise)
    # momentum with sign flips, the code's other path, stays within budget and is seeded
    alt = get_registry().create("defense", "facepoison", iterations=3, importance_masks=2, spectrum_copies=2,
                                average_gradients=False).fit(x, None, [], dets)
    one, two = alt.perturbation_for(x), alt.perturbation_for(x)
    assert torch.equal(one, two) and one.abs().max() <= 0.05 + 1e-7


def test_paper_config_names_the_official_behaviours():
    from pathlib import Path

    from tsdf_bench.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.toml")
    reg = get_registry()
    make = lambda n: reg.create("defense", cfg.defenses.plugin_for(n), **cfg.defenses.options_for(n))  # noqa: E731
    tsdf, cmua_, found = make("tsdf"), make("cmua"), make("found")
    assert tsdf.poison_schedule == "release" and tsdf.poison_steps == 50 and tsdf.mask_mode == "weight"
    assert cmua_.model_order == ["stargan", "attentiongan", "hisd", "attgan"]
    assert cmua_.w_start_models == {"hisd"} and cmua_.target_offsets == {"hisd": 0.002}
    # FOUND and TSDF attack the same target set
    assert (found.max_targets, found.targets) == (tsdf.max_targets, tsdf.targets)
