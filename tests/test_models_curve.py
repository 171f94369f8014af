"""Training curves: one point per increment on the held-out persons, resumed without re-measuring,
and the final weights equal to one uninterrupted run's."""
import torch

from tsdf_bench.models import curve, zoo


def test_curve_points_resume_and_match_one_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TSDF_BENCH_CACHE", str(tmp_path))
    points = curve.train_with_curve("stargan", 4, 2, scale="smoke", n_eval=4, log=lambda line: None)
    assert [p["steps"] for p in points] == [2, 4]
    assert all(p["pgd_pairs"] == 4 * 5 and 0 <= p["pgd_sr_mask"] <= 1 and p["recon_loss"] > 0 for p in points)
    measured = []
    monkeypatch.setattr(curve, "measure_point", lambda *a: measured.append(1) or {})
    assert curve.train_with_curve("stargan", 4, 2, scale="smoke", n_eval=4) == points and not measured
    stepped = zoo.get_model("stargan", scale="smoke", steps=4, progress=False, grid=False)
    whole = zoo.get_model("stargan", scale="smoke", steps=4, progress=False, grid=False, retrain=True)
    assert all(torch.equal(a, b) for a, b in zip(stepped.state_dict().values(), whole.state_dict().values()))
    table = curve.curve_table(points)
    assert table.count("\n") == 3 and f"({points[1]['pgd_hits']}/20)" in table
