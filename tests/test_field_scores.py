"""PDB's ROB and TE (tsdf_bench.field_scores) against values computed by hand on small fakes."""
import pytest

from tsdf_bench.field_scores import rob_per_transform, rob_score, te_matrix, te_pair_score, te_scores

Q = ("mse", "lpips", "brisque")
BASE = {"mse": 0.10, "lpips": 0.40, "brisque": 50.0, "cidr": 0.5}
TRANSFORMED = {
    # ratios 0.5, 0.5, min(1, 1.2) = 1, 0.25 / 0.5 = 0.5  -> 0.625
    "jpeg70": {"mse": 0.05, "lpips": 0.20, "brisque": 60.0, "cidr": 0.25},
    # 1 (0.2 / 0.1 clipped), 1, 0.2, no CIDR -> 0  -> 0.55
    "blur3": {"mse": 0.20, "lpips": 0.40, "brisque": 10.0, "cidr": None},
    # a quality metric missing: left out, as a missing CSV row is in PDB
    "noise001": {"mse": 0.10, "lpips": None, "brisque": 50.0, "cidr": 0.5},
}


def test_rob_matches_hand_computed_values():
    terms = rob_per_transform(BASE, TRANSFORMED, metrics=Q)
    assert terms == pytest.approx({"jpeg70": 0.625, "blur3": 0.55}, abs=1e-8)
    assert rob_score(BASE, TRANSFORMED, metrics=Q) == pytest.approx((0.625 + 0.55) / 2, abs=1e-8)


def test_rob_drops_the_identity_term_when_the_baseline_cidr_is_zero_or_missing():
    for base_cidr in (0.0, None):
        base = {**BASE, "cidr": base_cidr}
        # jpeg70: (0.5 + 0.5 + 1) / 3; blur3: (1 + 1 + 0.2) / 3
        assert rob_score(base, TRANSFORMED, metrics=Q) == pytest.approx((2 / 3 + 2.2 / 3) / 2, abs=1e-8)
    assert rob_score(BASE, TRANSFORMED, metrics=Q, id_metric=None) == pytest.approx(0.7, abs=1e-8)


def test_rob_edge_cases():
    # a zero baseline: the 1e-10 makes any positive value a full ratio, zero stays zero
    base = {"mse": 0.0, "lpips": 0.4, "brisque": 50.0}
    terms = rob_per_transform(base, {"a": {"mse": 1e-3, "lpips": 0.4, "brisque": 50.0},
                                     "b": {"mse": 0.0, "lpips": 0.4, "brisque": 50.0}}, metrics=Q, id_metric=None)
    assert terms == pytest.approx({"a": 1.0, "b": 2 / 3})
    assert rob_score({"mse": None, "lpips": 0.4, "brisque": 1.0}, TRANSFORMED, metrics=Q) is None
    assert rob_score(BASE, {}, metrics=Q) is None


def test_rob_is_undefined_without_a_disruption_to_keep():
    # the `none` defense: its forgery equals the clean one, so every quality metric is 0; PDB's
    # formula would give 1 for a transform that changes the output and 0 for one that does not
    none = {"mse": 0.0, "lpips": 0.0, "brisque": 0.0, "cidr": 0.0}
    moved = {"blur1": {"mse": 0.0, "lpips": 0.0, "brisque": 0.0, "cidr": 0.0},
             "jpeg70": {"mse": 0.01, "lpips": 0.1, "brisque": 3.0, "cidr": 0.1}}
    assert rob_per_transform(none, moved, metrics=Q) == {} and rob_score(none, moved, metrics=Q) is None
    # an identity disruption alone is something to keep
    assert rob_score({**none, "cidr": 0.2}, moved, metrics=Q) == pytest.approx((0 + (1 + 1 + 1 + 0.5) / 4) / 2)
    # the suite's column names: l2 (MSE) and lpips, CIDR from the identity metric
    suite = rob_score({"l2": 0.1, "lpips": 0.4, "cidr": 0.5},
                      {"jpeg70": {"l2": 0.05, "lpips": 0.4, "cidr": 0.5}}, metrics=("l2", "lpips"))
    assert suite == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-8)


WB = {
    "A": {"mse": 0.1, "lpips": 0.4, "brisque": 40.0, "cidr": 0.5},
    "B": {"mse": 0.2, "lpips": 0.2, "brisque": 0.0, "cidr": 0.0},
    "C": {"mse": 0.1, "lpips": 0.1, "brisque": 10.0, "cidr": None},
}
BB = {
    ("A", "A"): dict(WB["A"]),                                           # diagonal: not in TE
    ("A", "B"): {"mse": 0.1, "lpips": 0.1, "brisque": 5.0, "cidr": 0.3},  # .5, .5, 0 (WB 0), no id (WB 0)
    ("A", "C"): {"mse": 0.05, "lpips": 0.2, "brisque": 20.0, "cidr": 0.2},  # C has no WB CIDR: skipped
    ("B", "A"): {"mse": 0.05, "lpips": 0.8, "brisque": 20.0, "cidr": 0.1},  # .5, 1, .5, .2
    ("B", "C"): {"mse": 0.3, "lpips": 0.3, "brisque": 30.0, "cidr": 0.4},   # skipped (C)
    ("C", "A"): {"mse": 0.1, "lpips": 0.4, "brisque": 40.0, "cidr": None},  # 1, 1, 1, no id term
    ("C", "B"): {"mse": 0.4, "lpips": None, "brisque": 1.0, "cidr": 0.6},   # lpips missing: skipped
    ("C", "D"): {"mse": 0.4, "lpips": 0.4, "brisque": 1.0, "cidr": 0.1},    # D has no white box
}


def test_te_pair_scores_and_matrix():
    assert te_pair_score(BB[("A", "B")], WB["B"], metrics=Q) == pytest.approx(1 / 3)
    assert te_pair_score(BB[("B", "A")], WB["A"], metrics=Q) == pytest.approx(0.55)
    assert te_pair_score(BB[("C", "A")], WB["A"], metrics=Q) == pytest.approx(1.0)
    matrix = te_matrix(WB, BB, metrics=Q)
    assert matrix[("A", "A")] == pytest.approx(1.0)
    assert matrix[("A", "C")] is None and matrix[("C", "B")] is None and matrix[("C", "D")] is None
    assert matrix[("B", "A")] == pytest.approx(0.55)


def test_te_per_source_matches_hand_computed_values():
    te = te_scores(WB, BB, metrics=Q)
    assert set(te) == {"A", "B", "C"}
    assert te["A"]["te"] == pytest.approx(1 / 3) and te["A"]["n_targets_te"] == 1
    assert te["A"]["cidr"] == pytest.approx(0.25) and te["A"]["n_targets_cidr"] == 2  # raw (.3 + .2) / 2
    assert te["B"]["te"] == pytest.approx(0.55) and te["B"]["cidr"] == pytest.approx(0.25)
    assert te["C"]["te"] == pytest.approx(1.0) and te["C"]["n_targets_te"] == 1
    assert te["C"]["cidr"] == pytest.approx((0.6 + 0.1) / 2)


def test_te_without_identity_scores_targets_lacking_cidr():
    te = te_scores(WB, BB, metrics=Q, id_metric=None)
    # A: (A,B) = (.5 + .5 + 0) / 3, (A,C) = (.5 + 1 + 1) / 3
    assert te["A"]["te"] == pytest.approx((1 / 3 + 2.5 / 3) / 2)
    assert te["A"]["cidr"] is None and te["A"]["n_targets_cidr"] == 0
    # B: (B,A) = (.5 + 1 + .5) / 3, (B,C) = (1 + 1 + 1) / 3
    assert te["B"]["te"] == pytest.approx((2 / 3 + 1) / 2)
    # a source whose every pair is unscorable has te None
    assert te_scores({}, {("X", "Y"): {"mse": 1, "lpips": 1, "brisque": 1}}, metrics=Q)["X"]["te"] is None
