"""The built-in metric plugins: registered by name, columns honoured, batch cases."""
import pytest
import torch

from tsdf_bench.detectors.base import Detections
from tsdf_bench.metrics import EvalBatch, Metric
from tsdf_bench.plugins import Registry

NAMES = ("forgery", "invisibility", "detection", "crop_yield", "retrained_clean_mse")


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
        fake_clean_original=(fake_clean + 0.1).clamp(-1, 1) if round_k else None,  # the original model's
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


def test_retrained_clean_mse_is_the_drift_of_the_clean_forgeries(registry):
    metric = registry.create("metric", "retrained_clean_mse")
    assert metric.columns == ("retrained_clean_mse",)
    batch = _batch(round_k=True)
    batch.fake_clean_original = batch.fake_clean.clone()
    batch.fake_clean_original[1] += 0.5  # half of the images moved by 0.5 everywhere
    assert metric.compute(batch)["retrained_clean_mse"] == pytest.approx(0.25 / 2)
    batch.fake_clean_original = batch.fake_clean.clone()
    assert metric.compute(batch)["retrained_clean_mse"] == 0.0  # retraining left the forgeries alone
    assert metric.compute(_batch())["retrained_clean_mse"] is None  # round 0: nothing was retrained
    batch.fake_clean_original = batch.fake_clean[:, :2]
    with pytest.raises(Exception, match="shapes differ"):
        metric.compute(batch)


def test_invisibility_linf(registry):
    out = registry.create("metric", "invisibility").compute(_batch())
    assert out["linf"] == pytest.approx(0.03, abs=1e-6)
    assert set(out) == {"psnr_in", "ssim_in", "linf", "l2_in", "ssim_in_paper"}


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
    out = metric.compute(_batch(round_k=True))  # no crop_photos: each collected photo is its own cluster
    assert out["crop_yield"] == 0.5 and (out["crop_yield_hits"], out["crop_yield_n"]) == (1, 2)
    assert out["crop_yield_photos"] == {"0": [1, 1], "1": [0, 1]}


def test_crop_yield_counts_and_interval_cluster_by_the_collected_photos_source_photo(registry):
    """Four views each of two source photos: one photo always gives a usable crop, the other never.
    A bootstrap over 2 photos spans [0, 1]; over 8 independent crops it would not reach 0 or 1."""
    from tsdf_bench import stats
    from tsdf_bench.errors import TsdfBenchError

    batch = _batch()
    batch.crop_kept, batch.crop_photos = [True, False] * 4, ["a", "b"] * 4
    out = registry.create("metric", "crop_yield").compute(batch)
    assert out["crop_yield_photos"] == {"a": [4, 4], "b": [0, 4]}
    assert (out["crop_yield"], out["crop_yield_hits"], out["crop_yield_n"]) == (0.5, 4, 8)
    assert (out["crop_yield_lo"], out["crop_yield_hi"]) == (0.0, 1.0)
    by_crop = stats.rate({str(i): [int(k), 1] for i, k in enumerate(batch.crop_kept)})
    assert 0 < by_crop["lo"] and by_crop["hi"] < 1  # what clustering by crop would have claimed
    batch.crop_photos = ["a"]
    with pytest.raises(TsdfBenchError, match="8 collected photos in crop_kept but 1 crop_photos"):
        registry.create("metric", "crop_yield").compute(batch)


def _views_batch():
    """Four views each of two source photos: the face of photo "a" survives protection on every
    view, that of photo "b" on none (and one of b's views gets a false box)."""
    face, other = [[0, 0, 40, 40]], [[50, 50, 60, 60]]
    batch = _batch()
    batch.detections_clean = {"mtcnn": [_det(face, [0.99])] * 8}
    batch.detections_protected = {"mtcnn": [_det(face, [0.95]), _det([], [])] * 3
                                  + [_det(face, [0.95]), _det(other, [0.9])]}
    batch.eval_photos = ["a", "b"] * 4
    return batch


def test_detection_rates_carry_counts_per_source_photo_and_a_cluster_interval(registry):
    from tsdf_bench import stats
    from tsdf_bench.schema import rate_family

    metric = registry.create("metric", "detection")
    batch = _views_batch()
    out = metric.compute(batch)
    assert set(rate_family("det_recall_mtcnn")) <= set(out) <= set(metric.columns_for(batch))
    # recall: true positives of the clean face boxes
    assert out["det_recall_mtcnn_photos"] == {"a": [4, 4], "b": [0, 4]}
    assert (out["det_recall_mtcnn"], out["det_recall_mtcnn_hits"], out["det_recall_mtcnn_n"]) == (0.5, 4, 8)
    assert (out["det_recall_mtcnn_lo"], out["det_recall_mtcnn_hi"]) == (0.0, 1.0)  # 2 photos, not 8 boxes
    # precision: true positives of the protected boxes (photo b's one false box); F1: 2TP of 2TP + FP + FN
    assert out["det_precision_mtcnn_photos"] == {"a": [4, 4], "b": [0, 1]}
    assert out["det_f1_mtcnn_photos"] == {"a": [8, 8], "b": [0, 5]}
    assert out["det_precision_mtcnn"] == pytest.approx(0.8) and out["det_f1_mtcnn"] == pytest.approx(8 / 13)
    for column in ("det_recall_mtcnn", "det_precision_mtcnn", "det_f1_mtcnn"):
        expected = stats.rate(out[f"{column}_photos"])
        assert out[column] == pytest.approx(expected["rate"])
        assert (out[f"{column}_lo"], out[f"{column}_hi"]) == (expected["lo"], expected["hi"])
    # without source photos every image is its own cluster
    batch.eval_photos = None
    alone = metric.compute(batch)
    assert alone["det_recall_mtcnn_photos"] == {str(i): [1 - i % 2, 1] for i in range(8)}
    assert 0 < alone["det_recall_mtcnn_lo"] < alone["det_recall_mtcnn_hi"] < 1


def test_detection_with_the_wrong_number_of_eval_photos_is_an_error(registry):
    from tsdf_bench.errors import TsdfBenchError

    batch = _views_batch()
    batch.eval_photos = ["a", "b"]
    with pytest.raises(TsdfBenchError, match="8 images of detector 'mtcnn' but 2 eval_photos"):
        registry.create("metric", "detection").compute(batch)


def test_detection_paper_form_averages_per_image(registry):
    """TSDF's form: per-image precision (1 with no protected box) and recall, averaged, then F1;
    ours pools the counts.  Image 0 keeps its face and gains a false box, image 1 loses its face."""
    face, other = [[0, 0, 40, 40]], [[50, 50, 60, 60]]
    batch = _batch()
    batch.detections_clean = {"mtcnn": [_det(face, [0.99]), _det(face, [0.98])]}
    batch.detections_protected = {"mtcnn": [_det(face + other, [0.95, 0.9]), _det([], [])]}
    metric = registry.create("metric", "detection")
    out = metric.compute(batch)
    assert out["det_f1_mtcnn"] == pytest.approx(0.5)  # ours: TP 1, FP 1, FN 1
    assert out["det_precision_paper_mtcnn"] == pytest.approx(0.75)  # (1/2 + 1) / 2
    assert out["det_recall_paper_mtcnn"] == pytest.approx(0.5)
    assert out["det_f1_paper_mtcnn"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert out["det_f1_paper"] == pytest.approx(out["det_f1_paper_mtcnn"])
    assert {"det_f1_paper", "det_f1_paper_mtcnn", "det_recall_paper_mtcnn"} <= set(metric.columns_for(batch))


def test_detection_paper_form_over_detectors(registry):
    """det_f1_paper: precision and recall averaged over images *and* detectors, then F1."""
    out = registry.create("metric", "detection").compute(_batch())
    # mtcnn: P (1 + 1) / 2, R (1 + 0) / 2; retinaface: P 1, R 1
    p, r = (1 + 1 + 1 + 1) / 4, (1 + 0 + 1 + 1) / 4
    assert out["det_f1_paper"] == pytest.approx(2 * p * r / (p + r))
    assert out["det_f1_paper_retinaface"] == 1.0


def test_detection_paper_form_no_boxes_is_precision_one():
    from tsdf_bench_plugins.metrics.detection import paper_detection_scores

    s = paper_detection_scores([_det([], [])], [_det([], [])])
    assert s["precision_paper"] == 1.0 and s["recall_paper"] == 1.0 and s["f1_paper"] == 1.0
    s = paper_detection_scores([_det([[0, 0, 10, 10]], [0.9])], [_det([[0, 0, 10, 10]], [0.5])])  # below 0.7
    assert s["precision_paper"] == 1.0 and s["recall_paper"] == 0.0


def test_ssim_paper_uses_the_first_images_range(registry):
    from skimage.metrics import structural_similarity

    from tsdf_bench_plugins.metrics.invisibility import ssim_pairs_paper

    torch.manual_seed(1)
    clean = torch.rand(2, 3, 8, 8) * 0.8 - 0.4  # [0.3, 0.7] on [0, 1]: a range of 0.4, not 1
    protected = (clean + 0.05 * torch.randn_like(clean)).clamp(-1, 1)
    got = ssim_pairs_paper(clean, protected)
    for i in range(2):
        a = ((clean[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        b = ((protected[i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).double().numpy()
        assert got[i] == pytest.approx(structural_similarity(a, b, win_size=3, data_range=a.max() - a.min(),
                                                             channel_axis=-1))
    batch = _batch()
    batch.clean, batch.protected = clean, protected
    out = registry.create("metric", "invisibility").compute(batch)
    assert out["ssim_in_paper"] == pytest.approx(float(got.mean()))
    assert out["ssim_in_paper"] < out["ssim_in"]  # a smaller data range: the same error weighs more
