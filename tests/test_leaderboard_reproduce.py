"""Whether a rerun reproduces a published leaderboard (tsdf_bench.leaderboard.reproduce) and
``tsdf-bench leaderboard --check-against``."""
import copy
import json

from tsdf_bench.cli import main
from tsdf_bench.leaderboard.reproduce import compare
from tsdf_bench.stats import rate_columns

# SR_mask counts per photo: 3 photos with different rates, so the bootstrap interval is wide
SR_COUNTS = {"p0": [2, 10], "p1": [5, 10], "p2": [8, 10]}


def _row(defense, rnd, seed=0, run_id="published"):
    row = {"run_id": run_id, "defense": defense, "model": "stargan", "adaptation": "retrain", "round": rnd,
           "seed": seed, "status": "ok", "error": None, "l2_mask": 0.07, "psnr_out": 25.5,
           "perturbation_sha256": "a" * 64, "timings": {"fit": 3.0}, "versions": {"cpu": "Zen 4"},
           "checkpoint_path": "/home/a/weights.pt", "git_commit": "abc", **rate_columns("sr_mask", SR_COUNTS)}
    if rnd:
        row.update(rate_columns("crop_yield", {"t1_2": [30, 32]}))  # one collected photo: no interval
    return row


def _published():
    return [_row(d, k, s) for d in ("tsdf", "pgd") for k in (0, 1) for s in (0, 1)]


def _rerun():
    """The same results made elsewhere: another run id, timings, CPU, clone and commit."""
    rows = copy.deepcopy(_published())
    for r in rows:
        r.update(run_id="rerun", timings={"fit": 2.1}, versions={"cpu": "Xeon"}, checkpoint_path="/tmp/x/weights.pt",
                 git_commit="def")
    return rows


def _cell(rows, defense, rnd, seed=0):
    return next(r for r in rows if (r["defense"], r["round"], r["seed"]) == (defense, rnd, seed))


def test_a_rerun_equal_in_every_result_is_reproduced_bit_for_bit_whatever_its_provenance():
    report = compare(_published(), _rerun())
    assert (report.cells, report.exact, report.different, report.outside) == (8, True, [], [])
    assert report.rates == 8 and report.rates_equal == 8 and report.no_interval == 4  # the crop yields
    assert "reproduced bit for bit" in report.text()


def test_a_rate_that_moved_inside_its_interval_is_within_the_intervals_but_not_bit_for_bit():
    rerun = _rerun()
    row = _cell(rerun, "tsdf", 0)
    lo, hi = row["sr_mask_lo"], row["sr_mask_hi"]
    assert lo < row["sr_mask"] < hi
    row["sr_mask"] = (row["sr_mask"] + hi) / 2
    row["perturbation_sha256"] = "b" * 64
    report = compare(_published(), rerun)
    assert not report.exact and report.within_intervals
    assert {(c.defense, column) for c, column, *_ in report.different} == {("tsdf", "sr_mask"),
                                                                          ("tsdf", "perturbation_sha256")}
    assert "within the published intervals (not bit for bit)" in report.text()


def test_a_rate_outside_its_interval_is_not_reproduced_and_named():
    rerun = _rerun()
    row = _cell(rerun, "pgd", 1, seed=1)
    row["sr_mask"] = row["sr_mask_hi"] + 0.01
    report = compare(_published(), rerun)
    assert not report.within_intervals and len(report.outside) == 1
    assert "pgd/stargan/retrain/round 1/seed 1 sr_mask" in report.text()
    assert "not reproduced: 1 rates outside their published intervals" in report.text()


def test_a_one_photo_rate_is_compared_as_a_value_not_by_its_degenerate_interval():
    published, rerun = _published(), _rerun()
    assert _cell(published, "tsdf", 1)["crop_yield_lo"] == _cell(published, "tsdf", 1)["crop_yield_hi"]
    _cell(rerun, "tsdf", 1)["crop_yield"] = 31 / 32
    report = compare(published, rerun)
    assert report.within_intervals and not report.exact and not report.outside
    assert [column for _, column, *_ in report.different] == ["crop_yield"]


def test_missing_and_extra_cells_are_listed_and_rounds_restrict_the_comparison():
    rerun = [r for r in _rerun() if r["round"] == 0] + [_row("cmua", 0, run_id="rerun")]
    report = compare(_published(), rerun)
    assert not report.within_intervals
    assert len(report.missing) == 4 and [c.defense for c in report.extra] == ["cmua"]
    only_round0 = compare(_published(), [r for r in rerun if r["defense"] != "cmua"], rounds=[0])
    assert only_round0.exact and only_round0.cells == 4


def test_the_command_exits_1_when_a_run_does_not_reproduce(tmp_path, capsys):
    published, rerun = tmp_path / "published.json", tmp_path / "rerun.json"
    published.write_text(json.dumps(_published()))
    rows = _rerun()
    rerun.write_text(json.dumps(rows))
    assert main(["leaderboard", "--results", str(rerun), "--check-against", str(published)]) == 0
    assert "verdict: reproduced bit for bit" in capsys.readouterr().out
    _cell(rows, "tsdf", 0)["sr_mask"] = 1.0
    rerun.write_text(json.dumps(rows))
    assert main(["leaderboard", "--results", str(rerun), "--check-against", str(published)]) == 1
    assert main(["leaderboard", "--results", str(rerun), "--check-against", str(published), "--rounds", "1"]) == 0


def test_bad_check_arguments_name_the_fix(tmp_path, capsys):
    rerun = tmp_path / "rerun.json"
    rerun.write_text(json.dumps(_rerun()))
    assert main(["leaderboard", "--results", str(rerun), "--check-against", str(tmp_path / "leaderboard.md")]) == 2
    assert "pass a published leaderboard.json" in capsys.readouterr().err
    assert main(["leaderboard", "--results", str(rerun), "--check-against", str(rerun), "--rounds", "zero"]) == 2
    assert "--rounds 'zero': give round numbers" in capsys.readouterr().err
