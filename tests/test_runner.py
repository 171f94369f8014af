"""The runner with fake plugins: expected rows, rounds, provenance, failures, Ctrl-C."""
from pathlib import Path

import pytest
import torch

from tsdf_bench.config import load_config
from tsdf_bench.harness import ResultsStore, run_config
from tsdf_bench.harness.plan import Cell, plan_cells
from tsdf_bench.plugins import Registry

FAKES = Path(__file__).parent / "harness_fakes"

CONFIG = """
[run]
name = "fake"
scale = "smoke"
seeds = [0, 1]
device = "cpu"
rounds = 2

[data]
source = "synthetic"
image_size = 32
n_train_defense = 4
n_collect = 6
n_eval = 4
batch_size = 3

[models]
names = ["fake-gan", "fake-gan8"]
train = false

[defenses]
names = ["fake-shift", "fake-perimage", "fake-broken"]

[detectors]
names = ["fake-det", "fake-blind"]
attacker = "fake-det"

[detectors.fake-blind]
threshold = -2.0

[adaptations]
names = ["fake-retrain", "fake-purify"]
g_steps = 3

[metrics]
names = ["fake-metric"]
"""


def fake_registry():
    return Registry(plugins_dirs=[FAKES], entry_points=False)


def make_config(tmp_path, text=CONFIG, name="fake.toml"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def run(tmp_path, text=CONFIG, **kw):
    cfg = make_config(tmp_path, text)
    return run_config(cfg, fake_registry(), output=tmp_path / "runs", progress=False, log=lambda m: None,
                      figures=kw.pop("figures", False), **kw)


def test_plan_rounds_only_for_retraining_adaptations(tmp_path):
    cfg = make_config(tmp_path)
    cells = plan_cells(cfg, {"fake-retrain": True, "fake-purify": False})
    assert len(cells) == 2 * 3 * 2 * (3 + 1)
    assert Cell("fake-shift", "fake-gan", "fake-retrain", 2, 1) in cells
    assert not any(c.adaptation == "fake-purify" and c.round > 0 for c in cells)


def test_run_produces_expected_rows(tmp_path):
    out = run(tmp_path)
    rows = out.rows
    assert out.summary.total == len(rows) == 48
    by_key = {(r["defense"], r["model"], r["adaptation"], r["round"], r["seed"]): r for r in rows}
    # the failing defense: every one of its cells is an error, with the message and a traceback
    broken = [r for r in rows if r["defense"] == "fake-broken"]
    assert len(broken) == 16 and all(r["status"] == "error" for r in broken)
    assert "failed on purpose" in broken[0]["error"] and "RuntimeError" in broken[0]["traceback"]
    ok = [r for r in rows if r["defense"] != "fake-broken"]
    assert all(r["status"] == "ok" for r in ok) and out.summary.ok == 32 and len(out.summary.errors) == 16
    for r in ok:
        assert r["fake_l2"] >= 0 and r["fake_boxes"] == 4.0  # fake-det finds 4 faces, fake-blind none
        assert len(r["config_hash"]) == 64 and r["scale"] == "smoke" and r["device"].startswith("cpu")
        assert r["versions"]["torch"] and len(r["perturbation_sha256"]) == 64 and len(r["data_hash"]) == 64
        assert len(r["checkpoint_sha256"]) == 64 and "git_commit" in r and "git_dirty" in r
        if r["round"] == 0:
            assert r["fake_crop_yield"] is None and r["checkpoint_sha256"] == r["base_checkpoint_sha256"]
        else:
            assert 0 <= r["fake_crop_yield"] <= 1 and r["retrain_images"] == 6 and not r["model_unchanged"]
            assert r["checkpoint_sha256"] != r["base_checkpoint_sha256"]
            assert r["adaptation_info"] == {"images": 6, "g_steps": 3}
        assert "retrained_clean_mse" not in r  # a metric plugin now: only where [metrics] names it
    # retraining changes the forgeries; each round builds on the previous one
    r0, r1, r2 = (by_key[("fake-shift", "fake-gan", "fake-retrain", k, 0)] for k in range(3))
    assert len({r0["fake_l2"], r1["fake_l2"], r2["fake_l2"]}) == 3
    assert len({r0["checkpoint_sha256"], r1["checkpoint_sha256"], r2["checkpoint_sha256"]}) == 3
    # the universal defense depends on its seed; round 0 is shared by both adaptations' seeds' models
    assert by_key[("fake-shift", "fake-gan", "fake-retrain", 0, 0)]["perturbation_sha256"] != \
        by_key[("fake-shift", "fake-gan", "fake-retrain", 0, 1)]["perturbation_sha256"]
    assert not any(k[2] == "fake-purify" and k[3] > 0 for k in by_key)
    # outputs written next to the store
    run_dir = out.summary.run_dir
    assert (run_dir / "config.toml").is_file() and (run_dir / "results.csv").is_file()
    assert (run_dir / "perturbations" / "fake-shift-seed0.pt").is_file()
    assert (run_dir / "cache").is_dir()  # kept: some cells failed, a resume may retry them


def test_retrained_clean_mse_is_a_metric_fed_the_original_models_clean_forgeries(tmp_path, monkeypatch):
    """The harness gives metrics the original model's clean forgeries in retraining rounds; the
    retrained_clean_mse plugin turns them into the column (None in round 0), its column reaches
    the tables, and the attacker's choice does not depend on whether the metric is configured."""
    from tsdf_bench.leaderboard import shown_columns
    from tsdf_bench_plugins.metrics.drift import RetrainedCleanMseMetric

    seen = []
    hook = "update" if hasattr(RetrainedCleanMseMetric, "update") else "compute"  # streamed metrics, or whole
    real = getattr(RetrainedCleanMseMetric, hook)

    def spy(self, *args):
        batch = args[-1]
        seen.append((batch.fake_clean, batch.fake_clean_original))
        return real(self, *args)

    monkeypatch.setattr(RetrainedCleanMseMetric, hook, spy)
    registry = Registry(plugins_dirs=[FAKES])  # the built-in metrics and the fakes
    text = CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift"]')
    with_metric = run_config(make_config(tmp_path / "with", text.replace(
        'names = ["fake-metric"]', 'names = ["fake-metric", "retrained_clean_mse"]')), registry,
        output=tmp_path / "with" / "runs", progress=False, log=lambda m: None, figures=False).rows
    assert with_metric and all(r["status"] == "ok" for r in with_metric)
    for r in with_metric:
        assert (r["retrained_clean_mse"] is None) == (r["round"] == 0)
        assert r["round"] == 0 or r["retrained_clean_mse"] > 0  # retraining moved the model
    rounds_k = [s for s in seen if s[1] is not None]  # the batches of the retraining rounds
    assert len(rounds_k) >= sum(r["round"] > 0 for r in with_metric) and len(seen) > len(rounds_k)
    drifts = [float(((fake_clean - original) ** 2).mean()) for fake_clean, original in rounds_k]
    assert all(original.shape == fake_clean.shape for fake_clean, original in rounds_k) and min(drifts) > 0
    values = sorted(r["retrained_clean_mse"] for r in with_metric if r["round"] > 0)
    if len(rounds_k) == len(values):  # one batch per cell: the column is that batch's drift
        assert values == pytest.approx(sorted(drifts), rel=1e-6)  # float32 mean vs summed per pair
    assert "retrained_clean_mse" in shown_columns(with_metric, registry=registry)
    without = run_config(make_config(tmp_path / "without", text), registry, output=tmp_path / "without" / "runs",
                         progress=False, log=lambda m: None, figures=False).rows
    key = lambda r: (r["model"], r["adaptation"], r["round"], r["seed"])  # noqa: E731
    keeps = {key(r): (r.get("attacker_keeps"), r.get("sr_mask_worst")) for r in without}
    assert all("retrained_clean_mse" not in r for r in without)
    assert keeps == {key(r): (r.get("attacker_keeps"), r.get("sr_mask_worst")) for r in with_metric}


def test_runs_are_deterministic(tmp_path):
    a = run(tmp_path / "a").rows
    b = run(tmp_path / "b").rows
    ignored = ("run_id", "timings", "traceback", "git_commit", "git_dirty")  # the lead may commit mid-test
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ignored} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)


def test_no_crop_survives_model_unchanged(tmp_path):
    text = CONFIG.replace('attacker = "fake-det"', 'attacker = "fake-blind"')
    text = text.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift"]')
    text = text.replace("seeds = [0, 1]", "seeds = [0]").replace('names = ["fake-retrain", "fake-purify"]',
                                                                   'names = ["fake-retrain"]')
    rows = run(tmp_path, text).rows
    later = [r for r in rows if r["round"] > 0]
    assert later and all(r["status"] == "ok" for r in rows)
    for r in later:
        assert r["retrain_images"] == 0 and r["model_unchanged"] and r["fake_crop_yield"] == 0.0
        assert r["checkpoint_sha256"] == r["base_checkpoint_sha256"]
        # the attacker's pipeline finds no face in the eval photos either: none can be forged, and the
        # row says so instead of scoring an empty set
        assert r["eval_dropped"] == 4 and r["eval_kept"] == 0 and r.get("sr_mask") is None


def test_failing_metric_is_an_error_cell_and_others_finish(tmp_path):
    text = CONFIG.replace('names = ["fake-gan", "fake-gan8"]', 'names = ["fake-gan"]')
    text = text.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift", "fake-perimage"]')
    text = text.replace("rounds = 2", "rounds = 1").replace("seeds = [0, 1]", "seeds = [0]")
    ok_rows = run(tmp_path / "ok", text).rows
    bad = run(tmp_path / "bad",
              text.replace('names = ["fake-metric"]', 'names = ["fake-metric", "fake-broken-metric"]'))
    assert len(bad.rows) == len(ok_rows) == 6
    assert all(r["status"] == "error" and "failed on purpose" in r["error"] for r in bad.rows)
    assert all(r["status"] == "ok" for r in ok_rows)


def test_keyboard_interrupt_keeps_finished_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_FAKE_INTERRUPT_AFTER", "5")
    monkeypatch.setenv("TSDF_FAKE_COUNTER", str(tmp_path / "counter"))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    store = ResultsStore(tmp_path / "runs" / "results.sqlite")
    (info,) = store.runs()
    assert info["status"] == "interrupted"
    assert len([r for r in store.rows(info["run_id"]) if r["status"] == "ok"]) == 5


def test_misspelt_plugin_option_is_a_config_error(tmp_path):
    from tsdf_bench.errors import ConfigError

    text = CONFIG + "\n[defenses.fake-shift]\nstrenght = 2.0\n"
    with pytest.raises(ConfigError, match=r"\[defenses.fake-shift\].*'strenght'.*Did you mean 'strength'"):
        run(tmp_path, text)
    assert not (tmp_path / "runs").exists()  # refused before any run was created


@pytest.mark.slow
def test_smoke_config_runs_end_to_end_with_the_real_plugins(tmp_path):
    """configs/smoke.toml with the built-in plugins: trains a smoke model, fits, retrains, measures."""
    from tsdf_bench.config import load_config as load

    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "configs" / "smoke.toml")
    out = run_config(cfg, Registry(), output=tmp_path / "runs", progress=False, log=lambda m: None)
    assert [r["status"] for r in out.rows] == ["ok"] * len(out.rows) and len(out.rows) == 4
    for r in out.rows:
        assert r["sr_mask"] is not None and r["det_f1_mtcnn"] is not None and len(r["checkpoint_sha256"]) == 64
        assert (r["crop_yield"] is None) == (r["round"] == 0)
    # every round is judged against the current model's own clean forgery: no defense, no disruption
    # (even though retraining moved the model: its drift is reported separately)
    for r in (r for r in out.rows if r["defense"] == "none"):
        assert r["l2_mask"] == 0 and r["sr_mask"] == 0 and r["l2"] == 0
    assert [r["retrained_clean_mse"] > 0 for r in out.rows if r["round"] == 1] == [True, True]
    # detection rates and the crop yield carry counts per source photo: the eval photos' (as SR_mask's
    # at round 0), and the attacker's collected photos' (one trial per collected photo)
    for r in out.rows:
        eval_photos = set(next(x for x in out.rows if x["round"] == 0)["sr_mask_photos"])
        assert set(r["det_recall_mtcnn_photos"]) <= eval_photos and r["det_recall_mtcnn_n"] > 0
        assert r["det_recall_mtcnn_lo"] <= r["det_recall_mtcnn"] <= r["det_recall_mtcnn_hi"]
        if r["round"]:
            assert not set(r["crop_yield_photos"]) & eval_photos and r["crop_yield_n"] == cfg.data.n_collect
            assert r["crop_yield"] == r["crop_yield_hits"] / r["crop_yield_n"]
    assert sorted(out.files) == ["figures", "leaderboard", "results"]
    assert (out.summary.run_dir / "leaderboard" / "leaderboard.md").is_file()
    # the real plugins' rows follow the one row schema too (tsdf_bench.schema)
    from tsdf_bench import schema
    from tsdf_bench.leaderboard.columns import registry_columns

    from tsdf_bench_plugins.metrics.detection import DetectionMetric

    declared = {c for cols in registry_columns(Registry()).values() for c in cols}
    declared |= {c for d in cfg.detectors.names for c in DetectionMetric.detector_columns(d)}  # per detector
    known = (set(schema.KEY_COLUMNS) | set(schema.PROVENANCE) | set(schema.HARNESS_COLUMNS) | declared
             | {f"{r}{s}" for r in schema.HARNESS_RATES for s in ("", *schema.RATE_SUFFIXES)} | {"timings"})
    assert not {k for r in out.rows for k in r} - known


VARIANT = """
[defenses.fake-shift-half]
plugin = "fake-shift"
strength = 0.5
"""


def test_defense_variants_run_side_by_side(tmp_path):
    """An ablation is a config: a second table for the same plugin, under its own name."""
    text = CONFIG.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift", "fake-shift-half"]')
    text = text.replace("seeds = [0, 1]", "seeds = [0]") + VARIANT
    out = run(tmp_path, text)
    rows = out.rows
    assert all(r["status"] == "ok" for r in rows)
    by = {d: [r for r in rows if r["defense"] == d] for d in ("fake-shift", "fake-shift-half")}
    assert len(by["fake-shift"]) == len(by["fake-shift-half"]) == 8
    assert {r["defense_plugin"] for r in rows} == {"fake-shift"}
    full, half = by["fake-shift"][0], by["fake-shift-half"][0]
    assert full["perturbation_sha256"] != half["perturbation_sha256"]
    from tsdf_bench.defenses.base import load_perturbation

    folder = out.summary.run_dir / "perturbations"
    w_full, _ = load_perturbation(folder / "fake-shift-seed0.pt")
    w_half, _ = load_perturbation(folder / "fake-shift-half-seed0.pt")
    torch.testing.assert_close(w_half, w_full / 2)  # the variant's own option (strength 0.5) was applied


def test_defense_variant_errors_name_the_variant_table(tmp_path):
    from tsdf_bench.errors import ConfigError, UnknownNameError

    text = CONFIG.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift-half"]')
    with pytest.raises(ConfigError, match=r"\[defenses.fake-shift-half\].*'strenght'"):
        run(tmp_path / "typo", text + VARIANT.replace("strength", "strenght"))
    with pytest.raises(UnknownNameError, match="fake-shfit"):
        run(tmp_path / "plugin", text + VARIANT.replace('plugin = "fake-shift"', 'plugin = "fake-shfit"'))
    with pytest.raises(ConfigError, match="plugin must be a defense name"):
        run(tmp_path / "type", text + VARIANT.replace('plugin = "fake-shift"', "plugin = 3"))


def test_a_failed_start_leaves_no_run(tmp_path):
    """A run that dies before storing any cell (here: its data cannot be loaded) is not kept."""
    text = CONFIG.replace('source = "synthetic"', 'source = "folder"\npath = "no-such-folder"')
    with pytest.raises(Exception):
        run(tmp_path, text)
    store = ResultsStore(tmp_path / "runs" / "results.sqlite")
    assert store.runs() == [] and not [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]


def test_transfer_variants_are_fitted_on_their_source_model_alone(tmp_path):
    text = CONFIG.replace('["fake-shift", "fake-perimage", "fake-broken"]', '["fake-shift"]').replace(
        "rounds = 2", "rounds = 0").replace("seeds = [0, 1]", "seeds = [0]").replace(
        'names = ["fake-retrain", "fake-purify"]', 'names = ["fake-retrain"]') + '\n[transfer]\nsources = "all"\n'
    rows = run(tmp_path, text).rows
    by = {(r["defense"], r["model"]): r for r in rows}
    assert set(by) == {(d, m) for d in ("fake-shift", "fake-shift-from-fake-gan", "fake-shift-from-fake-gan8")
                       for m in ("fake-gan", "fake-gan8")}
    assert by[("fake-shift-from-fake-gan8", "fake-gan")]["fit_models"] == ["fake-gan8"]
    assert by[("fake-shift", "fake-gan")]["fit_models"] == ["fake-gan", "fake-gan8"]
    assert all(r["status"] == "ok" for r in rows)


def test_every_provenance_field_a_row_carries_is_documented_in_the_schema(tmp_path):
    """tsdf_bench.schema is the one row schema: a new field must be documented there."""
    from tsdf_bench import schema

    rows = run(tmp_path).rows
    metric_columns = set(fake_registry().get("metric", "fake-metric").factory.columns)
    known = (set(schema.KEY_COLUMNS) | set(schema.PROVENANCE) | set(schema.HARNESS_COLUMNS) | metric_columns
             | {f"{r}{s}" for r in schema.HARNESS_RATES for s in ("", *schema.RATE_SUFFIXES)}
             | {"timings"})
    undocumented = {k for r in rows for k in r} - known
    assert not undocumented, f"document these row fields in tsdf_bench/schema.py: {sorted(undocumented)}"


def test_a_round_on_the_clean_collection_reuses_the_control_instead_of_retraining(tmp_path, monkeypatch):
    """The `none` defense collects the clean photos: its retraining would recompute the control bit
    for bit, so the control is reused (and said so); a defense that changes the crops retrains."""
    from tsdf_bench.harness.attacker import Attacker

    calls = []
    real = Attacker.retrain
    monkeypatch.setattr(Attacker, "retrain", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    text = (CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["none", "fake-shift"]')
            .replace('seeds = [0, 1]', 'seeds = [0]'))
    rows = run_config(make_config(tmp_path, text), Registry(plugins_dirs=[FAKES]), output=tmp_path / "runs",
                      progress=False, log=lambda m: None, figures=False).rows
    retrained = [r for r in rows if r["round"] > 0 and r["adaptation"] == "fake-retrain"]
    assert retrained and all(r["status"] == "ok" for r in retrained)
    for r in retrained:
        same = r["defense"] == "none"
        assert bool(r.get("retrain_is_control")) == same
        assert (r["checkpoint_sha256"] == r["control_checkpoint_sha256"]) == same
    # controls: 2 models x 2 rounds; fake-shift's chains: 2 x 2; none's: reused, not retrained
    assert len(calls) == 8


def test_allow_missing_detectors_leaves_a_broken_detectors_columns_out_and_names_it(tmp_path):
    """A measured detector that fails to load (S3FD without its checkpoint file): without the
    option the preflight stops the run; with ``allow_missing_detectors = true`` the preflight warns,
    the cells are ok, S3FD's columns are absent, the other detector's are there, and each row names
    the missing one."""
    from tsdf_bench.errors import TsdfBenchError
    from tsdf_bench.harness.preflight import preflight

    registry = Registry(plugins_dirs=[FAKES], entry_points=True)
    text = (CONFIG.replace('names = ["fake-det", "fake-blind"]', 'names = ["fake-det", "s3fd"]')
            .replace("[detectors.fake-blind]\nthreshold = -2.0", f'[detectors.s3fd]\ncheckpoint = "{tmp_path}/none.pth"')
            .replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift"]')
            .replace("seeds = [0, 1]", "seeds = [0]").replace("rounds = 2", "rounds = 1")
            .replace('names = ["fake-metric"]', 'names = ["fake-metric", "detection"]'))
    with pytest.raises(TsdfBenchError, match="s3fd"):
        run_config(make_config(tmp_path / "strict", text), registry, output=tmp_path / "strict" / "runs",
                   progress=False, log=lambda m: None, figures=False)
    cfg = make_config(tmp_path / "allowed", text.replace('attacker = "fake-det"',
                                                         'attacker = "fake-det"\nallow_missing_detectors = true'))
    checks = {(c.kind, c.name): c.status for c in preflight(cfg, registry).checks}
    assert checks[("detector", "s3fd")] == "warn" and checks[("detector", "fake-det")] == "ok"
    rows = run_config(cfg, registry, output=tmp_path / "allowed" / "runs", progress=False, log=lambda m: None,
                      figures=False).rows
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert set(r["detectors_missing"]) == {"s3fd"} and "failed to load" in r["detectors_missing"]["s3fd"]
        assert r.get("det_recall_fake-det") is not None and "det_recall_s3fd" not in r
