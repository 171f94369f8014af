"""Preflight (``tsdf-bench run CONFIG --check``): models, detectors, data, checkpoint files, estimates."""
import numpy as np
import pytest
import torch
from PIL import Image

from tsdf_bench import get_registry
from tsdf_bench.cli import main as cli_main
from tsdf_bench.config import load_config
from tsdf_bench.harness.preflight import PreflightError, estimate, preflight
from tsdf_bench.hashing import file_sha256

CONFIG = """
[run]
name = "pre"
scale = "smoke"
device = "cpu"
output = "{output}"

[data]
source = "synthetic"
image_size = 32
n_train_defense = 4
n_collect = 4
n_eval = 2
batch_size = 2

[models]
names = ["stargan", "hisd"]

[models.stargan]
checkpoint = "ckpt/200000-G.ckpt"

[models.hisd]
checkpoint = "ckpt/gen.pt"
reference = "ckpt/reference_glasses_2.jpg"

[defenses]
names = ["noise", "none"]

[detectors]
names = ["haar"]
attacker = "haar"

[adaptations]
names = ["retrain"]
g_steps = 2

[metrics]
names = ["forgery"]
"""


@pytest.fixture()
def setup(tmp_path):
    """A config in tmp_path whose checkpoints (official formats, relative paths) sit beside it."""
    reg = get_registry()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(reg.create("model", "stargan", scale="smoke").official_state_dict(), ckpt / "200000-G.ckpt")
    torch.save({"gen_test": reg.create("model", "hisd", scale="smoke").state_dict()}, ckpt / "gen.pt")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(ckpt / "reference_glasses_2.jpg")
    path = tmp_path / "pre.toml"
    path.write_text(CONFIG.format(output=tmp_path / "runs"))
    return tmp_path, path


def _by(report, kind, name):
    return next(c for c in report.checks if c.kind == kind and c.name == name)


def test_preflight_checks_every_entry_and_hashes_checkpoint_files(setup):
    tmp_path, path = setup
    report = preflight(load_config(path), get_registry())
    assert report.ok, report.table()
    kinds = [(c.kind, c.name) for c in report.checks]
    for item in [("data", "synthetic"), ("model", "stargan"), ("model", "hisd"), ("detector", "haar"),
                 ("defense", "noise"), ("defense", "none"), ("adaptation", "retrain"), ("metric", "forgery"),
                 ("memory", "peak RAM")]:
        assert item in kinds
    star = _by(report, "model", "stargan")
    assert star.info["checkpoint"]["sha256"] == file_sha256(tmp_path / "ckpt" / "200000-G.ckpt")
    assert star.info["checkpoint"]["path"] == str(tmp_path / "ckpt" / "200000-G.ckpt")
    assert star.info["targets"] == 5 and "(2, 5, 3, 32, 32)" in star.detail
    hisd = _by(report, "model", "hisd")
    assert hisd.info["reference"]["sha256"] == file_sha256(tmp_path / "ckpt" / "reference_glasses_2.jpg")
    table = report.table()
    assert "stargan" in table and "peak RAM" in table and "error" not in table
    assert report.estimate["ram_bytes"] > 0 and report.estimate["disk_bytes"] > 0


def test_bad_checkpoint_is_a_hard_error_with_exit_code_1(setup, capsys):
    tmp_path, path = setup
    torch.save(get_registry().create("model", "attgan", scale="smoke").official_state_dict(),
               tmp_path / "ckpt" / "200000-G.ckpt")  # the wrong model's weights
    (tmp_path / "ckpt" / "gen.pt").unlink()
    report = preflight(load_config(path), get_registry())
    errors = {c.name: c.detail for c in report.errors}
    assert set(errors) == {"stargan", "hisd"}
    assert "does not fit stargan" in errors["stargan"] and "missing key(s)" in errors["stargan"]
    assert "does not exist" in errors["hisd"]
    assert _by(report, "detector", "haar").status == "ok"  # the other checks still ran
    # the estimate still counts both models, from their architectures: 2 eval images x (5 + 1)
    # targets (both fit in the clean-forgery cache's budget)
    assert report.estimate["ram_parts"]["clean_forgeries"] == 2 * (5 + 1) * 3 * 32 * 32 * 4
    assert "could not be built" not in report.table()
    with pytest.raises(PreflightError, match="2 error"):
        report.raise_for_errors()
    with pytest.raises(PreflightError, match="model stargan: .*does not fit stargan"):
        preflight(load_config(path), get_registry(), fail_fast=True)
    assert cli_main(["run", str(path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "error: model stargan" in out and "2 error(s)" in out
    assert not (tmp_path / "runs").exists()  # nothing stored


def test_check_command_exits_0_and_prints_one_table(setup, capsys):
    _, path = setup
    assert cli_main(["run", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("status") == 1 and "0 error(s)" in out


def test_paper_model_without_checkpoint_fails_the_preflight(setup):
    _, path = setup
    text = path.read_text().replace('scale = "smoke"', 'scale = "paper"').replace(
        'checkpoint = "ckpt/200000-G.ckpt"', 'norm_stats = "instance"')
    text = text.replace('names = ["stargan", "hisd"]', 'names = ["stargan"]')
    text = text.replace('[models.hisd]\ncheckpoint = "ckpt/gen.pt"\nreference = "ckpt/reference_glasses_2.jpg"\n', "")
    path.write_text(text)
    report = preflight(load_config(path), get_registry())
    (err,) = report.errors
    assert err.name == "stargan" and "[models.stargan]" in err.detail and "random_init = true" in err.detail


def test_celeba_source_needs_only_the_images_the_run_reads(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    names = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Male",
             "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young"]
    rows = 40
    lines = [str(rows), " ".join(names)] + [f"{i + 1:06d}.jpg " + " ".join(["-1"] * len(names)) for i in range(rows)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    for i in list(range(4)) + list(range(30, 36)):  # only the rows the run reads
        Image.fromarray(np.full((218, 178, 3), 5 * i, np.uint8)).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
    cfg = load_config_text(tmp_path, f"""
[run]
scale = "smoke"
device = "cpu"
[data]
source = "celeba"
path = "celeba"
image_size = 32
n_train_defense = 4
n_collect = 4
n_eval = 2
batch_size = 2
[models]
names = ["stargan"]
train = false
[defenses]
names = ["none"]
[detectors]
names = ["haar"]
attacker = "haar"
[adaptations]
names = ["retrain"]
""")
    import tsdf_bench.data.celeba as celeba

    boundaries = dict(train_end=20, test_start=30)
    real = celeba.CelebA.__init__
    celeba.CelebA.__init__ = lambda self, *a, **k: real(self, *a, **{**boundaries, **k})
    try:
        report = preflight(cfg, get_registry())
        assert report.ok, report.table()
        assert "4 fit + 6 test images present" in _by(report, "data", "celeba").detail
        (root / "img_align_celeba" / "000033.jpg").unlink()
        report = preflight(cfg, get_registry())
        (err,) = report.errors
        assert err.kind == "data" and "000033.jpg" in err.detail
        assert _by(report, "model", "stargan").status == "ok"  # checked on a synthetic batch instead
        assert "synthetic batch" in _by(report, "model", "stargan").detail
    finally:
        celeba.CelebA.__init__ = real


def load_config_text(folder, text):
    path = folder / "c.toml"
    path.write_text(text)
    return load_config(path)


def test_estimate_follows_tensor_sizes():
    """The paper grid's figures of issue 13: AttGAN's clean forgeries of 1,000 eval images at 256 px
    (14 targets) are ~11 GB, kept on disk; the cell being measured holds one batch of forgeries;
    the protected-image cache of 3 seeds x 7 defenses ~99 GB."""
    from tsdf_bench.harness.estimate import MEASURE_BATCH_COPIES, PAIR_BYTES, measuring_plan

    cfg = load_config("configs/paper.toml")
    plan = measuring_plan(cfg, get_registry())
    assert plan == {"whole_metrics": [], "purifying": []}  # the paper's metrics stream; retrain does not purify
    models = {"attgan": {"targets": 14, "image_size": 256, "g_bytes": 4 * 43_350_000, "d_bytes": 0},
              "stargan": {"targets": 5, "image_size": 256, "g_bytes": 4 * 8_430_000, "d_bytes": 0}}
    n = {"fit": 128, "collect": 5000, "eval": 1000}
    est = estimate(cfg, models, n, plan)
    img = 3 * 256 * 256 * 4
    # each model's clean forgeries are over the cache's 1 GB budget: on disk, the current model's
    # (AttGAN's is the largest), none in memory
    assert est["ram_parts"]["clean_forgeries"] == 0
    assert est["disk_parts"]["clean_forgeries"] == 1000 * 14 * img
    assert 11.0e9 < 1000 * 14 * img < 11.1e9
    # the cell being measured: batches of 16 (17 with a last photo joined), whatever n_eval
    batch = MEASURE_BATCH_COPIES * 17 * 14 * img
    assert est["ram_parts"]["measurement"] == batch + 1000 * 14 * PAIR_BYTES
    more = estimate(cfg, models, {**n, "eval": 4000}, plan)
    assert more["ram_parts"]["measurement"] - batch == 4000 * 14 * PAIR_BYTES  # per pair, a few bytes
    # a metric that needs whole tensors brings them back (and says so)
    whole = estimate(cfg, models, n, {"whole_metrics": ["x"], "purifying": []})
    assert whole["ram_parts"]["measurement"] > est["ram_parts"]["measurement"] + 4 * 1000 * 14 * img
    # controls: one per model for the current seed (rounds = 1, one retraining adaptation)
    assert est["ram_parts"]["controls"] == 4 * (43_350_000 + 8_430_000)
    # the disk holds one defense and seed's protected images (finished groups are deleted)...
    assert est["disk_parts"]["protected_cache"] == 6000 * img
    # ... and every group's only when each kept a failed cell
    assert est["protected_cache_worst"] == 3 * 7 * 6000 * img
    assert 99e9 < est["protected_cache_worst"] < 100e9
    assert est["ram_bytes"] == sum(est["ram_parts"].values())


def test_clean_cache_plan_follows_the_budget_rule():
    """Entries within the budget stay in memory (oldest dropped first), larger ones on disk, the
    current model's only; a purifying adaptation has its own entries, with copies of the inputs."""
    from tsdf_bench.harness.estimate import _clean_cache_peaks
    from tsdf_bench.harness.measure import MeasureMixin

    gb = 1 << 30
    assert MeasureMixin.clean_cache_bytes == gb
    assert _clean_cache_peaks([("a", gb // 4), ("b", gb // 2)]) == (3 * gb // 4, 0)
    assert _clean_cache_peaks([("a", gb // 2), ("b", gb // 2), ("c", gb // 2)]) == (gb, 0)
    assert _clean_cache_peaks([("a", 3 * gb), ("a", 2 * gb), ("b", 4 * gb), ("c", gb // 2)]) == (gb // 2, 5 * gb)
    cfg = load_config("configs/paper.toml")
    models = {"m": {"targets": 2, "image_size": 128, "g_bytes": 0, "d_bytes": 0}}
    n = {"fit": 1, "collect": 1, "eval": 100}
    plain = estimate(cfg, models, n, {"whole_metrics": [], "purifying": []})
    purified = estimate(cfg, models, n, {"whole_metrics": [], "purifying": ["retrain"]})
    x, f = 100 * 3 * 128 * 128 * 4, 2 * 100 * 3 * 128 * 128 * 4
    assert plain["ram_parts"]["clean_forgeries"] == f + x  # resized from the data's 256 px: a copy
    assert purified["ram_parts"]["measurement"] == plain["ram_parts"]["measurement"]  # both copy their inputs


def test_run_stops_at_preflight_before_any_work_and_leaves_no_run(setup):
    """A plain run does the preflight first: a corrupt checkpoint stops it before a run exists."""
    from tsdf_bench.harness import ResultsStore, run_config

    tmp_path, path = setup
    (tmp_path / "ckpt" / "200000-G.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(PreflightError, match="stargan"):
        run_config(load_config(path), get_registry(), output=tmp_path / "runs", progress=False, log=lambda m: None)
    assert not (tmp_path / "runs" / "results.sqlite").exists() or ResultsStore(tmp_path / "runs" / "results.sqlite").runs() == []


# the official generators' and discriminators' parameter bytes at 256 px (the paper-scale
# architectures built on the meta device, as the preflight's model check measures them)
OFFICIAL = {"stargan": {"targets": 5, "image_size": 256, "g_bytes": 33_722_112, "d_bytes": 179_539_712},
            "attentiongan": {"targets": 5, "image_size": 256, "g_bytes": 33_734_656, "d_bytes": 179_539_712},
            "attgan": {"targets": 14, "image_size": 256, "g_bytes": 173_410_828, "d_bytes": 581_529_144},
            "hisd": {"targets": 1, "image_size": 256, "g_bytes": 76_175_756, "d_bytes": 50_000_168}}


def test_paper_grid_plans_at_most_16_gb_of_ram_with_its_large_sets_mapped(monkeypatch):
    """Issue 13's target: the sets that grow with the photos (photos, protected photos, crops;
    each over 256 MiB at paper scale) are memory-mapped files, counted as disk; what stays in
    RAM is bounded (<= 16 GB) and does not grow with n_eval beyond a few bytes per pair."""
    from tsdf_bench.harness import mapped
    from tsdf_bench.harness.estimate import PAIR_BYTES, measuring_plan

    cfg = load_config("configs/paper.toml")
    plan = measuring_plan(cfg, get_registry())
    n = {"fit": 128, "collect": 5000, "eval": 1000}
    img = 3 * 256 * 256 * 4
    est = estimate(cfg, OFFICIAL, n, plan)
    assert est["ram_bytes"] <= 16e9, est["ram_parts"]
    assert est["ram_parts"]["protected"] == 0 and est["ram_parts"]["data"] == 128 * img
    # photos (collect, eval) and the four crop sets on disk; the protected ones are the resume cache
    assert est["disk_parts"]["mapped_sets"] == 6000 * img + 2 * 6000 * img
    assert est["disk_parts"]["protected_cache"] == 6000 * img
    more = estimate(cfg, OFFICIAL, {**n, "eval": 4000}, plan)
    # at most AttGAN's per-pair values more (HiSD's clean forgeries then leave the 1 GB cache for disk)
    assert more["ram_bytes"] <= est["ram_bytes"] + 3000 * 14 * PAIR_BYTES
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", None)  # everything in memory (before): 27 GB
    whole = estimate(cfg, OFFICIAL, n, plan)
    assert whole["ram_bytes"] - est["ram_bytes"] == 6000 * img + 6000 * img + 2 * 6000 * img
    assert whole["ram_bytes"] > 26e9 and whole["disk_parts"]["mapped_sets"] == 0


def test_paper_path_smoke_official_checkpoints_and_a_celeba_folder_check_then_run(setup, monkeypatch):
    """Issue 13's smoke test: official-format checkpoint files (StarGAN's G, HiSD's gen file and its
    reference image) and a tiny CelebA-layout folder beside the config; ``--check`` passes, then a
    tiny run (every image set memory-mapped, as at paper scale) stores ok rows that carry each
    checkpoint file's path and sha256."""
    from tsdf_bench.harness import ResultsStore, mapped

    tmp_path, path = setup
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    names = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Male",
             "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young"]
    rows = 16
    rng = np.random.default_rng(0)
    for i in range(rows):
        Image.fromarray(rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(
            root / "img_align_celeba" / f"{i + 1:06d}.jpg")
    (root / "list_attr_celeba.txt").write_text("\n".join(
        [str(rows), " ".join(names)] + [f"{i + 1:06d}.jpg " + " ".join(rng.choice(["-1", "1"], len(names)))
                                        for i in range(rows)]) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "\n".join(f"{i + 1:06d}.jpg {0 if i < 6 else 2}" for i in range(rows)) + "\n")
    path.write_text(path.read_text().replace('source = "synthetic"', 'source = "celeba"\npath = "celeba"\n'
                                                                     'protocol = "official"'))
    assert cli_main(["run", str(path), "--check"]) == 0
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    assert cli_main(["run", str(path), "--no-progress", "--no-figures"]) == 0
    store = ResultsStore(tmp_path / "runs" / "results.sqlite")
    (run,) = store.runs()
    got = store.rows(run["run_id"])
    assert got and all(r["status"] == "ok" for r in got)
    assert {r["data"].split(" (")[0] for r in got} == {f"CelebA at {root}"}
    for r in got:
        expected = {"stargan": tmp_path / "ckpt" / "200000-G.ckpt", "hisd": tmp_path / "ckpt" / "gen.pt"}[r["model"]]
        assert r["checkpoint_path"] == str(expected) and r["checkpoint_file_sha256"] == file_sha256(expected)
