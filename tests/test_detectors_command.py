import json

import numpy as np
from PIL import Image

from detector_fixtures import portrait_arrays
from tsdf_bench.cli import main


def test_detect_command_writes_boxes(tmp_path, capsys):
    Image.fromarray(portrait_arrays()["astronaut"]).save(tmp_path / "astronaut.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "dets.json"
    assert main(["detect", str(tmp_path), "--detector", "retinaface", "--output", str(out)]) == 0
    results = {r["image"].split("/")[-1]: r for r in json.loads(out.read_text())["results"]}
    assert len(results["astronaut.png"]["faces"]) == 1
    assert results["blank.png"]["faces"] == []
    assert "error" in results["broken.jpg"]
    assert main(["detect", str(tmp_path / "astronaut.png"), "--detector", "haar"]) == 0
    assert "astronaut.png: box" in capsys.readouterr().out


def test_detect_command_missing_checkpoint_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TSDF_BENCH_S3FD", raising=False)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "blank.png")
    assert main(["detect", str(tmp_path), "--detector", "s3fd"]) == 2
    assert "TSDF_BENCH_S3FD" in capsys.readouterr().err
