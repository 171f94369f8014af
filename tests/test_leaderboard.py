"""Leaderboard aggregation and rendering (tsdf_bench.leaderboard) and the leaderboard command."""
import csv
import io
import json

import pytest

from tsdf_bench import stats
from tsdf_bench.commands.leaderboard import leaderboard_text, load_rows
from tsdf_bench.errors import TsdfBenchError
from tsdf_bench.leaderboard import (DEMO_NOTE, RULES, detection_table, flat_rows, persistence, render, summarize,
                                   write_leaderboards)
from tsdf_bench.leaderboard.columns import declared_columns, registry_columns

PROV = {"config_hash": "abc123", "scale": "demo", "data": "facenet-sample", "device": "cpu", "git_commit": "deadbeef",
        "versions": {"torch": "2.x"}, "checkpoint_sha256": "c" * 8, "perturbation_sha256": "p" * 8}
PHOTOS = ("p0", "p1", "p2", "p3")
PAIRS = 10  # pairs per photo: 40 per row, so rates are multiples of 0.025
# the columns the built-in metric plugins would declare (passed explicitly: no registry needed)
COLUMNS = {"forgery": ("l2_mask", "sr_mask", "psnr_out", "ssim_out"), "invisibility": ("psnr_in", "ssim_in"),
           "crop_yield": ("crop_yield",)}
# SR_mask per (model, defense): (round 0, round 1 against the retrained model)
SR = {("stargan", "tsdf"): (0.9, 0.8), ("stargan", "cmua"): (1.0, 0.2), ("stargan", "facepoison"): (0.0, 0.0),
      ("attgan", "tsdf"): (0.7, 0.7), ("attgan", "cmua"): (0.8, 0.1), ("attgan", "facepoison"): (0.0, 0.05)}


def _counts(sr: float) -> dict:
    total = round(sr * PAIRS * len(PHOTOS))  # the first photos take the successes: rates differ between photos
    return {p: [min(PAIRS, max(0, total - i * PAIRS)), PAIRS] for i, p in enumerate(PHOTOS)}


def _rate(name: str, sr: float) -> dict:
    counts = _counts(sr)
    hits, n = sum(h for h, _ in counts.values()), PAIRS * len(PHOTOS)
    return {name: hits / n, f"{name}_n": n, f"{name}_hits": hits, f"{name}_photos": counts}


def _row(model, defense, adaptation, rnd, seed, sr, status="ok", error=None, worst=None, ctrl=None, **extra):
    row = {"run_id": "r1", "defense": defense, "model": model, "adaptation": adaptation, "round": rnd, "seed": seed,
           "status": status, "error": error, **PROV}
    if status == "ok":
        row.update({**_rate("sr_mask", sr), "l2_mask": sr / 10, "ssim_out": 1 - sr / 2, "psnr_out": 30 - 10 * sr + seed,
                    "psnr_in": 35.0, "ssim_in": 0.95, "crop_yield": 0.25 if rnd else None})
        if rnd:
            ctrl = min(1.0, sr + 0.1) if ctrl is None else ctrl
            row.update({**_rate("sr_mask_ctrl", ctrl), **_rate("sr_mask_worst", sr if worst is None else worst),
                        "adaptation_gain": ctrl - sr, "eval_kept": 3, "eval_dropped": 1, "attacker_keeps": "retrained"})
        row.update(extra)
    return row


def _rows():
    rows = []
    for (model, defense), (sr0, sr1) in SR.items():
        for seed in (0, 1):
            rows.append(_row(model, defense, "retrain", 0, seed, sr0))
            rows.append(_row(model, defense, "retrain", 1, seed, sr1))
        rows.append(_row(model, defense, "jpeg", 0, 0, sr0 / 2))
    rows.append(_row("stargan", "pgd", "retrain", 0, 0, None, status="error", error="CheckpointError: boom | bad"))
    return rows


def _summary(rows=None, **kw):
    return summarize(_rows() if rows is None else rows, metric_columns=kw.pop("metric_columns", COLUMNS), **kw)


def _render(rows, fmt="markdown", header=None, **kw):
    return render(rows, fmt, header, metric_columns=kw.pop("metric_columns", COLUMNS), **kw)


def _rec(summary, model, defense, adaptation="retrain"):
    table = summary["overall"] if model == "(all)" else summary["per_model"]
    (rec,) = [r for r in table if (r["model"], r["defense"], r["adaptation"]) == (model, defense, adaptation)]
    return rec


def _merged(rows, column, **match):
    return stats.merge_counts(*(r[f"{column}_photos"] for r in rows
                                if all(r.get(k) == v for k, v in match.items()) and r["status"] == "ok"))


# -- item 2: seeds pooled by photo counts, a 95% interval from stats.rate --------------------
def test_seeds_pool_photo_counts_and_interval_matches_stats_rate():
    rows = [_row("m", "d", "retrain", 0, 0, 0.5), _row("m", "d", "retrain", 0, 1, 0.25)]
    rows[1]["sr_mask_photos"] = {"p0": [4, 10], "p1": [3, 10], "p2": [2, 10], "p9": [1, 10]}  # one other photo
    rec = _rec(_summary(rows), "m", "d")
    expected = stats.rate(stats.merge_counts(rows[0]["sr_mask_photos"], rows[1]["sr_mask_photos"]))
    got = rec["sr_mask@0"]
    assert got["kind"] == "rate" and got["n"] == 2
    assert (got["value"], got["lo"], got["hi"]) == (expected["rate"], expected["lo"], expected["hi"])
    assert got["pairs"] == 80 and got["successes"] == 30 and got["photos"] == 5
    assert got["lo"] < got["value"] < got["hi"]
    md = _render(rows)
    assert f"{expected['rate']:.3f} [{expected['lo']:.3f}, {expected['hi']:.3f}] (30/80)" in md
    # JSON keeps the numbers of every row, never strings
    js = json.loads(_render(rows, "json"))
    assert [r["sr_mask"] for r in js] == [0.5, 0.25] and js[0]["sr_mask_photos"] == rows[0]["sr_mask_photos"]


def test_rows_without_counts_fall_back_to_the_seed_mean():
    rows = [_row("m", "d", "retrain", 0, s, 0.5) for s in (0, 1)]
    for r, v in zip(rows, (0.4, 0.6)):
        del r["sr_mask_photos"], r["sr_mask_n"]
        r["sr_mask"] = v
    got = _rec(_summary(rows), "m", "d")["sr_mask@0"]
    assert got["value"] == pytest.approx(0.5) and got["std"] == pytest.approx(0.1414213562)
    assert "0.500 ± 0.141" in _render(rows)


def test_overall_pools_the_counts_of_every_model():
    rows = _rows()
    rec = _rec(_summary(rows), "(all)", "tsdf")
    expected = stats.rate(_merged(rows, "sr_mask", defense="tsdf", adaptation="retrain", round=0))
    assert rec["sr_mask@0"]["value"] == pytest.approx(0.8) == pytest.approx(expected["rate"])
    assert (rec["sr_mask@0"]["lo"], rec["sr_mask@0"]["hi"]) == (expected["lo"], expected["hi"])
    assert rec["n_models"] == 2 and rec["persistence"] == pytest.approx(0.75 / 0.8)


def test_mean_metrics_show_sample_std_over_seeds():
    s = _summary()
    psnr = _rec(s, "stargan", "cmua")["metrics"]["psnr_out@0"]
    assert psnr["kind"] == "mean" and psnr["value"] == pytest.approx(20.5)
    assert psnr["std"] == pytest.approx(0.7071, 1e-3)


# -- item 3: the final round and the rank --------------------------------------------------
def test_final_round_columns_and_markdown_header():
    s = _summary()
    rec = _rec(s, "stargan", "cmua")
    assert rec["k"] == 1 and rec["n_seeds"] == 2
    assert rec["sr_mask@0"]["value"] == 1.0 and rec["sr_mask@k"]["value"] == pytest.approx(0.2)
    assert rec["sr_mask_ctrl@k"]["value"] == pytest.approx(0.3)
    assert rec["sr_mask_worst@k"]["value"] == pytest.approx(0.2)
    gain = rec["adaptation_gain"]
    rows = _rows()
    expected = stats.paired_difference(_merged(rows, "sr_mask_ctrl", model="stargan", defense="cmua", round=1),
                                       _merged(rows, "sr_mask", model="stargan", defense="cmua", round=1))
    assert gain["kind"] == "diff" and gain["value"] == pytest.approx(0.1) == pytest.approx(expected["diff"])
    assert (gain["lo"], gain["hi"]) == (expected["lo"], expected["hi"])
    assert rec["crop_yield"]["value"] == 0.25 and (rec["eval_dropped"], rec["eval_total"]) == (2, 8)
    assert rec["attacker_keeps"] == {"retrained": 2}
    md = _render(rows)
    head = next(line for line in md.splitlines() if line.startswith("| Rank"))
    for col in ("Final SR", "Crop yield", "Persistence", "SR_mask@0", "SR_mask@k (retrained)", "SR_mask_ctrl@k",
                "Adaptation gain", "Eval dropped", "Seeds", "Status"):
        assert col in head
    assert head.index("Final SR") + len("Final SR") < head.index("Crop yield")  # crop yield beside the ranked SR
    line = next(x for x in md.split("## Model: stargan")[1].splitlines() if x.startswith("| 2 ") and "cmua" in x)
    assert "2/8" in line and "+0.100 [" in line


def test_rank_uses_the_attackers_best_option_and_crop_yield_is_beside_it():
    # "wrecked": retraining broke the model (SR vs the retrained model 0), the attacker keeps the original (0.5)
    rows = [_row("m", "wrecked", "retrain", 0, 0, 0.5), _row("m", "wrecked", "retrain", 1, 0, 0.0, worst=0.5),
            _row("m", "steady", "retrain", 0, 0, 0.5), _row("m", "steady", "retrain", 1, 0, 0.3),
            _row("m", "wrecked", "jpeg", 0, 0, 0.1), _row("m", "steady", "jpeg", 0, 0, 0.2)]
    s = _summary(rows)
    wrecked, steady = _rec(s, "m", "wrecked"), _rec(s, "m", "steady")
    assert wrecked["final_basis"] == "sr_mask_worst@k" and wrecked["sr_final"] == 0.5
    assert (wrecked["rank"], steady["rank"]) == (1, 2)
    assert wrecked["persistence"] == pytest.approx(1.0) and steady["persistence"] == pytest.approx(0.6)
    # a non-retraining adaptation ranks on SR_mask@0
    assert _rec(s, "m", "steady", "jpeg")["final_basis"] == "sr_mask@0"
    assert (_rec(s, "m", "steady", "jpeg")["rank"], _rec(s, "m", "wrecked", "jpeg")["rank"]) == (1, 2)


def test_persistence_rule():
    assert persistence(0.8, 0.2) == pytest.approx(0.25)
    assert persistence(0.0, 0.05) is None and persistence(0.0, 0.0) is None
    assert persistence(0.5, None) is None
    s = _summary()
    assert _rec(s, "stargan", "tsdf")["persistence"] == pytest.approx(0.8 / 0.9)
    assert _rec(s, "attgan", "facepoison")["persistence"] is None
    assert _rec(s, "stargan", "tsdf", "jpeg")["persistence"] is None  # no retraining round


def test_rank_by_final_sr_average_over_models_and_ties():
    s = _summary()
    assert [_rec(s, "stargan", d)["rank"] for d in ("tsdf", "cmua", "facepoison")] == [1, 2, 3]
    assert _rec(s, "(all)", "tsdf")["rank"] == 1 and _rec(s, "(all)", "facepoison")["rank"] == 3
    assert _rec(s, "(all)", "cmua", "jpeg")["rank"] == 1  # jpeg: round 0, cmua 0.5 > tsdf 0.45
    stargan = [r["defense"] for r in s["per_model"] if r["model"] == "stargan" and r["adaptation"] == "retrain"]
    assert stargan[:3] == ["tsdf", "cmua", "facepoison"]
    ties = _summary([_row("m", d, "retrain", 1, 0, sr) for d, sr in (("a", 0.5), ("b", 0.5), ("c", 0.1))])
    assert [_rec(ties, "m", d)["rank"] for d in "abc"] == [1.5, 1.5, 3]


# -- item 1: the metric plugins' columns drive the metrics table -----------------------------
class _FakeMetric:
    name = "fake"
    columns = ("fake_score",)


class _FakeEntry:
    factory = _FakeMetric


class _FakeRegistry:
    def __init__(self, entries):
        self.entries = entries

    def names(self, kind):
        assert kind == "metric"
        return sorted(self.entries)

    def get(self, kind, name):
        return self.entries[name]


def test_a_new_metric_plugins_columns_appear_in_the_markdown_table():
    rows = [_row("m", "d", "retrain", r, 0, 0.5, fake_score=0.123 + r) for r in (0, 1)]
    md = _render(rows, metric_columns={"forgery": ("sr_mask",), "fake": ("fake_score",)})
    metrics = md.split("### Metrics: m")[1]
    head = next(line for line in metrics.splitlines() if line.startswith("| Defense"))
    assert "fake_score" in head and "sr_mask" in head and "psnr_in" not in head  # only the declared columns
    assert "0.123" in metrics and "1.123" in metrics  # @0 and @k lines
    # from a registry: every registered metric, or the ones the rows' provenance names
    registry = _FakeRegistry({"fake": _FakeEntry(), "other": type("E", (), {"factory": type(
        "M", (), {"columns": ("other_col",)})})()})
    assert registry_columns(registry) == {"fake": ("fake_score",), "other": ("other_col",)}
    assert declared_columns(rows, registry=registry) == ["fake_score", "other_col"]
    named = [dict(r, metrics=["fake"]) for r in rows]
    assert declared_columns(named, registry=registry) == ["fake_score"]
    md = render(named, "markdown", registry=registry)
    assert "fake_score" in md.split("### Metrics: m")[1]
    line = next(csv.DictReader(io.StringIO(render(named, "csv", registry=registry))))
    assert float(line["fake_score@0"]) == pytest.approx(0.123) and float(line["fake_score@k"]) == pytest.approx(1.123)


def test_builtin_registry_declares_the_forgery_and_invisibility_columns():
    cols = declared_columns([{"defense": "d", "model": "m", "adaptation": "a", "round": 0}])
    for col in ("sr_mask", "l2_mask", "psnr_in", "crop_yield"):
        assert col in cols


def test_unfilled_declared_columns_are_left_out():
    s = _summary(metric_columns={"forgery": ("sr_mask", "never_filled")})
    assert s["columns"] == ["sr_mask"]


# -- item 4: the reference defense against each other defense --------------------------------
def test_comparison_paired_bootstrap_in_final_sr_and_persistence():
    rows = _rows()
    s = _summary(rows)
    assert s["reference"] == "tsdf"
    (line,) = [c for c in s["comparison"] if (c["model"], c["adaptation"], c["defense"]) ==
               ("stargan", "retrain", "cmua")]
    pick = dict(model="stargan", adaptation="retrain")
    a_k, b_k = (_merged(rows, "sr_mask_worst", defense=d, round=1, **pick) for d in ("tsdf", "cmua"))
    a0, b0 = (_merged(rows, "sr_mask", defense=d, round=0, **pick) for d in ("tsdf", "cmua"))
    d_sr, d_p = stats.paired_difference(a_k, b_k), stats.paired_difference(a_k, b_k, a0, b0)
    assert line["d_sr_final"]["value"] == pytest.approx(0.6) == pytest.approx(d_sr["diff"])
    assert (line["d_sr_final"]["lo"], line["d_sr_final"]["hi"]) == (d_sr["lo"], d_sr["hi"])
    assert line["d_sr_final"]["excludes_zero"] is d_sr["excludes_zero"] is True
    assert line["d_persistence"]["value"] == pytest.approx(0.8 / 0.9 - 0.2) == pytest.approx(d_p["diff"])
    assert (line["d_persistence"]["lo"], line["d_persistence"]["hi"]) == (d_p["lo"], d_p["hi"])
    # persistence of a defense that never broke the original model is undefined
    (fp,) = [c for c in s["comparison"] if (c["model"], c["adaptation"], c["defense"]) ==
             ("attgan", "retrain", "facepoison")]
    assert fp["d_persistence"] is None and fp["d_sr_final"]["value"] == pytest.approx(0.65)
    # pooled over models, and non-retraining adaptations on SR_mask@0 without persistence
    assert any(c["model"] == "(all)" and c["defense"] == "cmua" for c in s["comparison"])
    (jp,) = [c for c in s["comparison"] if (c["model"], c["adaptation"], c["defense"]) == ("stargan", "jpeg", "cmua")]
    assert jp["d_sr_final"]["value"] == pytest.approx(-0.05) and jp["d_persistence"] is None
    assert not any(c["defense"] == "tsdf" for c in s["comparison"])


def test_comparison_in_all_four_formats_and_another_reference():
    rows = _rows()
    md = _render(rows)
    assert "## tsdf against each other defense" in md
    line = next(x for x in md.split("## tsdf against")[1].splitlines() if x.startswith("| stargan") and "cmua" in x)
    assert "+0.600 [" in line and "| yes" in line
    tex = _render(rows, "latex")
    assert "tsdf against each other defense" in tex and r"$\Delta$ final SR" in tex
    lines = list(csv.DictReader(io.StringIO(_render(rows, "csv", table="comparison"))))
    rec = next(r for r in lines if (r["model"], r["adaptation"], r["defense"]) == ("stargan", "retrain", "cmua"))
    assert float(rec["d_sr_final"]) == pytest.approx(0.6) and rec["d_sr_final_excludes_zero"] == "True"
    assert float(rec["d_sr_final_lo"]) <= 0.6 <= float(rec["d_sr_final_hi"]) and rec["reference"] == "tsdf"
    js = json.loads(_render(rows, "json", table="comparison"))
    assert {c["defense"] for c in js} == {"cmua", "facepoison", "pgd"} and js[0]["note"] == DEMO_NOTE
    other = _summary(rows, reference_defense="cmua")
    assert other["reference"] == "cmua" and {c["defense"] for c in other["comparison"]} == {"tsdf", "facepoison", "pgd"}
    with pytest.raises(TsdfBenchError, match="reference defense 'nope'"):
        _summary(rows, reference_defense="nope")
    assert _summary([r for r in rows if r["defense"] != "tsdf"])["comparison"] == []


def test_comparison_with_a_failed_defense_says_error():
    s = _summary()
    (line,) = [c for c in s["comparison"] if (c["model"], c["adaptation"], c["defense"]) ==
               ("stargan", "retrain", "pgd")]
    assert line["status"] == "error" and line["d_sr_final"] is None


# -- item 5: the rules that stay -----------------------------------------------------------
def test_error_rows_are_shown_not_dropped():
    rows = _rows()
    s = _summary(rows)
    pgd = _rec(s, "stargan", "pgd")
    assert pgd["status"] == "error" and pgd["rank"] is None
    assert s["errors"][0]["error"].startswith("CheckpointError")
    md = _render(rows)
    assert "## Errors" in md and "CheckpointError: boom \\| bad" in md
    pgd_line = next(line for line in md.splitlines() if "| pgd" in line)
    assert "error" in pgd_line
    rows.append(_row("stargan", "tsdf", "retrain", 1, 2, None, status="error", error="OOM"))
    assert _rec(_summary(rows), "stargan", "tsdf")["status"] == "1 of 5 rows failed"
    js = json.loads(_render(rows, "json"))
    assert any(r["status"] == "error" and r["error"] == "OOM" for r in js)
    assert "error" in _render(rows, "csv") and "pgd" in _render(rows, "latex")


def test_markdown_header_rules_and_demo_note():
    md = _render(_rows())
    assert DEMO_NOTE in md and "abc123" in md and "facenet-sample" in md and RULES in md
    for text in ("SR_mask_worst@k", "cluster bootstrap", "Persistence = Final SR / SR_mask@0", "Adaptation gain"):
        assert text in RULES
    assert "## Overall (all models pooled)" in md and "## Model: stargan" in md and "## Model: attgan" in md
    assert "### Metrics: stargan" in md and "## Metrics (all models pooled)" in md
    assert DEMO_NOTE not in _render(_rows(), header={"scale": "paper", "data": "celeba", "config_hash": "x"})


def test_csv_has_numbers_intervals_and_counts():
    records = list(csv.DictReader(io.StringIO(_render(_rows(), "csv"))))
    rec = next(r for r in records if (r["model"], r["defense"], r["adaptation"]) == ("stargan", "cmua", "retrain"))
    assert float(rec["sr_mask@k"]) == pytest.approx(0.2) and float(rec["final"]) == pytest.approx(0.2)
    assert rec["sr_mask@0_pairs"] == "80" and rec["final_basis"] == "sr_mask_worst@k"
    assert float(rec["sr_mask_worst@k_lo"]) <= 0.2 <= float(rec["sr_mask_worst@k_hi"])
    assert float(rec["psnr_out@0_std"]) == pytest.approx(0.7071, 1e-3)
    assert float(rec["persistence"]) == pytest.approx(0.2) and rec["note"] == DEMO_NOTE
    assert any(r["model"] == "(all)" for r in records)
    jpeg = next(r for r in records if (r["model"], r["defense"], r["adaptation"]) == ("stargan", "cmua", "jpeg"))
    assert jpeg["sr_mask@k"] == "" and jpeg["persistence"] == "" and jpeg["final_basis"] == "sr_mask@0"


def test_latex_escapes_and_uses_pm():
    rows = [_row("stargan", "my_def&co", "retrain", r, s, 0.5) for r in (0, 1) for s in (0, 1)]
    tex = _render(rows, "latex")
    assert r"my\_def\&co" in tex and r"$\pm$" in tex and r"\begin{tabular}" in tex
    assert "demo-scale numbers" in tex


def test_json_flat_rows_keys_and_nulls():
    rows = _rows()
    rows[0]["sr_mask"] = float("nan")
    data = json.loads(_render(rows, "json"))
    assert len(data) == len(rows)
    for row in data:
        for key in ("defense", "model", "adaptation", "round", "l2_mask", "sr_mask", "psnr_out", "crop_yield",
                    "sr_mask_worst", "sr_mask_ctrl", "adaptation_gain", "sr_mask_lo", "run_id", "config_hash", "note"):
            assert key in row
        if row["round"] == 0:
            assert row["crop_yield"] is None
    assert any(r["sr_mask"] is None and r["status"] == "ok" for r in data)  # NaN -> null, valid JSON
    assert flat_rows([{"defense": "d", "model": "m", "adaptation": "a", "round": 0}],
                     metric_columns=COLUMNS)[0]["sr_mask"] is None


def test_write_leaderboards(tmp_path):
    paths = write_leaderboards(_rows(), tmp_path / "lb", {"scale": "demo", "data": "x", "config_hash": "h"},
                               metric_columns=COLUMNS)
    assert sorted(p.name for p in paths.values()) == ["comparison.csv", "comparison.json", "leaderboard.csv",
                                                       "leaderboard.json", "leaderboard.md", "leaderboard.tex"]
    assert all(p.stat().st_size > 100 for p in paths.values())
    assert len(json.loads(paths["json"].read_text())) == len(_rows())
    assert paths["markdown"].read_text() == _render(_rows(), header={"scale": "demo", "data": "x", "config_hash": "h"})


def test_bad_format_table_and_rows_raise():
    with pytest.raises(TsdfBenchError, match="markdown"):
        render(_rows(), "html")
    with pytest.raises(TsdfBenchError, match="comparison"):
        render(_rows(), "csv", table="nope")
    with pytest.raises(TsdfBenchError, match="lacks"):
        render([{"defense": "d"}], "markdown")


def test_superseded_rows_keep_the_newest():
    old = _row("m", "d", "retrain", 0, 0, 0.1, run_id="old")
    new = _row("m", "d", "retrain", 0, 0, 0.9)
    s = _summary([old, new])
    assert s["superseded"] == 1 and _rec(s, "m", "d")["sr_mask@0"]["value"] == 0.9
    assert "1 rows replaced by newer runs" in _render([old, new])
    js = json.loads(_render([old, new], "json"))  # the JSON holds what the tables use
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
    assert "## Model: stargan" in md and "abc123" in md and "## tsdf against each other defense" in md
    from tsdf_bench.cli import main

    out = tmp_path / "lb.json"
    assert main(["leaderboard", "--results", str(tmp_path / "results.sqlite"), "--format", "json",
                 "--output", str(out), "--run-id", "latest"]) == 0
    assert len(json.loads(out.read_text())) == len(rows)
    assert main(["leaderboard", "--results", str(tmp_path / "nope.sqlite")]) == 2
    assert not (tmp_path / "nope.sqlite").exists()
    # a published leaderboard.json re-renders to the same tables
    again = load_rows(out)
    assert len(again) == len(rows) and leaderboard_text(again, "markdown") == md
    (tmp_path / "bad.json").write_text('{"not": "rows"}')
    with pytest.raises(Exception, match="not a leaderboard.json"):
        load_rows(tmp_path / "bad.json")


def test_detection_table_reports_recall_per_detector_and_crop_yield():
    base = {"model": "m", "adaptation": "retrain", "seed": 0, "run_id": "r", "status": "ok", "error": None}
    rows = [
        dict(base, defense="tsdf", round=0, det_recall_mtcnn=0.25, det_f1_mtcnn=0.4, det_recall_paper_mtcnn=0.3),
        dict(base, defense="tsdf", round=1, crop_yield=0.5),
        dict(base, defense="none", round=0, det_recall_mtcnn=1.0, det_f1_mtcnn=1.0),
        dict(base, defense="none", round=1, crop_yield=1.0),
    ]
    rows += [dict(r, model="m2") for r in rows]  # detection is per defense: other models repeat it
    headers, body = detection_table(rows)
    assert headers == ["Defense", "Recall mtcnn", "F1 mtcnn", "Crop yield@k"]  # the paper's form is no detector
    assert body == [["none", "1.000", "1.000", "1.000"], ["tsdf", "0.250", "0.400", "0.500"]]
    assert "## Poisoning" in render(rows, "markdown", metric_columns=COLUMNS)
