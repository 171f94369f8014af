"""One attack step per model (forward + backward of the all-targets output loss w.r.t. the input),
at demo scale (64 px, batch 4) and paper scale (256 px, batch 1, random weights; ``paper_scale``).

The straightforward counterpart is the per-target loop (one generator call per target,
``model.optimize = False``, fp32, default memory format); the optimised path is the plugin's
batched ``generate_all`` (on CUDA also bf16 autocast and channels_last).  ``extra_info`` also
has the step's FLOPs, the achieved TFLOP/s and, on a GPU with a known bf16 peak, the fraction of
that peak.

``test_channels_last_*`` compare the two memory layouts alone (same device, same precision, batched
targets): the evidence behind applying channels_last on CUDA only (:func:`tsdf_bench.speed.channels_last`).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from measure import compare, flops_of, peak_memory, throughput
from tsdf_bench import speed
from tsdf_bench.defenses.attack_utils import model_outputs
from tsdf_bench.harness.data import select_attrs

MODELS = ["stargan", "attentiongan", "attgan", "hisd"]


def attack_step_fn(model, x, attrs, device, optimize: bool = True):
    """One PGD-style step: d MSE(G(x+d), G(x)) / d(x+d) over every target (``optimize``: batched
    targets and, on CUDA, bf16 autocast; off: the per-target loop in fp32)."""
    with torch.no_grad():
        clean = model_outputs(model, x, attrs)
    adv0 = (x + 0.01 * torch.sign(torch.randn_like(x))).clamp(-1, 1)

    def step():
        model.optimize = optimize
        with speed.autocast(device, optimize):
            adv = adv0.clone().requires_grad_(True)
            loss = F.mse_loss(model_outputs(model, adv, attrs).float(), clean.float())
            (grad,) = torch.autograd.grad(loss, adv)
        return grad

    return step


def _bench(benchmark, registry, faces, device, name, scale, batch):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_memory(None, device)
    model = speed.channels_last(registry.create("model", name, scale=scale).to(device).eval(), True)
    x = model.to_input_size(faces.images[:batch]).to(device)
    attrs = select_attrs(faces.attrs[:batch], faces.attr_names, model.attributes, name).to(device)
    step = attack_step_fn(model, x, attrs, device)
    straightforward = attack_step_fn(model, x, attrs, device, optimize=False)

    paper = scale == "paper"  # ~15 s a step on one CPU thread: one round each, no warm-up
    compare(benchmark, step, straightforward, device, repeat=1 if paper else 2, warmup=not paper,
            scale=scale, batch=batch, image_size=model.image_size,
            targets=len(model.conditions(attrs)), on=str(device))
    # throughput of the optimised step (FLOPs counted once, timed by pytest-benchmark above)
    benchmark.extra_info.update(throughput(flops_of(step), benchmark.stats.stats.median, device))
    memory = peak_memory(None, device)
    if "peak_rss_mib" in memory:
        memory["peak_rss_growth_mib"] = round(memory["peak_rss_mib"] - rss_before["peak_rss_mib"], 1)
    benchmark.extra_info.update(memory)


@pytest.mark.parametrize("name", MODELS)
def test_attack_step_demo(benchmark, registry, faces, device, name):
    _bench(benchmark, registry, faces, device, name, "demo", 4)


@pytest.mark.paper_scale
@pytest.mark.parametrize("name", MODELS)
def test_attack_step_paper(benchmark, registry, faces, device, name):
    _bench(benchmark, registry, faces, device, name, "paper", 1)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_attack_step_demo(benchmark, registry, faces, device, name):
    """Demo-scale attack step with channels_last weights and input vs the default layout;
    ``speedup`` > 1 means channels_last is faster on this device."""
    model = registry.create("model", name, scale="demo").to(device).eval()
    x = model.to_input_size(faces.images[:4]).to(device)
    attrs = select_attrs(faces.attrs[:4], faces.attr_names, model.attributes, name).to(device)
    nhwc_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    nhwc = attack_step_fn(nhwc_model, x.contiguous(memory_format=torch.channels_last), attrs, device)
    compare(benchmark, nhwc, attack_step_fn(model, x, attrs, device), device,
            compared="channels_last vs contiguous", batch=4, image_size=model.image_size, on=str(device))
