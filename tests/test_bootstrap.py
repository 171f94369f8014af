"""bootstrap.py stops with a clear message, before pip runs, when torch cannot fit on the disk."""
import importlib.util
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "bootstrap.py")
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)

Usage = namedtuple("Usage", "total used free")


def fake_free(monkeypatch, free_bytes):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free_bytes, free_bytes))


def test_too_little_space_stops_with_the_numbers_and_the_fix(tmp_path, monkeypatch):
    fake_free(monkeypatch, int(1.6e9))
    with pytest.raises(SystemExit) as stop:
        bootstrap.check_disk_space("x86_64", venv=tmp_path)
    message = str(stop.value)
    assert "1.6 GB free" in message and "6.5 GB" in message and str(tmp_path) in message
    assert "bootstrap.py again" in message


def test_enough_space_passes(tmp_path, monkeypatch):
    fake_free(monkeypatch, int(7e9))
    bootstrap.check_disk_space("x86_64", venv=tmp_path)
    fake_free(monkeypatch, int(2e9))
    bootstrap.check_disk_space("aarch64", venv=tmp_path)


def test_installed_torch_needs_no_space(tmp_path, monkeypatch):
    fake_free(monkeypatch, 0)
    marker = tmp_path / "lib/python3.11/site-packages/torch/__init__.py"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    bootstrap.check_disk_space("x86_64", venv=tmp_path)
