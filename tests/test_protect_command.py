"""``tsdf-bench protect`` end to end on a temporary folder with a bad file."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from defense_toys import ToyDetector, ToyGAN, toy_images  # noqa: F401
from tsdf_bench import imageio
from tsdf_bench.hashing import file_sha256
from tsdf_bench.cli import main as cli_main
from tsdf_bench.commands import protect
from tsdf_bench.plugins import get_registry


@pytest.fixture()
def photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(src / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (22, 22, 3), dtype=np.uint8)).save(src / "b.png")  # same stem
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not a photo")
    return src


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_protect_noise_end_to_end(photos, tmp_path, capsys):
    before = snapshot(photos)
    out = tmp_path / "out"
    rc = cli_main(["protect", "--defense", "noise", "--input", str(photos), "--output", str(out), "--eps", "0.03"])
    assert rc == 1  # one unreadable image
    assert snapshot(photos) == before  # originals untouched
    record = json.loads((out / protect.RECORD_NAME).read_text())
    assert record["defense"] == "noise" and record["eps"] == 0.03
    assert [f["input"] for f in record["failures"]] == ["broken.png"]
    assert [f["input"] for f in record["skipped"]] == ["notes.txt"]
    outputs = {f["input"]: f for f in record["files"]}
    assert set(outputs) == {"a.png", "b.jpg", "b.png"}
    # every output is named after its full input name: b.jpg and b.png both kept, unambiguously
    assert {n: f["output"] for n, f in outputs.items()} == {"a.png": "a.png.png", "b.jpg": "b.jpg.png",
                                                           "b.png": "b.png.png"}
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png.png", "b.jpg.png", "b.png.png"]
    for name, f in outputs.items():
        assert f["output_sha256"] == file_sha256(out / f["output"])
        assert f["input_sha256"] == file_sha256(photos / name)
        x, p = imageio.read_image(photos / name), imageio.read_image(out / f["output"])
        assert p.shape == x.shape
        assert (p - x).abs().max() <= 0.03 + 1e-6  # the budget holds in the written 8-bit file
        assert (p - x).abs().max() > 0
    assert "broken.png" in capsys.readouterr().out

    # a second run refuses to overwrite, unless told to
    assert cli_main(["protect", "--defense", "noise", "--input", str(photos), "--output", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert cli_main(["protect", "--defense", "noise", "--input", str(photos), "--output", str(out),
                     "--overwrite", "--seed", "1"]) == 1


def test_protect_refuses_an_image_too_small_for_a_face(photos, tmp_path, capsys):
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(photos / "dot.png")
    Image.fromarray(np.zeros((19, 40, 3), dtype=np.uint8)).save(photos / "strip.png")
    out = tmp_path / "out"
    assert cli_main(["protect", "--defense", "noise", "--input", str(photos), "--output", str(out)]) == 1
    record = json.loads((out / protect.RECORD_NAME).read_text())
    reasons = {f["input"]: f["reason"] for f in record["failures"]}
    assert reasons["dot.png"] == "image too small to hold a face: 1x1 pixels; the minimum is 20x20"
    assert reasons["strip.png"] == "image too small to hold a face: 40x19 pixels; the minimum is 20x20"
    assert not (out / "dot.png.png").exists() and not (out / "strip.png.png").exists()
    assert {f["input"] for f in record["files"]} == {"a.png", "b.jpg", "b.png"}
    assert "dot.png: image too small to hold a face" in capsys.readouterr().out
    # a folder of nothing but a 1x1 image is refused, saying the minimum
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(lone / "dot.png")
    assert cli_main(["protect", "--defense", "noise", "--input", str(lone), "--output", str(tmp_path / "o2")]) == 2
    captured = capsys.readouterr()
    assert "no usable image" in captured.err and "at least 20x20 pixels" in captured.err
    assert "dot.png: image too small to hold a face: 1x1 pixels; the minimum is 20x20" in captured.out
    assert not (tmp_path / "o2").exists()


def test_protect_refuses_the_input_folder(photos, capsys):
    before = snapshot(photos)
    assert cli_main(["protect", "--defense", "none", "--input", str(photos), "--output", str(photos)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert snapshot(photos) == before


def test_universal_defense_needs_a_perturbation(photos, tmp_path, capsys):
    assert cli_main(["protect", "--defense", "cmua", "--input", str(photos), "--output", str(tmp_path / "o")]) == 2
    assert "--perturbation" in capsys.readouterr().err


def test_protect_with_a_fitted_perturbation_file(photos, tmp_path):
    models = [ToyGAN("m1", seed=1)]
    d = get_registry().create("defense", "found", passes=1, batch_size=4, max_images=4, step=0.005)
    d.fit(toy_images(4, 16), None, models, [])
    pert = d.save(tmp_path / "found.pt")
    out = tmp_path / "out"
    rc = cli_main(["protect", "--defense", "found", "--input", str(photos), "--output", str(out),
                   "--perturbation", str(pert)])
    assert rc == 1
    record = json.loads((out / protect.RECORD_NAME).read_text())
    from tsdf_bench.hashing import tensors_sha256
    assert record["perturbation"]["sha256"] == tensors_sha256(d.perturbation)
    # made by another defense: refused
    with pytest.raises(Exception, match="made by defense 'found'"):
        protect.main(types.SimpleNamespace(**{**vars(_args(photos, tmp_path / "o2")), "defense": "cmua",
                                               "perturbation": pert}), get_registry())


def _args(src, dst, **kw):
    base = dict(defense="tsdf", input=src, output=dst, perturbation=None, models=[], detectors=[], scale="smoke",
                eps=0.05, seed=0, option=[], device="cpu", overwrite=False)
    return types.SimpleNamespace(**{**base, **kw})


def test_protect_fits_tsdf_on_the_folder(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(protect, "load_models", lambda names, scale, device: [ToyGAN(n, seed=i) for i, n in enumerate(names)])
    monkeypatch.setattr(protect, "load_detectors", lambda names, registry, device: [ToyDetector(n) for n in names])
    out = tmp_path / "out"
    args = _args(photos, out, models=["m1", "m2"], detectors=["d1"],
                 option=["passes=1", "batch_size=4", "poison_steps=2", "step=0.005"])
    assert protect.main(args, get_registry()) == 1
    record = json.loads((out / protect.RECORD_NAME).read_text())
    assert record["options"]["passes"] == 1 and record["options"]["poison_steps"] == 2
    saved = out / "tsdf-perturbation.pt"
    assert saved.is_file() and record["perturbation"]["file"] == str(saved)
    assert record["perturbation"]["provenance"]["models"] == ["m1", "m2"]
    assert len(record["files"]) == 3


def test_parse_options():
    assert protect.parse_options(["passes=2", "poisoning=false", "name=abc", "w=[1,2]"]) == {
        "passes": 2, "poisoning": False, "name": "abc", "w": [1, 2]}
    with pytest.raises(Exception, match="KEY=VALUE"):
        protect.parse_options(["passes"])


def test_quantize_within_budget_never_exceeds_eps():
    x = torch.round((torch.rand(3, 8, 8) * 2 - 1) * 127.5) / 127.5
    p = (x + 0.0299).clamp(-1, 1)  # rounding alone could overshoot 0.03 by half a level
    q = torch.from_numpy(protect.quantize_within_budget(x, p, 0.03)).permute(2, 0, 1).float() / 127.5 - 1
    assert (q - x).abs().max() <= 0.03 + 1e-6
