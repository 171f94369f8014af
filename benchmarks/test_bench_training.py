"""One retraining step (``tsdf_bench.models.training.train`` with ``steps=1``: one D update and,
with ``n_critic=1``, one G update) of the demo StarGAN on 8 crops, batch 8; and the same step with
channels_last G, D and crops against the default layout (training stays in the default layout:
:mod:`tsdf_bench.models.training`)."""
import copy

import torch

from measure import compare, peak_memory
from tsdf_bench.harness.data import select_attrs
from tsdf_bench.models.training import train


def _step_fn(registry, faces, device, memory_format=torch.contiguous_format):
    base = registry.create("model", "stargan", scale="demo").to(device)
    images = base.to_input_size(faces.images).to(device)
    attrs = select_attrs(faces.attrs, faces.attr_names, base.attributes, base.name).to(device)
    base, images = base.to(memory_format=memory_format), images.contiguous(memory_format=memory_format)
    discriminator = base.make_discriminator().to(device).to(memory_format=memory_format)

    def step():
        model = copy.deepcopy(base)
        return train(model, images, attrs, 1, discriminator=copy.deepcopy(discriminator), batch_size=8,
                     n_critic=1, progress=False, seed=0)

    return images, step


def test_retraining_step(benchmark, registry, faces, device):
    images, step = _step_fn(registry, faces, device)

    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(images=images.shape[0], image_size=images.shape[-1], device=str(device),
                                **peak_memory(step, device))


def test_channels_last_retraining_step(benchmark, registry, faces, device):
    """``speedup`` > 1 means a channels_last training step is faster on this device."""
    _, nhwc = _step_fn(registry, faces, device, torch.channels_last)
    _, nchw = _step_fn(registry, faces, device)
    compare(benchmark, nhwc, nchw, device, compared="channels_last vs contiguous", on=str(device))
