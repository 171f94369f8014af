"""AttentionGAN (Tang et al., "AttentionGAN: Unpaired Image-to-Image Translation using
Attention-Guided GANs", IEEE TNNLS 2021; the multi-domain v1 that CMUA calls AGGAN).

StarGAN's generator whose last 7x7 conv gives 4 channels and no tanh:
``A = sigmoid(ch 0)``, ``content = ch 1-3`` (unbounded, no activation, as the official code),
``output = content * A + x * (1 - A)`` (not clamped).  Everything else -- 5 attributes, protocol
targets, scales, per-image InstanceNorm statistics, the WGAN-GP + classification + cycle objective
with lambda_cls 1 / lambda_rec 10 / lambda_gp 10 -- is StarGAN's (see :mod:`.stargan`).

Official checkpoint: ``celeba_256_pretrained/200000-G.ckpt`` (plain state_dict), paper scale.

Demo recipe (:attr:`AttentionGAN.demo_recipe`, shipped trained; curve and grid in
``docs/model-card.md``): 4,000 steps at the official n_critic 5 and lr 1e-4 (800 generator
updates), batch 8 (official 16), the gradient penalty every 4th D step scaled by 4.  Unlike the
demo StarGAN it has **no reconstruction warm-up**: a warm-up teaches G the pass-through
``attention -> 0``, joint training then edits with a faint mask and extreme content, and per-image
PGD at eps 0.05 plateaus at SR_mask 0.50-0.58 however long it trains (the previous recipe);
without it the model reaches 0.93-0.99 from 500 steps on.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .stargan import StarGAN

WEIGHTS = Path(__file__).with_name("weights")  # the shipped demo checkpoints (package data)


class AttentionGAN(StarGAN):
    """AttentionGAN-v1-multi.  ``AttentionGAN(scale="demo", checkpoint=None, norm_stats="instance")``;
    :meth:`generate_parts` also returns the attention and content maps."""

    # the demo-scale training schedule (tsdf_bench.models.zoo.get_model; train() keyword arguments
    # plus "steps"); measured in docs/model-card.md
    demo_weights_dir = WEIGHTS  # shipped demo checkpoints (tsdf_bench.models.shipped)
    # the long demo recipe, chosen from its training curve (docs/model-card.md); shipped trained
    # official n_critic 5 and lr 1e-4, and no reconstruction warm-up: after one, the attention mask
    # starts saturated at pass-through and the model stays insensitive (PGD SR_mask@0 0.57)
    demo_recipe = dict(steps=4000, batch_size=8, n_critic=5, lr=1e-4, lr_d=1e-4, reg_every=4)

    name = "attentiongan"
    official_checkpoint_file = "celeba_256_pretrained/200000-G.ckpt"
    out_channels, tanh = 4, False

    def generate_parts(self, x, condition):
        """``(output, attention [B,1,H,W], content [B,3,H,W])``."""
        raw = self.G(self._check_x(x), condition.to(x.device))
        attention = torch.sigmoid(raw[:, :1])
        content = raw[:, 1:4]
        return content * attention + x * (1 - attention), attention, content

    def generate(self, x, condition):
        return self.generate_parts(x, condition)[0]
