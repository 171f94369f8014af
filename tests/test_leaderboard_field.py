"""PDB's ROB and TE tables from rows (tsdf_bench/leaderboard/field.py), against hand-computed values."""
import pytest

from tsdf_bench.leaderboard import render, write_leaderboards
from tsdf_bench.leaderboard.field import robustness, transferability


def row(defense, model, adaptation, l2, **extra):
    return {"defense": defense, "model": model, "adaptation": adaptation, "round": 0, "seed": 0, "status": "ok",
            "l2": l2, "scale": "demo", "config_hash": "x", "data": "d", **extra}


def test_rob_is_pdbs_mean_of_capped_ratios():
    rows = [row("cmua", "stargan", "retrain", 0.2, purifies=False),
            row("cmua", "stargan", "jpeg-quality70", 0.1, purifies=True),   # ratio 0.5
            row("cmua", "stargan", "blur-kernel_size3", 0.3, purifies=True)]  # ratio 1.5 -> capped at 1
    (line,) = robustness(rows)
    assert line["rob"] == pytest.approx(0.75, rel=1e-6)
    assert line["per_transform"] == pytest.approx({"jpeg-quality70": 0.5, "blur-kernel_size3": 1.0}, rel=1e-6)
    md = render(rows, "markdown")
    assert "Robustness (PDB's ROB" in md and "0.750" in md


def test_te_normalises_black_box_by_the_targets_white_box(tmp_path):
    rows = []
    for source in ("a", "b"):
        for target, l2 in (("a", 0.4 if source == "a" else 0.1), ("b", 0.2 if source == "b" else 0.05)):
            rows.append(row(f"cmua-from-{source}", target, "retrain", l2, transfer_of="cmua", fit_models=[source],
                            purifies=False))
    lines, matrices = transferability(rows)
    te = {line["source"]: line["te"] for line in lines}
    assert te == pytest.approx({"a": 0.05 / 0.2, "b": 0.1 / 0.4})
    assert matrices[("cmua", "retrain")][("a", "a")] == pytest.approx(1.0)
    paths = write_leaderboards(rows, tmp_path)
    assert paths["transfer_csv"].read_text().startswith("defense,adaptation,source")
    assert "TE matrix: cmua" in paths["markdown"].read_text() and "TE matrix: cmua" in paths["latex"].read_text()


def test_te_heat_map_is_drawn_for_transfer_rows(tmp_path):
    from tsdf_bench.harness.figures import transfer_heatmaps

    rows = [row(f"cmua-from-{s}", t, "retrain", 0.1, transfer_of="cmua", fit_models=[s], purifies=False)
            for s in ("a", "b") for t in ("a", "b")]
    (path,) = transfer_heatmaps(rows, tmp_path)
    assert path.name == "transfer_cmua_retrain.png" and path.stat().st_size > 1000
    assert transfer_heatmaps([row("cmua", "a", "retrain", 0.1)], tmp_path) == []
