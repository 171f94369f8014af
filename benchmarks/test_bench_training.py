"""One retraining step (``tsdf_bench.models.training.train`` with ``steps=1``: one D update and,
with ``n_critic=1``, one G update) of the demo StarGAN on 8 crops, batch 8."""
import copy

from measure import peak_memory
from tsdf_bench.harness.data import select_attrs
from tsdf_bench.models.training import train


def test_retraining_step(benchmark, registry, faces, device):
    base = registry.create("model", "stargan", scale="demo").to(device)
    images = base.to_input_size(faces.images).to(device)
    attrs = select_attrs(faces.attrs, faces.attr_names, base.attributes, base.name).to(device)

    def step():
        model = copy.deepcopy(base)
        return train(model, images, attrs, 1, batch_size=8, n_critic=1, progress=False, seed=0)

    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images=images.shape[0], image_size=images.shape[-1], device=str(device),
                                **peak_memory(step, device))
