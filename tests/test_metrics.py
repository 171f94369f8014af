"""Hand-computed cases for the pure metric functions in tsdf_bench.metrics."""
import math

import pytest
import torch

from tsdf_bench.detectors.base import Detections
from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.metrics import (PSNR_MAX_DB, box_iou, crop_yield, detection_scores, edit_mask, forgery_scores,
                                invisibility_scores, l2_mask, mse_unmasked, psnr_pairs, sr_mask, sr_ruiz,
                                ssim_pairs)


def _pair_with_known_l2():
    """x = 0; G(x) edits pixel (0,0) by 0.2/channel and pixel (1,1) by 0.6 in R; G(x+W) differs by
    0.3/channel at (0,0), 0.6 in R at (1,1) and 1.0 at the unedited (0,1)."""
    x = torch.zeros(1, 3, 4, 4)
    fc = x.clone()
    fc[0, :, 0, 0] = 0.2          # sum 0.6 > 0.5 -> masked
    fc[0, 0, 1, 1] = 0.6          # sum 0.6 > 0.5 -> masked
    fc[0, 0, 1, 0] = 0.5          # sum 0.5, not > 0.5 -> unmasked
    fp = fc.clone()
    fp[0, :, 0, 0] += 0.3
    fp[0, 0, 1, 1] += 0.6
    fp[0, :, 0, 1] += 1.0         # outside the mask: ignored by L2_mask
    return x, fc.unsqueeze(1), fp.unsqueeze(1)


def test_edit_mask_thresholds_rgb_sum():
    x, fc, _ = _pair_with_known_l2()
    mask = edit_mask(fc, x)
    assert mask.shape == (1, 1, 1, 4, 4)
    assert mask[0, 0, 0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert mask.sum() == 2


def test_l2_mask_exact_value():
    x, fc, fp = _pair_with_known_l2()
    l2 = l2_mask(fp, fc, edit_mask(fc, x))
    # (3 * 0.3^2 + 0.6^2) / (3 * 2) = 0.63 / 6
    assert l2.shape == (1, 1)
    assert l2.item() == pytest.approx(0.105, abs=1e-6)
    assert sr_mask(l2) == 1.0


def test_empty_mask_excluded_from_mean_and_counted_unsuccessful():
    x, fc, fp = _pair_with_known_l2()
    x2 = torch.cat([x, x]); fc2 = torch.cat([fc, torch.zeros_like(fc)]); fp2 = torch.cat([fp, fp])
    l2 = l2_mask(fp2, fc2, edit_mask(fc2, x2))
    assert math.isnan(l2[1, 0].item())
    scores = forgery_scores(fp2, fc2, x2)
    assert scores["l2_mask"] == pytest.approx(0.105, abs=1e-6)   # empty pair left out of the mean
    assert scores["sr_mask"] == 0.5                              # ... but in SR's denominator


def test_all_masks_empty_gives_none_l2_mask_and_zero_sr():
    x = torch.zeros(2, 3, 4, 4)
    fc = torch.zeros(2, 5, 3, 4, 4)
    scores = forgery_scores(fc + 0.9, fc, x)
    assert scores["l2_mask"] is None and scores["sr_mask"] == 0.0
    assert scores["sr_ruiz"] == 1.0  # the unmasked variant still sees the difference


def test_identical_forgeries_sr_zero_psnr_capped_ssim_one():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    fc = (x.unsqueeze(1) + 0.7).clamp(-1, 1).repeat(1, 3, 1, 1, 1)
    scores = forgery_scores(fc.clone(), fc, x)
    assert scores["sr_mask"] == 0.0 and scores["l2_mask"] == 0.0
    assert scores["sr_ruiz"] == 0.0 and scores["l2"] == 0.0
    assert scores["psnr_out"] == PSNR_MAX_DB
    assert scores["ssim_out"] == pytest.approx(1.0)


def test_ruiz_mse_threshold():
    fc = torch.zeros(1, 2, 3, 4, 4)
    fp = fc.clone()
    fp[:, 0] += 0.3   # MSE 0.09 > 0.05
    fp[:, 1] += 0.2   # MSE 0.04
    mse = mse_unmasked(fp, fc)
    assert mse[0].tolist() == pytest.approx([0.09, 0.04])
    assert sr_ruiz(mse) == 0.5


def test_psnr_on_unit_range():
    a = torch.zeros(1, 3, 4, 4)
    # 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01 -> 20 dB
    assert psnr_pairs(a + 0.2, a).tolist() == pytest.approx([20.0])


def test_ssim_uses_small_window_and_drops_with_noise():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 6, 6) * 2 - 1
    same, noisy = ssim_pairs(a, a.clone()), ssim_pairs((a + torch.randn_like(a) * 0.5).clamp(-1, 1), a)
    assert same.tolist() == pytest.approx([1.0, 1.0])
    assert (noisy < 0.9).all()


@pytest.mark.parametrize("win_size", [3, 5])
def test_psnr_and_ssim_match_scikit_image(win_size):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    torch.manual_seed(1)
    a = torch.rand(3, 2, 3, 12, 10) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    b[0, 0] = a[0, 0]  # one identical pair: SSIM exactly 1
    ours_ssim, ours_psnr = ssim_pairs(b, a, win_size), psnr_pairs(b, a)
    ua, ub = ((a.double() + 1) / 2).reshape(6, 3, 12, 10), ((b.double() + 1) / 2).reshape(6, 3, 12, 10)
    other = 5 if win_size == 3 else 3
    for i in range(6):
        x, y = ub[i].permute(1, 2, 0).numpy(), ua[i].permute(1, 2, 0).numpy()
        expect = structural_similarity(x, y, win_size=win_size, data_range=1.0, channel_axis=-1)
        assert ours_ssim[i] == pytest.approx(expect, abs=1e-12)
        if i:
            assert ours_ssim[i] != pytest.approx(structural_similarity(x, y, win_size=other, data_range=1.0,
                                                                       channel_axis=-1))
            assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(y, x, data_range=1.0), abs=1e-9)
    assert ours_ssim[0] == pytest.approx(1.0, abs=1e-12) and ours_psnr[0] == PSNR_MAX_DB  # skimage: inf


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(TsdfBenchError, match="smaller than the SSIM window"):
        ssim_pairs(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def test_invisibility_known_perturbation():
    clean = torch.zeros(2, 3, 4, 4)
    w = torch.zeros_like(clean)
    w[0, 0, 0, 0] = 0.03
    w[1, :, :, :] = -0.01
    s = invisibility_scores(clean + w, clean)
    assert s["linf"] == pytest.approx(0.03)
    # per-image L2: 0.03 and sqrt(48 * 1e-4); mean of both
    assert s["l2_in"] == pytest.approx((0.03 + math.sqrt(48e-4)) / 2)
    assert s["ssim_in"] < 1.0 and s["psnr_in"] < PSNR_MAX_DB
    assert invisibility_scores(clean, clean)["psnr_in"] == PSNR_MAX_DB


def test_box_iou():
    iou = box_iou(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([[0., 0., 10., 10.], [5., 0., 15., 10.], [20., 20., 30., 30.]]))
    assert iou[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0])


def _det(boxes, scores):
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores, dtype=torch.float32))


def test_detection_scores_hand_case():
    clean = [_det([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.8, 0.5])]  # 2 pseudo-GT boxes
    protected = [_det([[0, 0, 10, 10], [21, 21, 31, 31], [60, 60, 70, 70]], [0.95, 0.9, 0.6])]
    # (21,21,31,31) vs (20,20,30,30): IoU 81/119 < 0.7 -> FP; 0.6 is below threshold -> ignored
    s = detection_scores(clean, protected)
    assert (s["tp"], s["fp"], s["fn"], s["n_clean"]) == (1, 1, 1, 2)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == 0.5
    assert s["duq"] == 0.0
    assert s["conf_change"] == pytest.approx(((0.95 - 0.9) + (0.0 - 0.8)) / 2)
    assert s["count_change"] == 0.0


def test_detection_scores_all_faces_hidden():
    clean = [_det([[0, 0, 10, 10]], [0.99]), _det([[5, 5, 20, 20]], [0.9])]
    protected = [_det([], []), _det([[5, 5, 20, 20]], [0.3])]
    s = detection_scores(clean, protected)
    assert s["precision"] is None
    assert s["recall"] == 0.0 and s["f1"] == 0.0 and s["duq"] == 0.0
    assert s["count_change"] == -1.0
    assert s["conf_change"] == pytest.approx(((0 - 0.99) + (0.3 - 0.9)) / 2)


def test_detection_one_prediction_matches_one_box_only():
    clean = [_det([[0, 0, 10, 10]], [0.9])]
    protected = [_det([[0, 0, 10, 10], [0, 0, 10, 10.5]], [0.9, 0.8])]  # duplicate -> 1 TP, 1 FP
    s = detection_scores(clean, protected)
    assert (s["tp"], s["fp"]) == (1, 1) and s["duq"] == 0.0 and s["f1"] == pytest.approx(2 / 3)


def test_detection_length_mismatch_is_an_error():
    with pytest.raises(TsdfBenchError, match="one Detections per image"):
        detection_scores([_det([], [])], [])


def test_crop_yield():
    assert crop_yield([True, False, True, True]) == 0.75
    assert crop_yield(None) is None


def test_shape_mismatch_names_the_problem():
    with pytest.raises(TsdfBenchError, match="shapes differ"):
        mse_unmasked(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 3, 4, 4))
    with pytest.raises(TsdfBenchError, match="at least 3x3"):
        ssim_pairs(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(TsdfBenchError, match="edit_mask"):
        edit_mask(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 8, 8))
