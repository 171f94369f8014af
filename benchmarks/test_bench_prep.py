"""The attacker's data preparation (detect, crop, resize to 64 px) in images/s, with MTCNN and
RetinaFace, on 8 embedded photos at 128 px."""
import pytest

from measure import peak_memory
from tsdf_bench.prep import DataPreparation


@pytest.mark.parametrize("detector", ["mtcnn", "retinaface"])
def test_data_preparation(benchmark, registry, faces, device, detector):
    det = registry.create("detector", detector)
    if hasattr(det, "to"):
        det = det.to(device).eval()
    prep = DataPreparation(det, 64, crop="margin")
    x = faces.images.to(device)
    result = benchmark.pedantic(lambda: prep(x), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images=x.shape[0], kept=int(result.kept.numel()), device=str(device),
                                images_per_s=round(x.shape[0] / benchmark.stats.stats.median, 2),
                                **peak_memory(lambda: prep(x), device))
