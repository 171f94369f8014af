"""Bounded memory and phase durations: the clean-forgery cache within its byte budget (a model's
forgeries over it on disk, one model at a time), the controls one seed at a time, rows do not
depend on either bound, and the log has one line per finished phase with its seconds.  The
measurement in batches of eval photos (rows equal to whole tensors', the largest tensor bounded
whatever n_eval): tests/test_streaming.py."""
import gc
import re

import torch

from test_runner import CONFIG, fake_registry, make_config, run

from tsdf_bench.harness import run_config

from tsdf_bench.harness.measure import MeasureMixin

IGNORED = ("run_id", "timings", "traceback", "git_commit", "git_dirty")  # the lead may commit mid-test


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


def test_rows_are_identical_with_and_without_the_bound(tmp_path, monkeypatch):
    sizes = []
    original = MeasureMixin.clean_reference

    def spy(self, model_name, adaptation_name):
        out = original(self, model_name, adaptation_name)
        sizes.append(len({k[0] for k in self._clean_fake}))
        return out

    monkeypatch.setattr(MeasureMixin, "clean_reference", spy)
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 0)  # as at paper scale: every model is over it
    bounded = run(tmp_path / "bounded").rows
    assert sizes and max(sizes) == 1  # one model's clean forgeries at a time (on disk)
    sizes.clear()
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 1 << 30)  # the default: this tiny run fits
    default = run(tmp_path / "default").rows
    assert max(sizes) == 2  # both models of the fake config, for the whole run
    sizes.clear()
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", None)  # the unbounded cache (before)
    unbounded = run(tmp_path / "unbounded").rows
    assert max(sizes) == 2
    assert _strip(default) == _strip(unbounded)
    assert len(bounded) == len(unbounded) > 0
    assert _strip(bounded) == _strip(unbounded)


def test_controls_are_kept_for_the_current_seed_only(tmp_path, monkeypatch):
    seen = []
    original = MeasureMixin._control

    def spy(self, cell):
        out = original(self, cell)
        seen.append({k[2] for k in self.attacker._controls})
        return out

    monkeypatch.setattr(MeasureMixin, "_control", spy)
    rows = run(tmp_path).rows
    assert {r["seed"] for r in rows} == {0, 1}
    assert seen and all(len(s) == 1 for s in seen)


def test_the_log_has_one_line_per_finished_phase_and_metrics_s_is_the_metrics_only(tmp_path):
    lines = []
    out = run_config(make_config(tmp_path), fake_registry(), output=tmp_path / "runs", progress=False,
                     log=lines.append, figures=False)
    phases = {}
    for line in lines:
        m = re.match(r"phase (\w+)\s+([\d.]+) s  (.+)", line)
        if m:
            phases.setdefault(m[1], []).append(float(m[2]))
    assert {"fit", "protect", "prep", "retrain", "control", "forge", "detect", "measure"} <= set(phases)
    ok = [r for r in out.rows if r["status"] == "ok"]
    assert len(phases["measure"]) == len(ok)
    # the control is retrained once per (model, adaptation, round, seed), shared by the defenses
    n_controls = len({(r["model"], r["adaptation"], r["round"], r["seed"]) for r in ok if r["round"] > 0})
    assert len(phases["control"]) == n_controls
    for r in ok:
        t = r["timings"]
        assert {"generate_s", "detect_s", "metrics_s", "fit_s", "protect_s"} <= set(t)
        if r["round"] > 0:
            assert {"control_s", "control_measure_s", "adapt_s", "prep_s"} <= set(t)


def test_protected_caches_of_finished_defenses_are_deleted(tmp_path, monkeypatch):
    """The disk holds about one (seed, defense) of protected images: a group whose cells are all ok
    loses its cache file before the next fit; a group with a failed cell keeps it for --resume."""
    from tsdf_bench.harness.protection import ProtectionMixin

    seen = []
    original = ProtectionMixin.release_finished_caches

    def spy(self):
        removed = original(self)
        seen.append(sorted(p.name.split("-seed")[0] + "-seed" + p.name.split("-seed")[1][:1]
                           for p in (self.run_dir / "cache").glob("protected-*.pt")))
        return removed

    monkeypatch.setattr(ProtectionMixin, "release_finished_caches", spy)
    text = CONFIG.replace('names = ["fake-metric"]', 'names = ["fake-metric", "fake-broken-metric"]')
    text = text.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift", "fake-perimage"]')
    out = run(tmp_path / "broken", text)  # every cell fails (the broken metric): every file is kept
    assert all(r["status"] == "error" for r in out.rows)
    assert len(list((out.summary.run_dir / "cache").glob("protected-*.pt"))) == 4
    seen.clear()
    text = CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]', 'names = ["fake-shift", "fake-perimage"]')
    out = run(tmp_path / "ok", text)
    assert all(r["status"] == "ok" for r in out.rows)
    # before each fit, at most the previous group's file was left (then deleted)
    assert seen == [[], [], [], []]


def test_rows_are_identical_with_every_set_of_photos_mapped(tmp_path, monkeypatch):
    """Every set that grows with the photos (collect and eval photos, protected photos, the
    attacker's crops) in a memory-mapped file, as at paper scale: the rows of the all-in-memory
    run, and the files are in the run's cache folder while it retrains."""
    from tsdf_bench.harness import mapped
    from tsdf_bench.harness.attacker import Attacker

    seen = []
    original = Attacker.retrain

    def spy(self, model, collection, *args, **kwargs):
        seen.append(mapped.mapped_files(self.folder))
        return original(self, model, collection, *args, **kwargs)

    monkeypatch.setattr(Attacker, "retrain", spy)
    in_memory = run(tmp_path / "memory").rows
    assert seen and not any(seen)  # the fake run's sets are tiny: in memory
    seen.clear()
    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    out = run(tmp_path / "mapped")
    assert _strip(out.rows) == _strip(in_memory) and any(r["status"] == "ok" for r in out.rows)
    files = set().union(*seen)
    anonymous = [f for f in files if f.endswith("(deleted)")]  # photos and crops: unlinked at once
    named = [f for f in files if "/protected-" in f and f.endswith(".npy")]  # the --resume cache
    assert anonymous and named, files


def _fitted_with_mapped_sets(tmp_path, monkeypatch):
    """Every set mapped; fake-shift fitted once for seed 0 by a runner that is then gone: the config,
    the store, the cache folder and what the fit gave (sets, timings, perturbation digest)."""
    from tsdf_bench.harness import ResultsStore, mapped
    from tsdf_bench.harness.runner import Runner

    monkeypatch.setattr(mapped, "MAP_ABOVE_BYTES", 0)
    cfg = make_config(tmp_path, CONFIG)
    store = ResultsStore(tmp_path / "results.sqlite")
    first = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False).protect(0, "fake-shift")
    expected = first.collect.clone(), first.eval.clone(), first.timings, first.perturbation_sha256
    del first
    gc.collect()
    return cfg, store, tmp_path / "run" / "cache", expected


def test_mapped_protected_sets_are_reused_on_resume_and_deleted_when_finished(tmp_path, monkeypatch):
    from tsdf_bench.harness import mapped
    from tsdf_bench.harness.runner import Runner

    cfg, store, cache, expected = _fitted_with_mapped_sets(tmp_path, monkeypatch)
    assert sorted(p.name.split(".", 1)[1] for p in cache.glob("protected-fake-shift-seed0-*")) == [
        "collect.npy", "eval.npy", "pt"]
    assert not mapped.mapped_files(cache)  # nothing of the fit is left in this process

    def refit(*args, **kwargs):
        raise AssertionError("the defense was fitted again")

    again = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False)
    monkeypatch.setattr(type(again.registry.create("defense", "fake-shift")), "fit", refit)
    resumed = again.protect(0, "fake-shift")  # from the files
    reopened = [f for f in mapped.mapped_files(cache) if "/protected-" in f]  # (the photos are mapped too)
    assert sorted(f.rsplit(".", 2)[-2] for f in reopened) == ["collect", "eval"]
    assert torch.equal(resumed.collect, expected[0]) and torch.equal(resumed.eval, expected[1])
    assert (resumed.timings, resumed.perturbation_sha256) == expected[2:]
    every_cell = {tuple(c) for c in again.cells()}
    monkeypatch.setattr(store, "done", lambda run_id: every_cell)  # as if every cell were stored ok
    assert again.release_finished_caches() == 3  # the .pt and both mapped sets
    assert not list(cache.glob("protected-fake-shift-seed0-*"))


def test_a_defense_returning_the_wrong_shape_is_named(tmp_path, monkeypatch):
    """Protected photos are written into their set batch by batch: a plugin whose protect() returns
    another shape fails with its name and the rule, not a broadcasting error."""
    import pytest

    from tsdf_bench.errors import TsdfBenchError
    from tsdf_bench.harness import ResultsStore
    from tsdf_bench.harness.runner import Runner

    registry = fake_registry()
    monkeypatch.setattr(type(registry.create("defense", "fake-perimage")), "protect",
                        lambda self, images, attrs=None: images[:1])
    runner = Runner(make_config(tmp_path, CONFIG), registry, ResultsStore(tmp_path / "r.sqlite"), "r",
                    tmp_path / "run", progress=False)
    with pytest.raises(TsdfBenchError, match=r"defense 'fake-perimage' .* returned protected images of shape "
                                             r"\(1, 3, 32, 32\) for a batch of \(3, 3, 32, 32\)"):
        runner.protect(0, "fake-perimage")


def test_a_damaged_protected_cache_is_fitted_again_not_reused(tmp_path, monkeypatch):
    """--resume after a mapped protected set was deleted or truncated: a log line names the cache
    and the defense is fitted again (same values: the fit is seeded), never a half-read set."""
    from tsdf_bench.harness.runner import Runner

    cfg, store, cache, expected = _fitted_with_mapped_sets(tmp_path, monkeypatch)
    for damage in ("delete", "truncate"):
        (target,) = cache.glob("protected-fake-shift-seed0-*.eval.npy")
        if damage == "delete":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[:200])
        lines = []
        runner = Runner(cfg, fake_registry(), store, "r", tmp_path / "run", progress=False, log=lines.append)
        again = runner.protect(0, "fake-shift")
        assert any("cannot be reused" in line and "fitting the defense again" in line for line in lines), lines
        assert any(line.startswith("fitting defense fake-shift") for line in lines)
        assert torch.equal(again.collect, expected[0]) and again.perturbation_sha256 == expected[3]
        del again, runner
        gc.collect()
