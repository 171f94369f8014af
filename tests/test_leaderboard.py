"""Leaderboard aggregation and rendering (tsdf_bench.leaderboard) and the leaderboard command."""
import csv
import io
import json

import pytest

from tsdf_bench.commands.leaderboard import leaderboard_text, load_rows
from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.leaderboard import DEMO_NOTE, flat_rows, persistence, render, summarize, write_leaderboards

PROV = {"config_hash": "abc123", "scale": "demo", "data": "facenet-sample", "device": "cpu", "git_commit": "deadbeef",
        "versions": {"torch": "2.x"}, "checkpoint_sha256": "c" * 8, "perturbation_sha256": "p" * 8}
# SR_mask per (model, defense): (round 0, round 1)
SR = {("stargan", "tsdf"): (0.9, 0.8), ("stargan", "cmua"): (1.0, 0.2), ("stargan", "facepoison"): (0.0, 0.0),
      ("attgan", "tsdf"): (0.7, 0.7), ("attgan", "cmua"): (0.8, 0.1), ("attgan", "facepoison"): (0.0, 0.05)}


def _row(model, defense, adaptation, rnd, seed, sr, status="ok", error=None, **extra):
    row = {"run_id": "r1", "defense": defense, "model": model, "adaptation": adaptation, "round": rnd, "seed": seed,
           "status": status, "error": error, **PROV}
    if status == "ok":
        row.update({"sr_mask": sr, "l2_mask": sr / 10, "ssim_out": 1 - sr / 2, "psnr_out": 30 - 10 * sr,
                    "l2": sr / 5, "sr_ruiz": sr, "psnr_in": 35.0, "ssim_in": 0.95, "linf": 0.05, "det_f1": 0.5,
                    "crop_yield": 0.25 if rnd else None, **extra})
    return row


def _rows():
    rows = []
    for (model, defense), (sr0, sr1) in SR.items():
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            j = jitter if sr0 else 0.0
            rows.append(_row(model, defense, "retrain", 0, seed, sr0 + j))
            rows.append(_row(model, defense, "retrain", 1, seed, sr1 + (jitter if sr1 else 0.0)))
        rows.append(_row(model, defense, "jpeg", 0, 0, sr0 / 2))
    rows.append(_row("stargan", "pgd", "retrain", 0, 0, None, status="error", error="CheckpointError: boom | bad"))
    return rows


def _rec(summary, model, defense, adaptation="retrain"):
    table = summary["overall"] if model == "(all)" else summary["per_model"]
    (rec,) = [r for r in table if (r["model"], r["defense"], r["adaptation"]) == (model, defense, adaptation)]
    return rec


def test_round_zero_and_k_side_by_side_with_seed_stats():
    s = summarize(_rows())
    rec = _rec(s, "stargan", "cmua")
    assert rec["k"] == 1 and rec["n_seeds"] == 2
    assert rec["sr_mask@0"]["mean"] == pytest.approx(1.0) and rec["sr_mask@k"]["mean"] == pytest.approx(0.2)
    assert rec["sr_mask@0"]["std"] == pytest.approx(0.0141421356)  # sample std of 0.99, 1.01
    assert rec["crop_yield"]["mean"] == 0.25
    jpeg = _rec(s, "stargan", "cmua", "jpeg")
    assert jpeg["k"] is None and jpeg["sr_mask@k"] is None and jpeg["sr_final"] == 0.5


def test_persistence_rule():
    assert persistence(0.8, 0.2) == pytest.approx(0.25)
    assert persistence(0.0, 0.05) is None and persistence(0.0, 0.0) is None
    assert persistence(0.5, None) is None
    s = summarize(_rows())
    assert _rec(s, "stargan", "tsdf")["persistence"] == pytest.approx(0.8 / 0.9)
    assert _rec(s, "attgan", "facepoison")["persistence"] is None
    assert _rec(s, "(all)", "tsdf")["persistence"] == pytest.approx(0.75 / 0.8)


def test_rank_by_final_sr_and_average_over_models():
    s = summarize(_rows())
    # stargan after retraining: tsdf 0.8 > cmua 0.2 > facepoison 0; attgan: tsdf 0.7 > cmua 0.1 > facepoison 0.05
    assert [_rec(s, "stargan", d)["rank"] for d in ("tsdf", "cmua", "facepoison")] == [1, 2, 3]
    assert _rec(s, "(all)", "tsdf")["rank"] == 1 and _rec(s, "(all)", "facepoison")["rank"] == 3
    # jpeg ranks on round 0: cmua 0.5 > tsdf 0.45 on stargan, cmua 0.4 > tsdf 0.35 on attgan
    assert _rec(s, "(all)", "cmua", "jpeg")["rank"] == 1
    # ordering inside each table follows the rank
    stargan_retrain = [r["defense"] for r in s["per_model"] if r["model"] == "stargan" and r["adaptation"] == "retrain"]
    assert stargan_retrain[:3] == ["tsdf", "cmua", "facepoison"]


def test_ties_share_average_rank():
    rows = [_row("m", d, "retrain", 1, 0, sr) for d, sr in (("a", 0.5), ("b", 0.5), ("c", 0.1))]
    s = summarize(rows)
    assert [_rec(s, "m", d)["rank"] for d in "abc"] == [1.5, 1.5, 3]


def test_error_rows_are_shown_not_dropped():
    rows = _rows()
    s = summarize(rows)
    pgd = _rec(s, "stargan", "pgd")
    assert pgd["status"] == "error" and pgd["rank"] is None
    assert s["errors"][0]["error"].startswith("CheckpointError")
    md = render(rows, "markdown")
    assert "## Errors" in md and "CheckpointError: boom \\| bad" in md
    pgd_line = next(line for line in md.splitlines() if line.startswith("| pgd"))
    assert "error" in pgd_line
    # partly failed cells say so
    rows.append(_row("stargan", "tsdf", "retrain", 1, 2, None, status="error", error="OOM"))
    assert _rec(summarize(rows), "stargan", "tsdf")["status"] == "1 of 5 rows failed"
    js = json.loads(render(rows, "json"))
    assert any(r["status"] == "error" and r["error"] == "OOM" for r in js)
    assert "error" in render(rows, "csv") and "pgd" in render(rows, "latex")


def test_markdown_header_and_tables():
    md = render(_rows(), "markdown")
    assert DEMO_NOTE in md and "abc123" in md and "facenet-sample" in md
    assert "## Overall (mean over models)" in md and "## Model: stargan" in md and "## Model: attgan" in md
    head = next(line for line in md.splitlines() if line.startswith("| Defense"))
    for col in ("SR_mask@0", "SR_mask@k", "L2_mask@0", "L2_mask@k", "SSIM_out@0", "SSIM_out@k", "Persistence",
                "Crop yield", "Det F1", "PSNR_in", "SSIM_in", "Avg rank"):
        assert col in head
    assert "0.800 ± 0.014" in md  # stargan tsdf round 1, two seeds
    assert DEMO_NOTE not in render(_rows(), "markdown", {"scale": "paper", "data": "celeba", "config_hash": "x"})


def test_csv_has_numbers_and_std_columns():
    text = render(_rows(), "csv")
    records = list(csv.DictReader(io.StringIO(text)))
    rec = next(r for r in records if (r["model"], r["defense"], r["adaptation"]) == ("stargan", "cmua", "retrain"))
    assert float(rec["sr_mask@k"]) == pytest.approx(0.2) and float(rec["sr_mask@0_std"]) == pytest.approx(0.01414, 1e-3)
    assert float(rec["persistence"]) == pytest.approx(0.2) and rec["note"] == DEMO_NOTE
    assert any(r["model"] == "(all)" for r in records)
    jpeg = next(r for r in records if (r["model"], r["defense"], r["adaptation"]) == ("stargan", "cmua", "jpeg"))
    assert jpeg["sr_mask@k"] == "" and jpeg["persistence"] == ""


def test_latex_escapes_and_uses_pm():
    rows = [_row("stargan", "my_def&co", "retrain", r, s, 0.5 + 0.1 * s) for r in (0, 1) for s in (0, 1)]
    tex = render(rows, "latex")
    assert r"my\_def\&co" in tex and r"$\pm$" in tex and r"\begin{tabular}" in tex
    assert "demo-scale numbers" in tex


def test_json_flat_rows_keys_and_nulls():
    rows = _rows()
    rows[0]["sr_mask"] = float("nan")
    data = json.loads(render(rows, "json"))
    assert len(data) == len(rows)
    for row in data:
        for key in ("defense", "model", "adaptation", "round", "l2_mask", "sr_mask", "psnr_out", "ssim_out",
                    "crop_yield", "run_id", "config_hash", "scale", "note"):
            assert key in row
        if row["round"] == 0:
            assert row["crop_yield"] is None
    assert any(r["sr_mask"] is None and r["status"] == "ok" for r in data)  # NaN -> null, valid JSON
    assert flat_rows([{"defense": "d", "model": "m", "adaptation": "a", "round": 0}])[0]["sr_mask"] is None


def test_write_leaderboards(tmp_path):
    paths = write_leaderboards(_rows(), tmp_path / "lb", {"scale": "demo", "data": "x", "config_hash": "h"})
    assert sorted(p.name for p in paths.values()) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md",
                                                       "leaderboard.tex"]
    assert all(p.stat().st_size > 100 for p in paths.values())
    json.loads(paths["json"].read_text())


def test_bad_format_and_rows_raise():
    with pytest.raises(TsdfBenchError, match="markdown"):
        render(_rows(), "html")
    with pytest.raises(TsdfBenchError, match="lacks"):
        render([{"defense": "d"}], "markdown")


def test_superseded_rows_keep_the_newest():
    old = _row("m", "d", "retrain", 0, 0, 0.1, run_id="old")
    new = _row("m", "d", "retrain", 0, 0, 0.9)
    s = summarize([old, new])
    assert s["superseded"] == 1 and _rec(s, "m", "d")["sr_mask@0"]["mean"] == 0.9
    # the JSON holds what the tables use: the newest row of the cell only
    js = json.loads(render([old, new], "json"))
    assert [r["sr_mask"] for r in js] == [0.9] and js[0]["run_id"] != "old"


def test_command_reads_store_and_renders(tmp_path):
    store_mod = pytest.importorskip("tsdf_bench.harness.store")
    store = store_mod.ResultsStore(tmp_path / "results.sqlite")
    store.start_run("r1", {"x": 1}, "abc123")
    for row in _rows():
        metrics = {k: v for k, v in row.items() if k not in PROV and k not in
                   ("run_id", "defense", "model", "adaptation", "round", "seed", "status", "error")}
        store.write_cell("r1", row, status=row["status"], metrics=metrics, provenance=PROV, error=row["error"])
    rows = load_rows(tmp_path)
    assert len(rows) == len(_rows())
    md = leaderboard_text(rows, "markdown")
    assert "## Model: stargan" in md and "abc123" in md
    from tsdf_bench.cli import main

    out = tmp_path / "lb.json"
    assert main(["leaderboard", "--results", str(tmp_path / "results.sqlite"), "--format", "json",
                 "--output", str(out), "--run-id", "latest"]) == 0
    assert len(json.loads(out.read_text())) == len(rows)
    assert main(["leaderboard", "--results", str(tmp_path / "nope.sqlite")]) == 2
    assert not (tmp_path / "nope.sqlite").exists()


def test_detection_table_reports_recall_per_detector_and_crop_yield():
    from tsdf_bench.leaderboard import detection_table

    base = {"model": "m", "adaptation": "retrain", "seed": 0, "run_id": "r", "status": "ok", "error": None}
    rows = [
        dict(base, defense="tsdf", round=0, det_recall_mtcnn=0.25, det_f1_mtcnn=0.4),
        dict(base, defense="tsdf", round=1, crop_yield=0.5),
        dict(base, defense="none", round=0, det_recall_mtcnn=1.0, det_f1_mtcnn=1.0),
        dict(base, defense="none", round=1, crop_yield=1.0),
    ]
    rows += [dict(r, model="m2") for r in rows]  # detection is per defense: other models repeat it
    headers, body = detection_table(rows)
    assert headers == ["Defense", "Recall mtcnn", "F1 mtcnn", "Crop yield@k"]
    assert body == [["none", "1.000", "1.000", "1.000"], ["tsdf", "0.250", "0.400", "0.500"]]
    assert "## Poisoning" in render(rows, "markdown")
