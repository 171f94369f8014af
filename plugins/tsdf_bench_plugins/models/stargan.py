"""StarGAN (Choi et al., "StarGAN: Unified Generative Adversarial Networks for Multi-Domain
Image-to-Image Translation", CVPR 2018) as a tsdf-bench deepfake model.

Protocol (CMUA-Watermark, reused by FOUND and TSDF): 5 CelebA attributes; for each attribute one
target (hair colours set one-hot, Male/Young flipped) -> 5 edits per image.

Scales (``scale=``):
  - ``"paper"``: the official 256 px model (conv_dim 64, 6 residual blocks, D 6 layers, 8.43M G
    parameters); ``checkpoint=".../200000-G.ckpt"`` loads the official generator strictly.
  - ``"demo"``: the same architecture at 64 px, conv_dim 16, 3 residual blocks, D 5 layers, except
    that the two up-sampling layers are nearest-neighbour upsampling + 3x3 conv instead of 4x4
    transposed convs (``upsample="nearest"``; transposed convs gave checkerboard images after a
    short CPU run).  Its demo recipe trains in about 130 s on one CPU thread, see :mod:`tsdf_bench.models.zoo`.
  - ``"smoke"``: 32 px, conv_dim 8, 1 residual block, for tests.

InstanceNorm statistics: CMUA and the upstream solver never call ``G.eval()``, so every image is
normalised by its own statistics.  This plugin does the same by default, in eval mode too, and never
updates the running statistics (``norm_stats="running"`` gives the official ``eval()`` behaviour).

Training objective (:meth:`losses`): WGAN-GP + domain classification (BCE over the attributes,
random target labels from a shuffled batch) + cycle reconstruction; lambda_cls 1, lambda_rec 10,
lambda_gp 10; Adam 1e-4, betas (0.5, 0.999), n_critic 5.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tsdf_bench.errors import ConfigError
from tsdf_bench.models.base import DeepfakeModel

from ._blocks import (StarGANDiscriminator, StarGANGenerator, classification_loss, gradient_penalty,
                      set_instance_stats)

ATTRIBUTES = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")

# scale -> generator/discriminator configuration
CONFIGS = {
    "paper": dict(image_size=256, conv_dim=64, repeat_num=6, d_conv_dim=64, d_repeat_num=6, upsample="transpose"),
    "demo": dict(image_size=64, conv_dim=16, repeat_num=3, d_conv_dim=16, d_repeat_num=5, upsample="nearest"),
    "smoke": dict(image_size=32, conv_dim=8, repeat_num=1, d_conv_dim=8, d_repeat_num=4, upsample="transpose"),
}

WEIGHTS = Path(__file__).with_name("weights")  # the shipped demo checkpoints (package data)


def scale_config(configs, scale):
    if scale not in configs:
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(configs)}")
    return dict(configs[scale])


class StarGAN(DeepfakeModel):
    """StarGAN generator + protocol.  ``StarGAN(scale="demo", checkpoint=None, norm_stats="instance")``.

    Conditions are label tensors ``[B, 5]`` over :data:`ATTRIBUTES`; ``generate(x, c)`` returns
    ``[B, 3, H, W]`` in [-1, 1]; ``encode(x, c=None)`` the residual-bottleneck features
    ``[B, 4*conv_dim, H/4, W/4]`` (``c`` defaults to all-zero labels).

    With ``checkpoint`` (paper scale) the official ``200000-G.ckpt`` is loaded strictly;
    any other scale loads a checkpoint of ours (see :mod:`tsdf_bench.models.checkpoints`).
    """

    # the demo-scale training schedule (tsdf_bench.models.zoo.get_model; train() keyword arguments
    # plus "steps"); measured in docs/model-card.md
    demo_weights_dir = WEIGHTS  # shipped demo checkpoints (tsdf_bench.models.shipped)
    # the long demo recipe, chosen from its training curve (docs/model-card.md); shipped trained
    demo_recipe = dict(steps=3000, batch_size=8, n_critic=1, lr=2e-4, lr_d=2e-4, recon_warmup_steps=150,
                       recon_lr=1e-3, reg_every=4)

    name = "stargan"
    official_checkpoint_file = "200000-G.ckpt of the 256 px CelebA model"
    official_discriminator_file = "200000-D.ckpt beside 200000-G.ckpt (a bare state_dict, the official key names)"
    attributes = ATTRIBUTES
    out_channels, tanh = 3, True
    train_defaults = {"lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.5, 0.999), "n_critic": 5}
    lambda_cls, lambda_rec, lambda_gp = 1.0, 10.0, 10.0

    def __init__(self, scale: str = "demo", checkpoint=None, norm_stats: str = "instance", **overrides):
        cfg = scale_config(CONFIGS, scale)
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ConfigError(f"unknown {self.name} option(s) {sorted(unknown)}; valid: scale, checkpoint, "
                              f"norm_stats, {', '.join(cfg)}")
        cfg.update(overrides)
        super().__init__(scale, cfg["image_size"])
        self.config = cfg
        self.G = StarGANGenerator(cfg["conv_dim"], len(self.attributes), cfg["repeat_num"],
                                  out_channels=self.out_channels, tanh=self.tanh, upsample=cfg["upsample"])
        if norm_stats not in ("instance", "running"):
            raise ConfigError(f"norm_stats must be 'instance' (CMUA behaviour) or 'running' (official eval()), "
                              f"got {norm_stats!r}")
        self.norm_stats = norm_stats
        set_instance_stats(self.G, norm_stats == "instance")
        self.eval()
        if checkpoint is not None:
            from tsdf_bench.models.checkpoints import load_model_checkpoint

            load_model_checkpoint(self, checkpoint)

    # -- official state_dict: the generator's keys without our "G." prefix -----------------
    def official_state_dict(self):
        return self.G.state_dict()

    def load_official_state_dict(self, state_dict, strict=True):
        return self.G.load_state_dict(state_dict, strict=strict)

    # -- inference -------------------------------------------------------------------------
    def conditions(self, attrs):
        """StarGAN's ``create_labels``: per attribute, hair colours one-hot, others flipped."""
        attrs = self._check_attrs(attrs)
        hair = [i for i, n in enumerate(self.attributes) if n in HAIR]
        out = []
        for i in range(len(self.attributes)):
            c = attrs.clone()
            if i in hair:
                c[:, hair] = 0
                c[:, i] = 1
            else:
                c[:, i] = (c[:, i] == 0).to(c.dtype)
            out.append(c)
        return out

    def _check_attrs(self, attrs):
        if not isinstance(attrs, torch.Tensor) or attrs.dim() != 2 or attrs.shape[1] != len(self.attributes):
            shape = tuple(attrs.shape) if isinstance(attrs, torch.Tensor) else type(attrs).__name__
            raise ConfigError(f"{self.name} needs attrs [B, {len(self.attributes)}] of 0/1 labels over "
                              f"{list(self.attributes)}, got {shape}")
        return attrs.float()

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"{self.name} needs images [B, 3, H, W] in [-1, 1], got {shape}")
        return x

    def generate(self, x, condition):
        return self.G(self._check_x(x), condition.to(x.device))

    def forward(self, x, condition):
        return self.generate(x, condition)

    def generate_all(self, x, attrs):
        """All 5 targets in one batched forward: ``[B, 5, 3, H, W]``."""
        x = self._check_x(x)
        conds = torch.stack(self.conditions(attrs)).to(x.device)  # [T, B, A]
        t, b = conds.shape[:2]
        xs = x.unsqueeze(0).expand(t, *x.shape).reshape(t * b, *x.shape[1:])
        out = self.generate(xs, conds.reshape(t * b, -1))
        return out.view(t, b, *out.shape[1:]).transpose(0, 1)

    def encode(self, x, condition=None):
        x = self._check_x(x)
        if condition is None:
            condition = x.new_zeros(x.shape[0], len(self.attributes))
        return self.G.features(x, condition.to(x.device))

    # -- training ---------------------------------------------------------------------------
    def generator_parameters(self):
        return self.G.parameters()

    def make_discriminator(self):
        c = self.config
        return StarGANDiscriminator(c["image_size"], c["d_conv_dim"], len(self.attributes), c["d_repeat_num"])

    def reconstruction_loss(self, x, attrs):
        """Demo warm-up term (see :func:`tsdf_bench.models.training.train`): ``lambda_rec * |G(x, c_org) - x|_1``."""
        return {"g_rec_id": self.lambda_rec * (self.generate(x, attrs.float()) - x).abs().mean()}

    def losses(self, discriminator, x, attrs, part, reg_scale=1.0):
        """StarGAN's solver objective for one batch (``part`` "d" or "g").

        ``reg_scale`` multiplies the gradient penalty (lazy regularisation; 0 skips it).
        """
        label_org = attrs.float()
        label_trg = label_org[torch.randperm(label_org.size(0))]
        if part == "d":
            out_src, out_cls = discriminator(x)
            with torch.no_grad():
                x_fake = self.generate(x, label_trg)
            out_fake, _ = discriminator(x_fake)
            gp = (reg_scale * self.lambda_gp * gradient_penalty(lambda z: discriminator(z)[0], x, x_fake)
                  if reg_scale else x.new_zeros(()))
            return {"d_real": -out_src.mean(), "d_fake": out_fake.mean(),
                    "d_cls": self.lambda_cls * classification_loss(out_cls, label_org), "d_gp": gp}
        if part == "g":
            x_fake = self.generate(x, label_trg)
            out_src, out_cls = discriminator(x_fake)
            x_rec = self.generate(x_fake, label_org)
            return {"g_fake": -out_src.mean(), "g_cls": self.lambda_cls * classification_loss(out_cls, label_trg),
                    "g_rec": self.lambda_rec * (x - x_rec).abs().mean()}
        raise ConfigError(f"part must be 'd' or 'g', got {part!r}")
