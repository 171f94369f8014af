"""The leaderboard's detection rates and crop yield: counts pooled over seeds, 95% intervals, the
count in the tables, the comparison, and rows of older runs without counts (tsdf_bench.leaderboard)."""
import csv
import io

import pytest

from test_leaderboard import COLUMNS, _rec, _render, _row, _summary
from tsdf_bench import stats
from tsdf_bench.leaderboard import detection_table, render
from tsdf_bench.schema import rate_family

# per (defense, seed): recall counts of mtcnn per source photo (2 face boxes per photo: two views)
RECALL = {("tsdf", 0): {"p0": [0, 2], "p1": [1, 2], "p2": [2, 2], "p3": [2, 2]},
          ("tsdf", 1): {"p0": [1, 2], "p1": [0, 2], "p2": [2, 2], "p3": [1, 2]},
          ("cmua", 0): {"p0": [2, 2], "p1": [2, 2], "p2": [2, 2], "p3": [2, 2]},
          ("cmua", 1): {"p0": [2, 2], "p1": [2, 2], "p2": [1, 2], "p3": [2, 2]}}
# per (defense, seed): usable crops of the collected photos (source photos c0..c3, two views each)
CROPS = {("tsdf", 0): {"c0": [0, 2], "c1": [1, 2], "c2": [2, 2], "c3": [1, 2]},
         ("tsdf", 1): {"c0": [1, 2], "c1": [0, 2], "c2": [2, 2], "c3": [1, 2]},
         ("cmua", 0): {"c0": [2, 2], "c1": [2, 2], "c2": [2, 2], "c3": [2, 2]},
         ("cmua", 1): {"c0": [2, 2], "c1": [1, 2], "c2": [2, 2], "c3": [2, 2]}}
MODELS = ("m1", "m2")


def _rows(counts=True):
    rows = []
    for model in MODELS:
        for (defense, seed), recall in RECALL.items():
            for rnd in (0, 1):
                row = _row(model, defense, "retrain", rnd, seed, 0.5, attacker_detector="mtcnn", pipeline="detect")
                # detection is the defense's and the seed's: every model and round carries the same
                row.update(stats.rate_columns("det_recall_mtcnn", recall))
                row.update(stats.rate_columns("det_f1_mtcnn", {p: [2 * h, h + n] for p, (h, n) in recall.items()}))
                if rnd:
                    row.update(stats.rate_columns("crop_yield", CROPS[(defense, seed)]))
                if not counts:
                    for name in ("det_recall_mtcnn", "det_f1_mtcnn", "crop_yield"):
                        for part in rate_family(name)[1:]:
                            row.pop(part, None)
                rows.append(row)
    return rows


def _pooled(table, *keys):
    return stats.rate(stats.merge_counts(*(table[k] for k in keys)))


def _cell(r):
    return f"{r['rate']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] ({r['successes']}/{r['pairs']})"


def test_detection_table_pools_seeds_once_per_defense_with_intervals_and_counts():
    headers, body = detection_table(_rows())
    assert headers == ["Defense", "Recall mtcnn", "F1 mtcnn", "Crop yield@k"]  # no "mtcnn_lo" detector
    tsdf = next(line for line in body if line[0] == "tsdf")
    recall = _pooled(RECALL, ("tsdf", 0), ("tsdf", 1))
    assert recall["pairs"] == 16 and recall["lo"] < recall["rate"] < recall["hi"]
    assert tsdf[1] == _cell(recall)  # 16 boxes: not added up over the 2 models and 2 rounds
    # the crop yield pools every model's and seed's collected photos at the last round
    crops = stats.rate(stats.merge_counts(*(CROPS[("tsdf", s)] for s in (0, 1) for _ in MODELS)))
    assert tsdf[3] == _cell(crops) and crops["pairs"] == 32
    assert "(16/16)" not in tsdf[1] and "Recall mtcnn" in render(_rows(), "markdown", metric_columns=COLUMNS)


def test_records_carry_crop_yield_and_detection_rates_overall_not_added_up_over_models():
    s = _summary(_rows())
    rec = _rec(s, "m1", "tsdf")
    crops = _pooled(CROPS, ("tsdf", 0), ("tsdf", 1))
    got = rec["crop_yield"]
    assert got["kind"] == "rate" and (got["value"], got["lo"], got["hi"]) == (crops["rate"], crops["lo"], crops["hi"])
    assert (got["successes"], got["pairs"]) == (8, 16)
    recall = _pooled(RECALL, ("tsdf", 0), ("tsdf", 1))
    assert rec["detection"]["det_recall_mtcnn"]["value"] == recall["rate"] and rec["attacker_detector"] == "mtcnn"
    overall = _rec(s, "(all)", "tsdf")
    assert overall["crop_yield"]["pairs"] == 32  # the attackers of both models: pooled like SR_mask
    assert overall["detection"]["det_recall_mtcnn"]["pairs"] == 16  # the same detection: not counted twice
    md = _render(_rows())
    assert _cell(crops) in md.split("## Model: m1")[1]  # the main table's crop yield, beside the final SR
    line = next(r for r in csv.DictReader(io.StringIO(_render(_rows(), "csv")))
                if (r["model"], r["defense"]) == ("m1", "tsdf"))
    assert (line["crop_yield_hits"], line["crop_yield_pairs"]) == ("8", "16")
    assert float(line["crop_yield_lo"]) == crops["lo"] and line["det_recall_mtcnn@0_hits"] == str(recall["successes"])


def test_comparison_compares_crop_yield_and_the_attackers_recall_with_paired_intervals():
    rows = _rows()
    s = _summary(rows)
    (line,) = [c for c in s["comparison"] if (c["model"], c["defense"]) == ("m1", "cmua")]
    d_crop = stats.paired_difference(stats.merge_counts(CROPS[("tsdf", 0)], CROPS[("tsdf", 1)]),
                                     stats.merge_counts(CROPS[("cmua", 0)], CROPS[("cmua", 1)]))
    assert line["d_crop_yield"]["value"] == pytest.approx(d_crop["diff"])
    assert (line["d_crop_yield"]["lo"], line["d_crop_yield"]["hi"]) == (d_crop["lo"], d_crop["hi"])
    d_recall = stats.paired_difference(stats.merge_counts(RECALL[("tsdf", 0)], RECALL[("tsdf", 1)]),
                                       stats.merge_counts(RECALL[("cmua", 0)], RECALL[("cmua", 1)]))
    assert line["detector"] == "mtcnn" and line["d_det_recall"]["value"] == pytest.approx(d_recall["diff"])
    assert line["d_det_recall"]["excludes_zero"] is d_recall["excludes_zero"]
    md = _render(rows)
    cells = next(x for x in md.split("against each other")[1].splitlines() if x.startswith("| m1") and "cmua" in x)
    assert f"{d_crop['diff']:+.3f} [{d_crop['lo']:+.3f}, {d_crop['hi']:+.3f}] (8/16 vs 15/16)" in cells
    assert f"mtcnn: {d_recall['diff']:+.3f} [" in cells and "(9/16 vs 15/16)" in cells
    js = list(csv.DictReader(io.StringIO(_render(rows, "csv", table="comparison"))))
    rec = next(r for r in js if (r["model"], r["defense"]) == ("m1", "cmua"))
    assert float(rec["d_crop_yield_lo"]) == d_crop["lo"] and rec["crop_yield_reference_hits"] == "8"
    assert rec["det_recall_other_pairs"] == "16" and rec["detector"] == "mtcnn"


def test_a_rates_counts_are_one_metrics_column():
    s = _summary(_rows(), metric_columns={"crop_yield": rate_family("crop_yield")})
    assert s["columns"] == ["crop_yield"]
    metrics = _render(_rows(), metric_columns={"crop_yield": rate_family("crop_yield")}).split("### Metrics: m1")[1]
    head = next(x for x in metrics.splitlines() if x.startswith("| Defense"))
    assert "crop_yield_lo" not in head and "(8/16)" in metrics


def test_rows_without_counts_render_bare_rates():
    rows = _rows(counts=False)
    headers, body = detection_table(rows)
    tsdf = next(line for line in body if line[0] == "tsdf")
    assert tsdf[1] == f"{(5 / 8 + 4 / 8) / 2:.3f}" and tsdf[3] == "0.500"  # the mean, no interval, no count
    s = _summary(rows)
    (line,) = [c for c in s["comparison"] if (c["model"], c["defense"]) == ("m1", "cmua")]
    assert line["d_crop_yield"]["lo"] is None and line["d_crop_yield"]["value"] == pytest.approx(0.5 - 15 / 16)
    md = _render(rows)
    cells = next(x for x in md.split("against each other")[1].splitlines() if x.startswith("| m1") and "cmua" in x)
    parts = [x.strip() for x in cells.split("|")]
    assert parts[9:13] == ["-0.438", "—", "mtcnn: -0.375", "—"]  # point differences: no interval, no verdict on 0
    main = next(x for x in md.split("## Model: m1")[1].splitlines() if "tsdf" in x)
    assert main.split("|")[6].strip() == "0.500 ± 0.000"  # old rows: the seeds' mean (± their std), as SR_mask
