"""The CUDA path, on a machine with a GPU (skipped, with the reason shown, where there is none).

CI has no GPU; these run on a GPU machine through ``benchmarks/cuda_check.py`` (which runs this
file first) or ``.venv/bin/python -m pytest tests/test_cuda.py``.  They check what no CPU test can:
that every stage that runs on the config's device keeps its tensors there (training and the
attacker's retraining with a CPU-held discriminator and CPU crops, defense fitting against models
and detectors on the GPU, a whole run with ``device = "cuda"``), and that the GPU-only
optimisations (bf16 autocast, channels_last) keep the rows within tolerance of fp32.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

ROOT = Path(__file__).resolve().parents[1]


def smoke_faces(n=8, size=64):
    from tsdf_bench.data.embedded import load_embedded

    faces = load_embedded(image_size=size, n_train=n, n_eval=0).train
    return faces.images[:n], faces.attrs[:n], faces.attr_names


def test_training_runs_on_the_models_device_with_cpu_data_and_discriminator():
    from tsdf_bench.harness.data import select_attrs
    from tsdf_bench.models.training import train
    from tsdf_bench.plugins import get_registry

    model = get_registry().create("model", "stargan", scale="smoke").cuda()
    images, attrs, names = smoke_faces()
    attrs = select_attrs(attrs, names, model.attributes, "stargan")
    result = train(model, images, attrs, 6, discriminator=model.make_discriminator(), batch_size=4,
                   progress=False, seed=0)
    assert next(result.model.parameters()).is_cuda and next(result.discriminator.parameters()).is_cuda
    values = [v for row in result.history for k, v in row.items() if k not in ("step", "part")]
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_retrain_adaptation_returns_a_cuda_copy_and_leaves_the_original():
    from tsdf_bench.harness.data import select_attrs
    from tsdf_bench.plugins import get_registry

    reg = get_registry()
    model = reg.create("model", "attgan", scale="smoke").cuda().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, attrs, names = smoke_faces()
    attrs = select_attrs(attrs, names, model.attributes, "attgan")
    adapt = reg.create("adaptation", "retrain", batch_size=4)
    new = adapt.adapt(model, images, attrs, steps=4, seed=0, discriminator=model.make_discriminator())
    assert next(new.parameters()).is_cuda
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in new.state_dict().items())


def test_tsdf_fits_on_the_gpu_against_gpu_models_and_detectors():
    from tsdf_bench.harness.data import select_attrs
    from tsdf_bench.plugins import get_registry

    reg = get_registry()
    models = [reg.create("model", n, scale="smoke").cuda().eval() for n in ("stargan", "attgan")]
    dets = [reg.create("detector", n).cuda().eval() for n in ("mtcnn", "retinaface")]
    images, attrs, names = smoke_faces(4)
    attr_map = {m.name: select_attrs(attrs, names, m.attributes, m.name).cuda() for m in models}
    tsdf = reg.create("defense", "tsdf", seed=0, device="cuda", passes=1, batch_size=4, max_images=4,
                      feature_steps=1, step=0.005, poison_steps=3)
    tsdf.fit(images.cuda(), attr_map, models, dets)
    w = tsdf.perturbation
    assert w.is_cuda and w.abs().max() <= tsdf.eps + 1e-6
    protected = tsdf.protect(images.cuda())
    assert protected.is_cuda and protected.min() >= -1 and protected.max() <= 1


def test_smoke_run_on_cuda_matches_the_cpu_rows_within_tolerance(tmp_path):
    """configs/smoke.toml on CUDA (optimisations on: bf16 autocast, channels_last) vs on CPU."""
    from tsdf_bench.config import load_config
    from tsdf_bench.harness import run_config
    from tsdf_bench.plugins import get_registry

    reg = get_registry()
    cfg = load_config(ROOT / "configs" / "smoke.toml").replace(run__publish="")
    rows = {}
    for device in ("cpu", "cuda"):
        out = run_config(cfg.replace(run__device=device), reg, output=tmp_path / device, progress=False,
                         log=lambda m: None, figures=False)
        assert [r["status"] for r in out.rows] == ["ok"] * len(out.rows), [r["error"] for r in out.rows]
        assert {r["device"].split(":")[0] for r in out.rows} == {device}
        rows[device] = {(r["defense"], r["round"]): r for r in out.rows}
    assert rows["cpu"].keys() == rows["cuda"].keys()
    for key, gpu in rows["cuda"].items():
        cpu = rows["cpu"][key]
        if key[0] == "none":
            assert gpu["l2_mask"] == 0 and gpu["sr_mask"] == 0
        # the perturbation is fitted and applied the same way; forgeries differ by bf16 rounding
        assert gpu["linf"] == pytest.approx(cpu["linf"], rel=1e-4)
        assert gpu["psnr_in"] == pytest.approx(cpu["psnr_in"], rel=1e-3)
        assert gpu["det_recall_mtcnn"] == pytest.approx(cpu["det_recall_mtcnn"], abs=0.25)


@pytest.mark.parametrize("name, options, loop", [
    ("cmua", {"batch_size": 4, "max_images": 4}, "iterations"),
    ("found", {"max_images": 4, "feature_steps": 1}, "passes"),
    ("tsdf", {"max_images": 4, "feature_steps": 1, "poisoning": False}, "passes"),
    ("pgd", {"max_targets": 2}, "iterations"),
])
def test_attack_loops_never_wait_for_the_gpu(name, options, loop):
    """Issue 6: no host-device synchronisation inside the attack loops.  With the sync debug mode
    on, torch warns at every synchronising call; doubling the loop count must not add any (the
    few after the loop -- the loss history, provenance -- are allowed)."""
    import warnings

    from tsdf_bench.harness.data import select_attrs
    from tsdf_bench.plugins import get_registry

    reg = get_registry()
    models = [reg.create("model", n, scale="smoke").cuda().eval() for n in ("stargan", "attgan")]
    images, attrs, names = smoke_faces(4)
    images = images.cuda()
    attr_map = {m.name: select_attrs(attrs, names, m.attributes, m.name).cuda() for m in models}

    def syncs(count: int) -> int:
        defense = reg.create("defense", name, seed=0, device="cuda", **options, **{loop: count})
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                defense.fit(images, attr_map, models, [])
                defense.protect(images, attr_map)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(4) == syncs(2)
