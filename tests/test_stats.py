"""Counts and cluster-bootstrap intervals (tsdf_bench.stats)."""
import numpy as np
import pytest

from tsdf_bench.stats import merge_counts, paired_difference, photo_counts, rate, rate_columns, trial_counts, wilson


def test_photo_counts_group_pairs_by_source_photo():
    success = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]])
    assert photo_counts(success, ["a", "b", "a"]) == {"a": [5, 6], "b": [0, 3]}
    assert merge_counts({"a": [1, 2]}, {"a": [2, 2], "b": [0, 1]}) == {"a": [3, 4], "b": [0, 1]}


def test_rate_interval_reference_values():
    # every photo at the same rate: the bootstrap cannot move it
    same = rate({"a": [3, 6], "b": [1, 2], "c": [2, 4]})
    assert same["rate"] == same["lo"] == same["hi"] == 0.5 and same["pairs"] == 12 and same["successes"] == 6
    # two photos, one always broken, one never: resampling two photos gives 0, 1/2 or 1 -> 95% span [0, 1]
    split = rate({"a": [5, 5], "b": [0, 5]})
    assert split["rate"] == 0.5 and split["lo"] == 0.0 and split["hi"] == 1.0
    # many photos: the interval is narrower than the pair-level range and contains the rate
    many = rate({f"p{i}": [i % 4, 4] for i in range(40)})
    assert many["lo"] < many["rate"] < many["hi"] and many["hi"] - many["lo"] < 0.3
    assert rate({})["rate"] is None


def test_wilson_matches_the_textbook_value():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 0) == (None, None)


def test_paired_difference_and_persistence():
    a = {f"p{i}": [3, 4] for i in range(20)}
    b = {f"p{i}": [1, 4] for i in range(20)}
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(0.5) and d["excludes_zero"] and d["photos"] == 20
    assert paired_difference(a, a)["diff"] == 0 and not paired_difference(a, a)["excludes_zero"]
    # persistence: a keeps 3/4 of its round-0 rate, b keeps 1/4 of its own
    a0 = {f"p{i}": [4, 4] for i in range(20)}
    b0 = {f"p{i}": [4, 4] for i in range(20)}
    p = paired_difference(a, b, a0, b0)
    assert p["diff"] == pytest.approx(0.5) and p["excludes_zero"]
    assert paired_difference({"x": [1, 1]}, {"y": [1, 1]})["diff"] is None  # no shared photo


def test_trial_counts_add_units_of_one_photo_and_leave_out_photos_without_a_trial():
    # per image: true positives and clean face boxes; images 0 and 2 are views of photo "a"
    got = trial_counts([1, 0, 2, 0], [1, 1, 2, 0], ["a", "b", "a", "c"])
    assert got == {"a": [3, 3], "b": [0, 1]}  # "c" had no face box: not a trial of recall
    with pytest.raises(ValueError, match="3 hits, 3 trials and 2 photos"):
        trial_counts([1, 0, 1], [1, 1, 1], ["a", "b"])


def test_rate_columns_store_a_rate_like_the_schema_says():
    from tsdf_bench.schema import rate_family

    counts = {"a": [3, 4], "b": [1, 4], "c": [0, 2]}
    cols = rate_columns("det_recall_mtcnn", counts)
    assert tuple(cols) == rate_family("det_recall_mtcnn")
    r = rate(counts)
    assert (cols["det_recall_mtcnn"], cols["det_recall_mtcnn_lo"], cols["det_recall_mtcnn_hi"]) == (
        r["rate"], r["lo"], r["hi"])
    assert (cols["det_recall_mtcnn_hits"], cols["det_recall_mtcnn_n"]) == (4, 10)
    assert cols["det_recall_mtcnn_photos"] == counts


def test_one_photo_gives_no_interval_not_a_certain_one():
    """A cluster bootstrap over one photo always redraws it: [rate, rate] would claim a certainty
    the data cannot give (the demo's collected photos are views of one person's photo)."""
    from tsdf_bench.leaderboard.render import fmt_stat

    one = {"p": [36, 64]}
    r = rate(one)
    assert r["rate"] == 36 / 64 and (r["lo"], r["hi"]) == (None, None) and r["photos"] == 1
    d = paired_difference(one, {"p": [20, 64]})
    assert d["diff"] == (36 - 20) / 64 and d["lo"] is None and not d["excludes_zero"]
    two = rate({"p": [36, 64], "q": [10, 64]})
    assert two["lo"] < two["rate"] < two["hi"]
    assert fmt_stat({"kind": "rate", "value": r["rate"], "lo": None, "hi": None, "successes": 36, "pairs": 64,
                     "photos": 1}) == "0.562 [no interval: 1 photo] (36/64)"
    assert fmt_stat({"kind": "diff", "value": d["diff"], "lo": None, "hi": None, "photos": 1}) == (
        "+0.250 [no interval: 1 photo]")
