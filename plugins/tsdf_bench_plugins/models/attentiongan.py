"""AttentionGAN (Tang et al., "AttentionGAN: Unpaired Image-to-Image Translation using
Attention-Guided GANs", IEEE TNNLS 2021; the multi-domain v1 that CMUA calls AGGAN).

StarGAN's generator whose last 7x7 conv gives 4 channels and no tanh:
``A = sigmoid(ch 0)``, ``content = ch 1-3`` (unbounded, no activation, as the official code),
``output = content * A + x * (1 - A)`` (not clamped).  Everything else -- 5 attributes, protocol
targets, scales, per-image InstanceNorm statistics, the WGAN-GP + classification + cycle objective
with lambda_cls 1 / lambda_rec 10 / lambda_gp 10 -- is StarGAN's (see :mod:`.stargan`).

Official checkpoint: ``celeba_256_pretrained/200000-G.ckpt`` (plain state_dict), paper scale.
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
    demo_recipe = dict(steps=3000, batch_size=8, n_critic=1, lr=2e-4, lr_d=2e-4, recon_warmup_steps=100,
                       recon_lr=1e-3, reg_every=4)

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
