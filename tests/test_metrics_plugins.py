"""The built-in metric plugins: registered by name, columns honoured, batch cases."""
import pytest
import torch

from tsdf_bench.detectors.base import Detections
from tsdf_bench.metrics import EvalBatch, Metric
from tsdf_bench.plugins import Registry

NAMES = ("forgery", "invisibility", "detection", "crop_yield")


@pytest.fixture(scope="module")
def registry():
    return Registry(strict=True)


def _det(boxes, scores):
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores, dtype=torch.float32))


def _batch(round_k=False):
    torch.manual_seed(0)
    clean = torch.rand(2, 3, 8, 8) * 2 - 1
    protected = (clean + 0.03 * torch.randn_like(clean).sign()).clamp(-1, 1)
    fake_clean = (clean.unsqueeze(1) * -1).repeat(1, 5, 1, 1, 1)  # an "edit" that changes every pixel
    fake_protected = fake_clean.clone()
    fake_protected[0] += 0.5                                       # image 0 disrupted on all 5 targets
    face = [[0, 0, 40, 40]]
    return EvalBatch(
        clean=clean, protected=protected, fake_clean=fake_clean, fake_protected=fake_protected.clamp(-1, 1),
        detections_clean={"mtcnn": [_det(face, [0.99]), _det(face, [0.98])],
                          "retinaface": [_det(face, [0.9]), _det(face, [0.9])]},
        detections_protected={"mtcnn": [_det(face, [0.95]), _det([], [])],
                              "retinaface": [_det(face, [0.92]), _det(face, [0.91])]},
        crop_kept=[True, False] if round_k else None,
    )


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_keys_within_columns(registry, name):
    metric = registry.create("metric", name)
    assert isinstance(metric, Metric) and metric.name == name
    batch = _batch(round_k=True)
    out = metric.compute(batch)
    assert set(out) <= set(metric.columns_for(batch))
    assert set(out) <= set(metric.columns)
    assert any(v is not None for v in out.values())


def test_forgery_columns_on_a_half_disrupted_batch(registry):
    out = registry.create("metric", "forgery").compute(_batch())
    assert set(out) == {"l2_mask", "sr_mask", "l2", "sr_ruiz", "psnr_out", "ssim_out"}
    assert out["sr_mask"] == 0.5 and out["sr_ruiz"] == 0.5
    assert 0 < out["ssim_out"] < 1


def test_forgery_without_forgeries_gives_none(registry):
    batch = _batch()
    batch.fake_clean = batch.fake_protected = None
    assert set(registry.create("metric", "forgery").compute(batch).values()) == {None}


def test_invisibility_linf(registry):
    out = registry.create("metric", "invisibility").compute(_batch())
    assert out["linf"] == pytest.approx(0.03, abs=1e-6)
    assert set(out) == {"psnr_in", "ssim_in", "linf", "l2_in"}


def test_detection_per_detector_and_mean_f1(registry):
    metric = registry.create("metric", "detection")
    out = metric.compute(_batch())
    assert out["det_f1_retinaface"] == 1.0
    assert out["det_recall_mtcnn"] == 0.5 and out["det_precision_mtcnn"] == 1.0
    assert out["det_f1_mtcnn"] == pytest.approx(2 / 3)
    assert out["duq_mtcnn"] == 0.5
    assert out["det_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert "det_f1_mtcnn" in metric.columns  # remembered after compute


def test_detection_with_named_missing_detector_is_an_error(registry):
    from tsdf_bench.errors import TsdfBenchError

    metric = registry.create("metric", "detection", detectors=["s3fd"])
    with pytest.raises(TsdfBenchError, match="s3fd"):
        metric.compute(_batch())


def test_crop_yield_none_in_round_zero(registry):
    metric = registry.create("metric", "crop_yield")
    assert metric.compute(_batch(round_k=False)) == {"crop_yield": None}
    assert metric.compute(_batch(round_k=True)) == {"crop_yield": 0.5}
