"""The attacker: its control retraining, its budget in generator updates, and the usable-crop rule."""
import torch

from test_runner import CONFIG, run
from tsdf_bench.harness import attacker as attacker_module

ZERO = CONFIG.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift", "fake-zero"]') \
    .replace('names = ["fake-gan", "fake-gan8"]', 'names = ["fake-gan"]').replace("seeds = [0, 1]", "seeds = [0]") \
    .replace('names = ["fake-retrain", "fake-purify"]', 'names = ["fake-retrain"]') \
    + '\n[defenses.fake-zero]\nplugin = "fake-shift"\nstrength = 0.0\n'


def test_control_is_computed_once_per_model_round_seed_and_shared(tmp_path, monkeypatch):
    calls = []
    real = attacker_module.Attacker.retrain

    def counted(self, model, collection, adaptation, **kw):
        calls.append(kw["k"])
        return real(self, model, collection, adaptation, **kw)

    monkeypatch.setattr(attacker_module.Attacker, "retrain", counted)
    rows = run(tmp_path, ZERO).rows
    assert all(r["status"] == "ok" for r in rows)
    # one control chain (rounds 1, 2) shared by both defenses + fake-shift's rounds 1, 2; fake-zero
    # collects the clean crops, so its rounds are the control's (reused, not retrained)
    assert sorted(calls) == [1, 1, 2, 2]
    for k in (1, 2):
        at_k = [r for r in rows if r["round"] == k]
        assert len({r["control_checkpoint_sha256"] for r in at_k}) == 1
        for r in at_k:
            assert {"sr_mask_ctrl", "l2_mask_ctrl", "adaptation_gain", "sr_mask_worst", "sr_mask_lo", "sr_mask_hi",
                    "sr_mask_n", "g_steps", "eval_dropped"} <= set(r)


def test_zero_perturbation_gets_zero_adaptation_gain(tmp_path):
    rows = run(tmp_path, ZERO).rows
    zero = [r for r in rows if r["defense"] == "fake-zero" and r["round"] > 0]
    assert zero and all(r["adaptation_gain"] == 0 for r in zero)
    assert all(r["checkpoint_sha256"] == r["control_checkpoint_sha256"] for r in zero)  # same data, same seed
    # nothing to disrupt on either model: a tie, and the attacker keeps the model it retrained
    assert all(r["sr_mask"] == r["sr_mask_orig"] == 0 for r in zero)
    assert all(r["attacker_keeps"] == "retrained" and r["sr_mask_worst_photos"] == r["sr_mask_photos"] for r in zero)
    shift = [r for r in rows if r["defense"] == "fake-shift" and r["round"] > 0]
    assert all(r["checkpoint_sha256"] != r["control_checkpoint_sha256"] for r in shift)


def test_the_attacker_keeps_the_retrained_model_unless_it_broke_or_got_worse():
    keeps = attacker_module.keeps
    assert keeps(0.01, 0.2, 0.2) == "retrained"  # a tie: it retrained on purpose
    assert keeps(None, None, None) == "retrained"  # nothing forged: no reason to go back
    assert keeps(0.01, 0.1, 0.2) == "retrained"  # the protection disrupts the retrained model less
    assert keeps(0.01, 0.3, 0.2) == "original"  # retraining made its forgeries worse
    assert keeps(0.06, 0.0, 0.5) == "original"  # retraining broke the model (clean drift MSE above 0.05)


def test_retrain_g_steps_counts_generator_optimizer_steps(monkeypatch):
    from tsdf_bench.models import training
    from tsdf_bench.plugins import get_registry

    optimizers = []
    real_adam = training._adam

    def counting_adam(params, lr, betas):
        opt = real_adam(params, lr, betas)
        opt.calls = 0
        step = opt.step

        def counted(*a, **kw):
            opt.calls += 1
            return step(*a, **kw)

        opt.step = counted
        optimizers.append(opt)
        return opt

    monkeypatch.setattr(training, "_adam", counting_adam)
    registry = get_registry()
    model = registry.create("model", "stargan", scale="smoke")
    model.train_recipe = {"n_critic": 3, "lr": 2e-4, "lr_d": 2e-4, "reg_every": 1}
    retrain = registry.create("adaptation", "retrain", batch_size=4)
    torch.manual_seed(0)
    crops = torch.rand(6, 3, model.image_size, model.image_size) * 2 - 1
    attrs = (torch.rand(6, len(model.attributes)) > 0.5).float()
    retrain.adapt(model, crops, attrs, steps=4, seed=0, discriminator=model.make_discriminator())
    g_opt, d_opt = optimizers[:2]
    assert g_opt.calls == 4 and d_opt.calls == 12  # n_critic from the model's recipe
    info = retrain.last_info
    assert info["g_steps"] == 4 and info["d_steps"] == 12 and info["n_critic"] == 3
    assert info["lr"] == 2e-4 and info["schedule_source"] == "model recipe"


def test_usable_crop_rule():
    from tsdf_bench.prep import PrepResult

    def result(kept, boxes):
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return PrepResult(torch.zeros(len(kept), 3, 4, 4), torch.tensor(kept, dtype=torch.long), boxes, boxes,
                          torch.ones(len(kept)))

    clean = result([0, 1], [[0, 0, 10, 10], [0, 0, 10, 10]])
    protected = result([0, 2], [[0, 0, 10, 10], [5, 5, 9, 9]])
    # photo 0: same crop; photo 1: lost; photo 2: no clean reference, a crop counts
    assert attacker_module.usable_crops(clean, protected, 3) == [True, False, True]


def test_aligned_pipeline_skips_detection_so_poisoning_cannot_starve_it(tmp_path):
    """With pipeline = "aligned" (pre-aligned faces, the LoRA Patching setting) the attacker uses
    every collected photo even when its detector finds no face in any of them."""
    from test_runner import fake_registry, make_config
    from tsdf_bench.harness import ResultsStore
    from tsdf_bench.harness.runner import Runner

    text = ZERO.replace('attacker = "fake-det"', 'attacker = "fake-blind"').replace("rounds = 2", "rounds = 1")
    cfg = make_config(tmp_path, text)
    runner = Runner(cfg, fake_registry(), ResultsStore(tmp_path / "r.sqlite"), "r", tmp_path / "run", progress=False)
    prot = runner.protect(0, "fake-shift")
    adaptation = runner.adaptations["fake-retrain"]
    blind = runner.attacker.collection(prot.collect, 16, adaptation)
    assert blind.crops.shape[0] == 0  # the blind detector starves the detect pipeline
    adaptation.pipeline = "aligned"
    aligned = runner.attacker.collection(prot.collect, 16, adaptation)
    assert aligned.crops.shape == (prot.collect.shape[0], 3, 16, 16) and all(aligned.usable)
    fg = runner.attacker.forgeable(prot.eval, 16, adaptation)
    assert fg.kept == list(range(prot.eval.shape[0])) and fg.protected.shape == fg.clean.shape


def test_adaptation_variants_and_sweeps_run_side_by_side(tmp_path):
    text = ZERO.replace('names = ["fake-retrain"]', 'names = ["fake-retrain", "fake-purify"]').replace(
        "rounds = 2", "rounds = 0") + '\n[adaptations.fake-purify]\nsweep = {factor = [0.5, 0.9]}\n'
    rows = run(tmp_path, text).rows
    names = {r["adaptation"] for r in rows}
    assert names == {"fake-retrain", "fake-purify-factor0.5", "fake-purify-factor0.9"}
    by = {r["adaptation"]: r for r in rows if r["defense"] == "fake-shift"}
    assert by["fake-purify-factor0.5"]["adaptation_options"] == {"factor": 0.5}
    assert by["fake-purify-factor0.5"]["adaptation_plugin"] == "fake-purify"
    assert by["fake-purify-factor0.5"]["fake_l2"] != by["fake-purify-factor0.9"]["fake_l2"]


def test_a_purification_can_be_scored_against_the_unpurified_clean_forgery(tmp_path):
    """compare_to = "clean" (PDB's comparison) scores G(T(x + W)) against G(x): the transform's own
    change then counts, so a zero perturbation is no longer scored 0."""
    base = ZERO.replace('names = ["fake-retrain"]', 'names = ["fake-purify", "fake-pdb"]').replace(
        "rounds = 2", "rounds = 0") + '\n[adaptations.fake-pdb]\nplugin = "fake-purify"\ncompare_to = "clean"\n'
    rows = run(tmp_path, base).rows
    zero = {r["adaptation"]: r for r in rows if r["defense"] == "fake-zero"}
    assert zero["fake-purify"]["fake_l2"] == 0 and zero["fake-pdb"]["fake_l2"] > 0
    assert zero["fake-pdb"]["compare_to"] == "clean" and zero["fake-purify"]["compare_to"] == "purified"


def test_each_adaptation_may_use_its_own_attacker_detector(tmp_path):
    """attacker_detector in an adaptation's table: one run compares a detector the protection
    starves (fake-blind finds no face) with one it does not (fake-det)."""
    text = ZERO.replace('names = ["fake-retrain"]', 'names = ["fake-retrain", "fake-retrain-blind"]').replace(
        "rounds = 2", "rounds = 1") + '\n[adaptations.fake-retrain-blind]\nplugin = "fake-retrain"\nattacker_detector = "fake-blind"\n'
    rows = [r for r in run(tmp_path, text).rows if r["round"] == 1 and r["defense"] == "fake-shift"]
    by = {r["adaptation"]: r for r in rows}
    assert by["fake-retrain-blind"]["attacker_detector"] == "fake-blind" and by["fake-retrain"]["attacker_detector"] == "fake-det"
    assert by["fake-retrain-blind"]["retrain_images"] == 0 and by["fake-retrain"]["retrain_images"] > 0


def test_the_detector_free_scenario_is_a_registered_adaptation():
    from tsdf_bench.plugins import get_registry

    scenario = get_registry().create("adaptation", "retrain-aligned", batch_size=4)
    assert scenario.pipeline == "aligned" and scenario.retrains
    assert get_registry().create("adaptation", "retrain").pipeline == "detect"


def test_the_discriminator_goes_only_to_adaptations_that_take_it():
    """A demo or official model comes with its D; retraining gets it, LoRA patching (no D in its
    objective, no such keyword) runs without it instead of failing with a TypeError."""
    import functools
    from types import SimpleNamespace

    from tsdf_bench.plugins import get_registry

    registry = get_registry()
    model = registry.create("model", "stargan", scale="smoke")
    model.train_recipe = {"n_critic": 1, "lr": 2e-4, "lr_d": 2e-4, "reg_every": 1}
    torch.manual_seed(0)
    n = 4
    crops = torch.rand(n, 3, model.image_size, model.image_size) * 2 - 1
    attrs = (torch.rand(n, len(model.attributes)) > 0.5).float()
    collection = attacker_module.Collection(crops, attrs, list(range(n)), n)
    stub = SimpleNamespace(device="cpu", progress=False, data=SimpleNamespace(attr_names=list(model.attributes)),
                           cfg=SimpleNamespace(adaptations=SimpleNamespace(g_steps=1)))
    given = []
    for name, options in (("retrain", {"batch_size": 2}), ("lora-patch", {"max_targets": 1, "pgd_steps": 1})):
        adaptation = registry.create("adaptation", name, **options)
        real = adaptation.adapt

        @functools.wraps(real)  # keeps adapt's signature, which decides whether D is passed
        def spy(*a, _real=real, **k):
            given.append("discriminator" in k)
            return _real(*a, **k)

        adaptation.adapt = spy
        out = attacker_module.Attacker.retrain(stub, model, collection, adaptation, seed=0, k=1,
                                               discriminator=model.make_discriminator())
        assert out.model is not model
    assert given == [True, False]


def test_a_saved_control_keeps_an_adapted_architecture(tmp_path):
    """Workers share controls through files; LoRA patching wraps the layers in adapters, so a control
    must come back as the module it was, not as its state loaded into the base architecture."""
    from tsdf_bench.hashing import state_sha256
    from tsdf_bench_plugins.adaptations.lora_patch import inject_lora, lora_modules

    torch.manual_seed(0)
    patched = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3))
    assert inject_lora(patched) == 2
    done = attacker_module.Retrained(patched, state_sha256(patched.state_dict()), {"g_steps": 3})
    path = tmp_path / "control.pt"
    attacker_module._save_control(path, done)
    back = attacker_module._load_control(path, "cpu")
    assert len(lora_modules(back.model)) == len(lora_modules(patched)) == 2
    assert back.hash == done.hash and back.info == {"g_steps": 3}
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(back.model(x), patched.eval()(x))
