"""Measuring in batches of eval photos (issue 13, bounded memory): the batches, the interleaved
generation streams, clean forgeries on disk, the metrics' streaming protocol, rows equal to those
of whole tensors, and the largest tensor a cell's measurement makes does not grow with n_eval."""
import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from test_runner import CONFIG, FAKES, make_config

from tsdf_bench.harness import run_config
from tsdf_bench.harness.measure import MeasureMixin
from tsdf_bench.harness.streaming import DiskTensor, Generation, max_measure_rows, measure_slices
from tsdf_bench.metric_streaming import MetricPasses, WholeBatch, metric_streams, needs_images, run_batches
from tsdf_bench.metrics import EvalBatch, Metric
from tsdf_bench.plugins import Registry

IGNORED = ("run_id", "timings", "traceback", "git_commit", "git_dirty")  # the lead may commit mid-test
BUILTIN = ["forgery", "invisibility", "retrained_clean_mse", "detection", "crop_yield"]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows]


def _registry():
    return Registry(plugins_dirs=[FAKES])  # the fakes and the built-in metrics


def _run(tmp_path, text):
    return run_config(make_config(tmp_path, text), _registry(), output=tmp_path / "runs", progress=False,
                      log=lambda m: None, figures=False)


# -- the pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_measure_slices_cover_every_photo_and_never_leave_one_alone(n, batch_size):
    slices = measure_slices(n, batch_size)
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert all(2 <= k <= max_measure_rows(batch_size) for k in sizes) or n <= 1
    assert slices == [slice(0, 0)] if n == 0 else True


def test_a_disk_tensor_gives_back_its_bytes_and_its_file_goes(tmp_path):
    t = torch.randn(7, 3, 3, 5, 5)
    disk = DiskTensor(tmp_path / "x.f32", t.shape)
    for s in (slice(0, 3), slice(3, 7)):
        disk.write(s.start, t[s])
    assert disk.nbytes == t.numel() * 4 == (tmp_path / "x.f32").stat().st_size
    assert torch.equal(disk[0:7], t) and torch.equal(disk[2:5], t[2:5]) and disk[7:7].shape == (0, 3, 3, 5, 5)
    assert torch.equal(DiskTensor.of(tmp_path / "y.f32", t[1:3])[:], t[1:3])
    with pytest.raises(ValueError):
        disk.write(0, torch.zeros(1, 3, 3, 5, 4))
    disk.delete()
    assert not (tmp_path / "x.f32").exists()


def _random_stream(n, batch, seed):
    """A generation stream that draws random numbers (as a stochastic generator would)."""
    torch.manual_seed(seed)
    for i in range(0, n, batch):
        k = min(batch, n - i)
        yield slice(i, i + k), torch.randn(k, 2, 3)


def test_interleaved_generation_streams_yield_what_each_yields_alone():
    alone = {s: torch.cat([p for _, p in _random_stream(9, 2, s)]) for s in (1, 2)}
    a, b = Generation(_random_stream(9, 2, 1)), Generation(_random_stream(9, 2, 2))
    torch.manual_seed(123)
    parts = {1: [], 2: []}
    for rows in (3, 2, 4):  # not the streams' own batch size
        parts[1].append(a.take(rows))
        torch.randn(5)  # code between batches that draws random numbers moves nothing of the streams
        parts[2].append(b.take(rows))
    assert torch.equal(torch.cat(parts[1]), alone[1]) and torch.equal(torch.cat(parts[2]), alone[2])
    after = torch.randn(3)  # nor do the streams move the global state
    torch.manual_seed(123)
    for _ in range(3):
        torch.randn(5)
    assert torch.equal(after, torch.randn(3))
    a.restore_rng()  # the state whole-tensor generation would have left
    after = torch.randn(4)
    for _ in _random_stream(9, 2, 1):
        pass
    assert torch.equal(after, torch.randn(4))


# -- the metric protocol ---------------------------------------------------------------------
class Energy:
    """A third-party metric with compute() only (as in docs/plugins.md)."""

    name = "energy"
    columns = ("energy",)

    def compute(self, batch):
        return {"energy": float(((batch.protected - batch.clean) ** 2).mean()), "n": batch.fake_clean.shape[0]}


class Counting(Metric):
    """A Metric subclass that needs only the detections."""

    name = "counting"
    needs = ("detections_clean",)

    def compute(self, batch):
        self.seen = batch
        return {"dets": len(batch.detections_clean["d"])}


def _cell(n=7, t=3, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    from tsdf_bench.detectors.base import Detections

    dets = [Detections(torch.tensor([[1.0, 1, 6, 6]]), torch.tensor([0.9])) for _ in range(n)]
    return dict(clean=u(n, 3, s, s), protected=u(n, 3, s, s), fake_clean=u(n, t, 3, s, s),
                fake_protected=u(n, t, 3, s, s), fake_clean_original=u(n, t, 3, s, s),
                detections_clean={"d": dets}, detections_protected={"d": dets}, crop_kept=[True, False, True],
                eval_photos=[f"p{i // 2}" for i in range(n)], crop_photos=["a", "b", "b"])


def _batches(whole, slices):
    tensors = ("clean", "protected", "fake_clean", "fake_protected", "fake_clean_original")
    return [EvalBatch(**{k: (v[s] if k in tensors and v is not None else v) for k, v in whole.items()})
            for s in slices]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_metrics_stream_and_give_the_columns_of_the_whole_batch(name):
    metric = _registry().create("metric", name)
    assert metric_streams(metric) or not needs_images(metric)  # nothing per eval photo is held whole
    whole = _cell()
    expected = metric.compute(EvalBatch(**whole))
    for slices in ([slice(0, 2), slice(2, 4), slice(4, 7)], [slice(0, 3), slice(3, 7)]):
        assert run_batches(metric, _batches(whole, slices)) == expected


def test_whole_batch_metrics_get_the_cell_concatenated_with_the_fields_they_need():
    whole = _cell()
    passes = MetricPasses([Energy(), Counting()])
    assert passes.streaming == [False, False]
    for batch in _batches(whole, [slice(0, 3), slice(3, 7)]):
        passes.update(batch)
    out = passes.finish()
    assert out == {**Energy().compute(EvalBatch(**whole)), "dets": 7} and out["n"] == 7
    alone = Counting()
    assert run_batches(alone, _batches(whole, [slice(0, 3), slice(3, 7)])) == {"dets": 7}
    assert alone.seen.clean is None and alone.seen.fake_clean is None  # not asked for: not kept
    kept = WholeBatch(("crop_kept",))
    kept.add(_batches(whole, [slice(0, 2)])[0])
    assert kept.batch().clean is None and kept.batch().crop_kept == [True, False, True]
    with pytest.raises(NotImplementedError, match="neither"):
        type("Empty", (Metric,), {"name": "empty"})().compute(EvalBatch(**whole))


def test_identity_and_lpips_metrics_stream_too():
    from tsdf_bench_plugins.metrics.identity import IdentityMetric
    from tsdf_bench_plugins.metrics.perceptual import LpipsMetric

    assert metric_streams(IdentityMetric()) and metric_streams(LpipsMetric.__new__(LpipsMetric))


def test_identity_metric_gives_the_whole_batch_columns_batch_by_batch():
    pytest.importorskip("dlib", reason="the identity metric needs dlib-bin (bootstrap.py installs it)")
    from tsdf_bench.data.embedded import load_embedded
    from tsdf_bench_plugins.metrics.identity import IdentityMetric

    faces = load_embedded(image_size=128, n_train=5, n_eval=0).train.images
    fc = torch.stack([faces, faces.flip(-1)], 1)  # 2 "targets" per face
    fp = torch.stack([faces.roll(1, 0), faces.flip(-2)], 1)
    whole = dict(clean=faces, protected=faces, fake_clean=fc, fake_protected=fp)
    expected = IdentityMetric().compute(EvalBatch(**whole))
    assert all(v is not None for v in expected.values())
    assert run_batches(IdentityMetric(), _batches(whole, [slice(0, 2), slice(2, 5)])) == expected


def test_lpips_scores_the_same_chunks_whatever_the_batches():
    from tsdf_bench_plugins.metrics.perceptual import LpipsMetric

    class FakeNet(torch.nn.Module):  # stands in for the LPIPS network (no backbone file needed)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.chunks = []

        def forward(self, x, y):
            self.chunks.append(x.shape[0])
            return ((x - y) ** 2).flatten(1).mean(1).view(-1, 1, 1, 1) * self.w

    metric = LpipsMetric.__new__(LpipsMetric)
    metric.batch_size, metric._model = 4, FakeNet()
    whole = _cell(n=5, t=3)
    expected = metric.compute(EvalBatch(**whole))
    chunks, metric._model.chunks = sorted(metric._model.chunks), []
    assert chunks == [1, 3, 4, 4, 4, 4]  # 5 inputs: 4 + 1; 15 pairs: 4 + 4 + 4 + 3
    assert run_batches(metric, _batches(whole, [slice(0, 2), slice(2, 3), slice(3, 5)])) == expected
    assert sorted(metric._model.chunks) == chunks


# -- the measuring stage ---------------------------------------------------------------------
def _whole_measure(self, cell, state, prot, timings):
    """The measuring stage on whole tensors (before issue 13's streaming), as the reference."""
    from tsdf_bench.harness.attacker import _purify_key, keeps
    from tsdf_bench.harness.data import select_attrs, to_size
    from tsdf_bench.harness.state import _seed
    from tsdf_bench.metrics import MASK_THRESHOLD, SUCCESS_THRESHOLD, clean_drift, edit_mask, l2_mask

    def whole(model, images, attrs, seed_keys):
        x = to_size(images, model.image_size)
        a = select_attrs(attrs, self.data.attr_names, model.attributes, model.name)
        _seed(*seed_keys)
        generate = getattr(model, "generate_targets", None) or model.generate_all
        with torch.no_grad():
            return torch.cat([generate(x[s], a[s]).float() for s in self._batches(x.shape[0])])

    def scores(fake, ref, x):
        l2 = l2_mask(fake, ref, edit_mask(ref, x, MASK_THRESHOLD))
        return l2, l2 > SUCCESS_THRESHOLD

    adaptation, model, base = self.adaptations[cell.adaptation], state.model, self.model(cell.model)
    if cell.round == 0:
        _purify_key(adaptation)
        purified = self.cfg.adaptations.compare_to(cell.adaptation) == "purified"
        clean = adaptation.purify(self.data.eval.images) if purified else self.data.eval.images
        x_clean = to_size(clean, model.image_size)
        reference = whole(base, clean, self.data.eval.attrs, (0, "clean", cell.model))
        x_prot = to_size(adaptation.purify(prot.eval), model.image_size)
        attrs, photos, extra = self.data.eval.attrs, self.data.eval.photos, {}
    else:
        fg = self.forgeable(prot, model.image_size, adaptation)
        x_clean, x_prot, attrs = fg.clean, fg.protected, self.data.eval.attrs[fg.kept]
        photos = [self.data.eval.photos[i] for i in fg.kept]
        reference = whole(model, x_clean, attrs, (cell.seed, "own-clean", *cell)) if fg.kept else None
        extra = {"eval_kept": len(fg.kept), "eval_dropped": fg.n_photos - len(fg.kept)}
    forged = x_prot.shape[0] > 0
    fake = whole(model, x_prot, attrs, (cell.seed, "forge", *cell)) if forged else None
    original = whole(base, x_clean, attrs, (cell.seed, "orig-clean", *cell)) if forged and cell.round else None
    names = list(self.cfg.detectors.names)
    batch = EvalBatch(clean=x_clean, protected=x_prot, fake_clean=reference if forged else None,
                      fake_protected=fake, fake_clean_original=original,
                      detections_clean={d: self.clean_detections(d) for d in names},
                      detections_protected={d: self.protected_detections(prot, d) for d in names},
                      crop_kept=state.usable if cell.round > 0 else None, eval_photos=self.data.eval.photos,
                      crop_photos=self.data.collect.photos if cell.round > 0 else None)
    metrics = dict(extra)
    for metric in self.metrics:
        metrics.update(metric.compute(batch))
    if forged:
        success = scores(fake, reference, x_clean)[1]
        metrics.update(self._rate_columns("sr_mask", success, photos))
        if cell.round > 0:
            control = self._control(cell)
            scored = {}
            for role, m, ref in (("orig", base, original), ("ctrl", control.model, None)):
                ref = ref if ref is not None else whole(m, x_clean, attrs, (cell.seed, f"{role}-clean", *cell))
                l2, scored[role] = scores(whole(m, x_prot, attrs, (cell.seed, f"{role}-forge", *cell)), ref, x_clean)
                metrics.update(self._rate_columns(f"sr_mask_{role}", scored[role], photos))
                metrics[f"l2_mask_{role}"] = float(torch.nan_to_num(l2).mean())
            own = float(success.float().mean())
            metrics["adaptation_gain"] = metrics["sr_mask_ctrl"] - own
            sr = lambda t: float(t.double().mean())  # noqa: E731
            best = keeps(clean_drift(reference, original), sr(success), sr(scored["orig"]))
            metrics.update(self._rate_columns("sr_mask_worst", {"original": scored["orig"], "retrained": success}[best],
                                              photos), attacker_keeps=best)
    return metrics


STREAM_CONFIG = CONFIG.replace("n_eval = 4", "n_eval = 7").replace(
    'names = ["fake-metric"]', f'names = ["fake-metric", {", ".join(repr(m) for m in BUILTIN)}]'.replace("'", '"'))


def test_streamed_measurement_gives_the_rows_of_whole_tensors(tmp_path, monkeypatch):
    """7 eval photos in batches of 3 (a last photo joined to the batch before; generation batches of
    3 regrouped), with the built-in metrics, a whole-batch metric (fake-metric), two retraining
    rounds with the original model and the control: the rows of the whole-tensor measurement, with
    the clean forgeries in memory or on disk."""
    text = STREAM_CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]',
                                 'names = ["fake-shift", "fake-perimage"]')
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 0)  # every entry on disk
    on_disk = _run(tmp_path / "disk", text).rows
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 1 << 30)
    in_memory = _run(tmp_path / "memory", text).rows
    monkeypatch.setattr(MeasureMixin, "measure", _whole_measure)
    whole = _run(tmp_path / "whole", text).rows
    assert len(on_disk) == len(whole) > 0 and all(r["status"] == "ok" for r in whole)
    assert {"retrained_clean_mse", "ssim_out", "psnr_in", "sr_mask_ctrl"} <= set(whole[-1])
    assert _strip(on_disk) == _strip(whole)
    assert _strip(in_memory) == _strip(whole)


class LargestTensor(TorchDispatchMode):
    """The most values of any forgery-like tensor made while active: 5-d ([N, T, 3, s, s]) or float64
    (the metrics' [0, 1] copies of the pairs) - the tensors that were whole before issue 13."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (t.dim() >= 5 or t.dtype == torch.float64):
                self.largest = max(self.largest, t.numel())
        return out


MEMORY_CONFIG = """
[run]
scale = "smoke"
seeds = [0]
device = "cpu"
rounds = 1
[data]
source = "synthetic"
image_size = 16
n_train_defense = 2
n_collect = 4
n_eval = {n_eval}
batch_size = 4
[models]
names = ["fake-gan"]
train = false
[defenses]
names = ["fake-shift"]
[detectors]
names = ["fake-det"]
attacker = "fake-det"
[adaptations]
names = ["fake-retrain"]
g_steps = 2
[metrics]
names = {metrics}
"""


def _largest(tmp_path, monkeypatch, n_eval, measure=None):
    mode = LargestTensor()
    inner = measure or MeasureMixin.measure

    def recorded(self, *args):
        with mode:
            return inner(self, *args)

    monkeypatch.setattr(MeasureMixin, "measure", recorded)
    text = MEMORY_CONFIG.format(n_eval=n_eval, metrics=str(BUILTIN).replace("'", '"'))
    rows = _run(tmp_path / f"n{n_eval}-{measure is None}", text).rows
    assert rows and all(r["status"] == "ok" for r in rows)
    return mode.largest


def test_the_largest_tensor_of_a_measurement_does_not_grow_with_n_eval(tmp_path, monkeypatch):
    """Fails if the measuring stage holds whole-cell forgeries again: the largest forgery-like tensor
    made while measuring (clean forgeries on disk, as at paper scale) is bounded by one batch
    (at most max_measure_rows(4) photos x 2 targets x 3 x 16 x 16), the same at 8 and 32 eval
    photos, while the whole-tensor measurement's grows 4x."""
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 0)
    small, large = (_largest(tmp_path, monkeypatch, n) for n in (8, 32))
    assert small == large <= max_measure_rows(4) * 2 * 3 * 16 * 16
    whole_small, whole_large = (_largest(tmp_path, monkeypatch, n, _whole_measure) for n in (8, 32))
    assert whole_large == 4 * whole_small > large  # the recorder sees whole tensors when they are made


def test_clean_forgeries_over_the_budget_live_on_disk_and_go_with_the_run(tmp_path, monkeypatch):
    """Budget 0 (as at paper scale, where a model's clean forgeries exceed the 1 GB budget): no
    memory held by the cache, one model's files on disk at a time, none left after the run."""
    seen = []
    original = MeasureMixin.clean_reference

    def spy(self, model_name, adaptation_name):
        entry = original(self, model_name, adaptation_name)
        seen.append((self.clean_cache_ram_bytes(), {k[0] for k, e in self._clean_fake.items() if e.disk_bytes},
                     sorted(p.name for p in self._clean_dir.glob("*.f32"))))
        return entry

    monkeypatch.setattr(MeasureMixin, "clean_reference", spy)
    monkeypatch.setattr(MeasureMixin, "clean_cache_bytes", 0)
    out = _run(tmp_path, STREAM_CONFIG.replace('names = ["fake-shift", "fake-perimage", "fake-broken"]',
                                               'names = ["fake-shift"]'))
    assert seen and all(ram == 0 and len(models) == 1 and files for ram, models, files in seen)
    # fake-gan at 16 px from 32 px data: its inputs are a resized copy, on disk too
    assert any(any(f.endswith("-inputs.f32") for f in files) for _, _, files in seen)
    assert not list((out.summary.run_dir / "cache").glob("clean-forgeries-*/*"))


def test_the_docs_example_metric_still_runs_as_a_whole_batch_metric():
    whole = _cell()
    assert not metric_streams(Energy()) and needs_images(Energy())
    expected = Energy().compute(EvalBatch(**whole))
    assert run_batches(Energy(), _batches(whole, [slice(0, 4), slice(4, 7)])) == expected
