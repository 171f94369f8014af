"""Shared clean outputs vs recomputing them: the clean forgeries (demo StarGAN, 8 eval photos) and
clean detections (MTCNN) that a grid of cells needs, computed once and shared (optimised) or
once per cell (straightforward, ``runner.optimize = False``)."""

from measure import compare
from tsdf_bench.config import from_dict
from tsdf_bench.harness.data import RunData, Split
from tsdf_bench.harness.runner import Runner
from tsdf_bench.harness.store import ResultsStore

CELLS = 4  # e.g. 2 defenses x (round 0 + 1 retraining round) for one model


def test_shared_clean_outputs(benchmark, registry, faces, tmp_path):
    cfg = from_dict({"run": {"scale": "demo", "device": "cpu", "rounds": 1},
                     "data": {"source": "synthetic", "image_size": 128, "batch_size": 8},
                     "models": {"names": ["stargan"], "train": False}, "defenses": {"names": ["none"]},
                     "detectors": {"names": ["mtcnn"], "attacker": "mtcnn"},
                     "metrics": {"names": ["forgery"]}})
    split = Split(faces.images, faces.attrs)
    data = RunData(split, split, split, tuple(faces.attr_names), "bench", "8 embedded faces")
    runner = Runner(cfg, registry, ResultsStore(tmp_path / "r.sqlite"), "bench", tmp_path, progress=False, data=data)

    def grid():
        runner._clean_fake.clear()
        runner._clean_dets.clear()
        for _ in range(CELLS):
            runner.clean_reference("stargan", "retrain")
            runner.clean_detections("mtcnn")

    def optimised():
        runner.optimize = True
        grid()

    def straightforward():
        runner.optimize = False
        grid()

    compare(benchmark, optimised, straightforward, cells=CELLS, images=int(faces.images.shape[0]))
