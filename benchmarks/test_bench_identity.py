"""The identity metric's embedding: dlib's face-recognition ResNet run in PyTorch (the default,
``backend = "torch"``) against dlib's own ``compute_face_descriptor`` (``backend = "dlib"``; dlib-bin
is built without BLAS), on the same 48 aligned chips of the embedded faces, one thread, side by
side in one run.  ``speedup`` = dlib's seconds / torch's; ``ms_per_face`` for both."""
import numpy as np
import pytest

from measure import compare

dlib = pytest.importorskip("dlib", reason="the identity metric needs dlib-bin (bootstrap.py installs it)")


def test_identity_embedding_torch_vs_dlib(benchmark, faces):
    from tsdf_bench_plugins.metrics.identity import DlibFaceEmbedder

    images = faces.images.repeat(6, 1, 1, 1)  # 48 faces
    torch_emb, dlib_emb = DlibFaceEmbedder(backend="torch"), DlibFaceEmbedder(backend="dlib")
    shapes = torch_emb.shapes(images)  # the landmark fit is dlib's in both; timed apart from it
    compare(benchmark, lambda: torch_emb.embed(images, shapes), lambda: dlib_emb.embed(images, shapes),
            compared="torch port vs dlib", faces=images.shape[0])
    info = benchmark.extra_info
    info.update(ms_per_face_torch=round(1000 * info["optimized_s"] / images.shape[0], 2),
                ms_per_face_dlib=round(1000 * info["straightforward_s"] / images.shape[0], 2),
                max_abs_diff=float(np.abs(torch_emb.embed(images, shapes) - dlib_emb.embed(images, shapes)).max()))
