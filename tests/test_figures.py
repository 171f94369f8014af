"""Figures: written with every run, valid PNGs; the persistence numbers they plot."""
import sys
from pathlib import Path

import pytest
from PIL import Image

from tsdf_bench.harness.figures import make_figures, persistence_values

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import CONFIG, run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def valid_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_run_writes_every_figure(tmp_path):
    text = CONFIG.replace("seeds = [0, 1]", "seeds = [0]").replace("rounds = 2", "rounds = 1")
    out = run(tmp_path, text, figures=True)
    figures = out.files["figures"]
    names = sorted(p.name for p in figures)
    assert names == ["detections.png", "persistence.png", "visual_fake-gan.png", "visual_fake-gan8.png"]
    for path in figures:
        assert path.parent == out.summary.run_dir / "figures"
        valid_png(path)


def test_figures_skip_what_is_missing(tmp_path):
    (tmp_path / "samples").mkdir()
    assert make_figures(tmp_path, rows=[]) == []


def test_persistence_values_average_seeds_and_use_the_last_round():
    def row(defense, rnd, seed, sr, status="ok"):
        return {"defense": defense, "model": "m", "adaptation": "retrain", "round": rnd, "seed": seed,
                "status": status, "sr_mask": sr, "ssim_out": 0.5}

    rows = [row("a", 0, 0, 1.0), row("a", 0, 1, 0.8), row("a", 1, 0, 0.5), row("a", 2, 0, 0.2), row("a", 2, 1, 0.4),
            row("b", 0, 0, 0.9), row("b", 2, 0, None, status="error")]
    metric, values = persistence_values(rows)
    assert metric == "sr_mask"
    assert values[("a", "m")] == pytest.approx((0.9, 0.3))
    assert ("b", "m") not in values  # its retraining round failed: no before/after pair
    metric, values = persistence_values(rows, "ssim_out")
    assert metric == "ssim_out" and values[("a", "m")] == pytest.approx((0.5, 0.5))
