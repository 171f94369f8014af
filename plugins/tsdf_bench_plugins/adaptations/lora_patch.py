"""LoRA Patching: the attacker patches the generator with gated low-rank adapters (Qu et al. 2025).

Qu, Guo, Hu and Lu, "LoRA Patching: Exposing the Fragility of Proactive Defenses against
Deepfakes" (arXiv 2510.03747; IEEE SPL 2026).  The attacker keeps the forgery model's weights and
adds, beside every convolution, transposed convolution and linear layer, a low-rank branch

    y = W x + sigmoid(g) * s * B(A x)        A: rank filters shaped like W's, B: 1x1 rank -> out

with a learnable scalar gate ``g`` (initialised to -1) and a fixed scale ``s`` (``alpha /
sqrt(rank)`` for (transposed) convolutions, ``alpha`` for linear layers).  Only ``A``, ``B`` and
``g`` are trained; every weight of the model, normalisation layers included, stays frozen.

Training, as in the authors' released code (``lora_patching.py``, ``utils/attack.py``, ``main.py``):
for every batch of faces ``x`` and every target ``c`` of the model's protocol,

1. ``x_adv`` = PGD against the *current patched* model: L-inf ``eps`` 0.05, 10 steps of 0.01,
   uniform random start, maximising ``MSE(G'(x_adv, c), G'(x, c))``;
2. one Adam step (lr 1e-3, betas (0.5, 0.999)) on
   ``MSE(G'(x, c), G(x, c)) + MSE(G'(x_adv, c), G(x, c))``, ``G`` the unpatched model:
   the patch learns to map protected inputs to the clean forgery while leaving clean inputs alone.

Defaults from that code: rank 8 (the README's "standard" patch), alpha 2.0, basic gate, batch 4,
both A and B Kaiming-uniform initialised (so the untrained patch already changes the output a
little; ``init="lora"`` zero-initialises B instead, the usual LoRA choice).  The paper's feature
(ImageNet ResNet-50) and BLIP ("MMFA") loss terms are zeroed in the released code and would need
downloaded weights; they are not implemented.  Its "defensive" variant (a warning watermark)
is not an attack and is not implemented either.

Data: the paper fine-tunes for one epoch on ~1,000 *clean*, pre-aligned CelebA faces; the
protection is synthesised by the PGD step above.  :meth:`LoRAPatchAdaptation.adapt` trains on the
images it is given (``crops``): give it the attacker's clean faces for the paper's setting; given
protected images, ``G(x)`` is the forgery of the protected image (the paper's ``x`` is clean).

Multi-round use: adapting a model that already carries patches continues training those patches
(the reference ``G`` is the same model with its patches switched off); patches never nest.
"""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.adaptations.base import Adaptation, check_pipeline
from tsdf_bench.errors import ConfigError

GATES = ("basic",)


class _LoRABase(nn.Module):
    """Shared gate/scale logic.  ``base`` is the frozen original layer; ``enabled`` switches the patch."""

    def __init__(self, base: nn.Module, rank: int, scale: float, gated: bool):
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scale = float(scale)
        self.gated = bool(gated)
        self.enabled = True
        if gated:
            self.gate = nn.Parameter(torch.tensor(-1.0))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def _mix(self, out: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        weight = torch.sigmoid(self.gate) * self.scale if self.gated else self.scale
        return out + weight * update

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:.4g}, gated={self.gated}"


class LoRAConv2d(_LoRABase):
    """A gated low-rank branch beside a frozen ``nn.Conv2d`` (groups=1)."""

    def __init__(self, base: nn.Conv2d, rank: int = 8, alpha: float = 2.0, gated: bool = True, init: str = "kaiming"):
        super().__init__(base, rank, alpha / math.sqrt(rank), gated)
        kh, kw = base.kernel_size
        a = torch.empty(rank, base.in_channels * kh * kw)
        self.lora_b = nn.Parameter(torch.empty(base.out_channels, rank))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        _init_b(self.lora_b, init)
        self.lora_a = nn.Parameter(a.view(rank, base.in_channels, kh, kw))

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        b = self.base
        low = F.conv2d(x, self.lora_a, stride=b.stride, padding=b.padding, dilation=b.dilation)
        return self._mix(out, F.conv2d(low, self.lora_b[:, :, None, None]))


class LoRAConvTranspose2d(_LoRABase):
    """A gated low-rank branch beside a frozen ``nn.ConvTranspose2d`` (groups=1)."""

    def __init__(self, base: nn.ConvTranspose2d, rank: int = 8, alpha: float = 2.0, gated: bool = True,
                 init: str = "kaiming"):
        super().__init__(base, rank, alpha / math.sqrt(rank), gated)
        kh, kw = base.kernel_size
        a = torch.empty(rank, base.in_channels * kh * kw)
        self.lora_b = nn.Parameter(torch.empty(base.out_channels, rank))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        _init_b(self.lora_b, init)
        self.lora_a = nn.Parameter(a.view(base.in_channels, rank, kh, kw))

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        b = self.base
        low = F.conv_transpose2d(x, self.lora_a, stride=b.stride, padding=b.padding,
                                 output_padding=b.output_padding, dilation=b.dilation)
        if low.shape[-2:] != out.shape[-2:]:  # an output_size given at call time: match the base
            low = low[..., :out.shape[-2], :out.shape[-1]]
        return self._mix(out, F.conv2d(low, self.lora_b[:, :, None, None]))


class LoRALinear(_LoRABase):
    """A gated low-rank branch beside a frozen ``nn.Linear`` (scale ``alpha``, not ``alpha / sqrt(rank)``)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 2.0, gated: bool = True, init: str = "kaiming"):
        super().__init__(base, rank, alpha, gated)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        _init_b(self.lora_b, init)

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        return self._mix(out, F.linear(F.linear(x, self.lora_a), self.lora_b))


def _init_b(b: nn.Parameter, init: str) -> None:
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        elif init == "lora":
            b.zero_()
        else:
            raise ConfigError(f"adaptation 'lora-patch': init must be 'kaiming' or 'lora', got {init!r}")


PATCHES = (LoRAConv2d, LoRAConvTranspose2d, LoRALinear)


def lora_modules(model: nn.Module) -> list[_LoRABase]:
    return [m for m in model.modules() if isinstance(m, _LoRABase)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every patch: ``lora_a``, ``lora_b`` and ``gate``."""
    out = []
    for m in lora_modules(model):
        out += [m.lora_a, m.lora_b] + ([m.gate] if m.gated else [])
    return out


def inject_lora(model: nn.Module, rank: int = 8, alpha: float = 2.0, gated: bool = True, init: str = "kaiming",
                linear: bool = True, skip: tuple[str, ...] = ("discriminator",)) -> int:
    """Replace, in place, every ``Conv2d`` / ``ConvTranspose2d`` (and ``Linear`` if ``linear``) of
    ``model`` with its patched version; returns how many were patched.

    Layers already patched are left as they are (no nesting); grouped convolutions are left
    unpatched; children named in ``skip`` (a discriminator kept on the model) are not entered.
    """
    count = 0
    for name, child in list(model.named_children()):
        if name in skip or isinstance(child, _LoRABase):
            continue
        patched = None
        if type(child) is nn.Conv2d and child.groups == 1:
            patched = LoRAConv2d(child, rank, alpha, gated, init)
        elif type(child) is nn.ConvTranspose2d and child.groups == 1:
            patched = LoRAConvTranspose2d(child, rank, alpha, gated, init)
        elif linear and type(child) is nn.Linear:
            patched = LoRALinear(child, rank, alpha, gated, init)
        if patched is not None:
            p = next(child.parameters())
            setattr(model, name, patched.to(device=p.device, dtype=p.dtype))
            count += 1
        else:
            count += inject_lora(child, rank, alpha, gated, init, linear, skip=())
    return count


@contextlib.contextmanager
def patches_disabled(model: nn.Module):
    """Run ``model`` as it was before patching (every LoRA branch switched off)."""
    mods = lora_modules(model)
    states = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, states):
            m.enabled = s


def pgd_protect(model, x: torch.Tensor, condition, *, eps: float = 0.05, steps: int = 10, step_size: float = 0.01,
                random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """The patching loop's own protection: L-inf PGD maximising ``MSE(G(x_adv), G(x))`` (LoRA Patching's
    ``LinfPGDAttack``: uniform start in [-eps, eps], signed steps, projection, clamp to [-1, 1])."""
    with torch.no_grad():
        y = model.generate(x, condition)
    if random_start:
        noise = torch.empty(x.shape, dtype=torch.float32).uniform_(-eps, eps, generator=generator)
        adv = x.detach() + noise.to(x.device, x.dtype)
    else:
        adv = x.detach().clone()
    for _ in range(int(steps)):
        adv.requires_grad_(True)
        loss = F.mse_loss(model.generate(adv, condition), y)
        (grad,) = torch.autograd.grad(loss, adv)
        step = adv.detach() + step_size * grad.sign()
        adv = (x + (step - x).clamp(-eps, eps)).clamp(-1.0, 1.0).detach()
    return adv


class LoRAPatchAdaptation(Adaptation):
    """Patch a deep copy of the generator with gated LoRA blocks and train only the patches.

    Args (all optional; defaults from the authors' code): ``rank`` (8), ``alpha`` (2.0),
    ``gated`` (True, the basic scalar gate), ``init`` ("kaiming": A and B as in the code;
    "lora": B = 0), ``linear`` (True: patch linear layers too, as the code does), ``batch_size``
    (4), ``lr`` (1e-3), ``betas`` ((0.5, 0.999)), ``eps`` (0.05), ``pgd_steps`` (10),
    ``pgd_step_size`` (0.01), ``max_targets`` (None: every target of the protocol per batch, as the
    code; an integer uses that many, cycling through the targets across batches), ``pipeline``
    ("aligned": the paper's pre-aligned faces, no face detection; "detect": through the
    attacker's detector and crop like ``retrain``).

    ``adapt(model, crops, attrs, steps=, seed=)``: ``steps`` is the number of batches (the code's
    iterations); each batch makes one Adam update per target.  Returns the patched copy in eval
    mode; ``model`` is left untouched.  ``last_info`` reports images, batches, updates, the number
    of patched layers, adapter and frozen parameter counts, and the first/last loss.
    """

    name = "lora-patch"
    retrains = True

    def __init__(self, rank: int = 8, alpha: float = 2.0, gated: bool = True, init: str = "kaiming",
                 linear: bool = True, batch_size: int = 4, lr: float = 1e-3, betas=(0.5, 0.999),
                 eps: float = 0.05, pgd_steps: int = 10, pgd_step_size: float = 0.01, max_targets: int | None = None,
                 pipeline: str = "aligned"):
        if int(rank) < 1:
            raise ConfigError(f"adaptation 'lora-patch': rank must be >= 1, got {rank}")
        if int(batch_size) < 1:
            raise ConfigError(f"adaptation 'lora-patch': batch_size must be >= 1, got {batch_size}")
        if init not in ("kaiming", "lora"):
            raise ConfigError(f"adaptation 'lora-patch': init must be 'kaiming' or 'lora', got {init!r}")
        if float(eps) < 0 or int(pgd_steps) < 0:
            raise ConfigError(f"adaptation 'lora-patch': eps and pgd_steps must be >= 0, got {eps}, {pgd_steps}")
        if max_targets is not None and int(max_targets) < 1:
            raise ConfigError(f"adaptation 'lora-patch': max_targets must be >= 1, got {max_targets}")
        self.pipeline = check_pipeline(pipeline, "lora-patch")
        self.rank, self.alpha, self.gated, self.init = int(rank), float(alpha), bool(gated), init
        self.linear, self.batch_size, self.lr = bool(linear), int(batch_size), float(lr)
        self.betas = tuple(float(b) for b in betas)
        self.eps, self.pgd_steps, self.pgd_step_size = float(eps), int(pgd_steps), float(pgd_step_size)
        self.max_targets = None if max_targets is None else int(max_targets)
        self.last_info: dict = {}

    def patch(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """A deep copy of ``model`` with (untrained, or the existing) patches, base weights frozen."""
        new = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            inject_lora(new, self.rank, self.alpha, self.gated, self.init, self.linear)
        adapters = {id(p) for p in adapter_parameters(new)}
        for p in new.parameters():
            p.requires_grad_(id(p) in adapters)
        return new

    def adapt(self, model, crops: torch.Tensor, attrs: torch.Tensor, *, steps: int, seed: int, progress: bool = False):
        """Return a patched, trained deep copy of ``model`` (``model`` itself is left untouched)."""
        new = self.patch(model, seed)
        new.eval()
        n = int(crops.shape[0]) if isinstance(crops, torch.Tensor) else 0
        info = {"images": n, "patched_layers": len(lora_modules(new)),
                "adapter_params": sum(p.numel() for p in adapter_parameters(new)),
                "frozen_params": sum(p.numel() for p in new.parameters() if not p.requires_grad)}
        if n == 0 or int(steps) == 0:
            info.update(steps=0, updates=0, skipped="no usable images collected" if n == 0 else "steps=0")
            self.last_info = info
            return new
        params = adapter_parameters(new)
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        device = next(new.parameters()).device
        x_all = new.to_input_size(crops.to(device).float()) if hasattr(new, "to_input_size") else crops.to(device)
        a_all = attrs.to(device).float()
        rng = np.random.default_rng(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        losses, updates, target_cursor = [], 0, 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(steps), desc="lora-patch", leave=False)
        for _ in range(int(steps)):
            if len(order) < self.batch_size:
                order += rng.permutation(n).tolist() * max(1, math.ceil(self.batch_size / n))
            idx, order = order[:self.batch_size], order[self.batch_size:]
            x, a = x_all[idx], a_all[idx]
            conditions = list(new.conditions(a))
            if self.max_targets is not None and self.max_targets < len(conditions):
                picks = [(target_cursor + i) % len(conditions) for i in range(self.max_targets)]
                target_cursor = (target_cursor + self.max_targets) % len(conditions)
                conditions = [conditions[i] for i in picks]
            for c in conditions:
                x_adv = pgd_protect(new, x, c, eps=self.eps, steps=self.pgd_steps, step_size=self.pgd_step_size,
                                    generator=gen)
                with torch.no_grad(), patches_disabled(new):
                    y_ori = new.generate(x, c)
                loss = F.mse_loss(new.generate(x, c), y_ori) + F.mse_loss(new.generate(x_adv, c), y_ori)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                updates += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        new.eval()
        info.update(steps=int(steps), updates=updates, first_loss=losses[0], last_loss=losses[-1],
                    gate_mean=float(np.mean([torch.sigmoid(m.gate).item() for m in lora_modules(new) if m.gated]))
                    if self.gated else None)
        self.last_info = info
        return new
