"""AttGAN (He et al., "AttGAN: Facial Attribute Editing by Only Changing What You Want",
IEEE TIP 2019) as a tsdf-bench deepfake model, configured as CMUA's ``256_shortcut1_inject0_none``.

Protocol (CMUA): 13 CelebA attributes; 14 conditions per image: the reconstruction plus one flip
per attribute (with AttGAN's attribute-conflict rules, e.g. a new hair colour clears the others).
Conditions are already scaled as the generator takes them: ``(att * 2 - 1) * thres_int`` with
thres_int 0.5, the flipped attribute multiplied by test_int / thres_int (test_int 1.0).

Scales: ``"paper"`` (256 px, encoder/decoder 64..1024 channels, 5+5 layers, shortcut 1, inject 0;
``checkpoint=".../weights.199.pth"`` loads the official generator strictly), ``"demo"`` (64 px,
4+4 layers, 16..128 channels, shortcut_layers 2 and inject_layers 1 -- variants from the AttGAN
paper's ablation, chosen so a short CPU run reconstructs sharper faces and applies the attributes
at two resolutions -- and ``enc_norm="instancenorm"``), ``"smoke"`` (32 px, 3+3 layers, 8..32 channels).
BatchNorm runs as the official code: batch statistics in training, running statistics in
``eval()`` (CMUA calls ``eval()``; models come out of the factory and the trainer in eval mode).

Demo-scale departure, the encoder's normalisation: ``enc_norm="instancenorm"`` is the official
code's ``--enc_norm instancenorm`` option (``nn.InstanceNorm2d(affine=True)``: per-image statistics,
in eval too), not the CMUA checkpoint's BatchNorm.  Measured (docs/model-card-attgan-sensitivity.md):
with BatchNorm the demo AttGAN hardly reacts to eps = 0.05 (per-image PGD SR_mask 0.00, L2_mask
0.014 at 500 joint steps; 0.003 / 0.020 at 1,500; 0.00 / 0.013 at 3,000 in the issue-12 probe)
whatever its shortcut/inject layout, reconstruction weight, target intensity or mask threshold;
the instance-normalised encoder alone, same recipe and seed, gives SR_mask 0.93 (L2_mask 0.11; seed
1: 0.93), mostly as a whole-image colour shift of the forgery.  ``enc_norm``/``dec_norm`` are options
(``"batchnorm"`` restores the previous demo model); paper and smoke scales keep BatchNorm.

Training objective (:meth:`losses`): WGAN-GP + attribute classification + reconstruction with
the official weights: reconstruction 100, G attribute 10, D attribute 1, GP 10; targets are the
batch's attributes shuffled; Adam 2e-4, betas (0.5, 0.999), 5 D steps per G step.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.errors import ConfigError
from tsdf_bench.models.base import DeepfakeModel

from ._blocks import AttGANDiscriminator, AttGANGenerator, InstanceNorm2d, gradient_penalty
from .stargan import scale_config

ATTRIBUTES = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Male",
              "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young")

CONFIGS = {
    "paper": dict(image_size=256, enc_dim=64, enc_layers=5, dec_dim=64, dec_layers=5, shortcut_layers=1,
                  inject_layers=0, max_dim=1024, d_dim=64, d_layers=5, d_fc_dim=1024, enc_norm="batchnorm",
                  dec_norm="batchnorm"),
    # demo: the official code's --enc_norm instancenorm (docs/model-card-attgan-sensitivity.md)
    "demo": dict(image_size=64, enc_dim=16, enc_layers=4, dec_dim=16, dec_layers=4, shortcut_layers=2,
                 inject_layers=1, max_dim=256, d_dim=16, d_layers=4, d_fc_dim=128, enc_norm="instancenorm",
                 dec_norm="batchnorm"),
    "smoke": dict(image_size=32, enc_dim=8, enc_layers=3, dec_dim=8, dec_layers=3, shortcut_layers=1,
                  inject_layers=0, max_dim=64, d_dim=8, d_layers=3, d_fc_dim=32, enc_norm="batchnorm",
                  dec_norm="batchnorm"),
}
NORMS = ("batchnorm", "instancenorm")  # the official code's enc_norm / dec_norm choices used here

WEIGHTS = Path(__file__).with_name("weights")  # the shipped demo checkpoints (package data)


def set_generator_norm(G, part: str, norm: str) -> None:
    """Use ``norm`` in the normalised blocks of ``G.enc_layers`` or ``G.dec_layers`` (``part``).

    ``"instancenorm"`` is the official code's option of that name (``--enc_norm`` / ``--dec_norm``
    in ``elvisyjlin/AttGAN-PyTorch``: ``nn.InstanceNorm2d(n, affine=True)``, per-image statistics
    in training and eval), as :class:`._blocks.InstanceNorm2d`, which computes exactly that but
    keeps (never updates or uses) running-statistics buffers, so the state_dict has the BatchNorm
    keys and a file still names the scale it fits.  ``"batchnorm"`` leaves the blocks as built.
    """
    if norm not in NORMS:
        raise ConfigError(f"attgan {part[:3]}_norm must be one of {NORMS}, got {norm!r}")
    if norm == "batchnorm":
        return
    for block in getattr(G, part):
        for i, layer in enumerate(block.layers):
            if isinstance(layer, nn.BatchNorm2d):
                block.layers[i] = InstanceNorm2d(layer.num_features)

# AttGAN's attribute-conflict rules: when the key attribute is switched on, these are switched off.
_CONFLICTS = {
    "Bald": ("Bangs",), "Receding_Hairline": ("Bangs",), "Bangs": ("Bald", "Receding_Hairline"),
    "Black_Hair": ("Blond_Hair", "Brown_Hair", "Gray_Hair"), "Blond_Hair": ("Black_Hair", "Brown_Hair", "Gray_Hair"),
    "Brown_Hair": ("Black_Hair", "Blond_Hair", "Gray_Hair"), "Gray_Hair": ("Black_Hair", "Blond_Hair", "Brown_Hair"),
    "Straight_Hair": ("Wavy_Hair",), "Wavy_Hair": ("Straight_Hair",),
    "Mustache": ("No_Beard",), "No_Beard": ("Mustache",),
}


def resolve_conflicts(att: torch.Tensor, index: int, names) -> torch.Tensor:
    """After setting attribute ``index``, clear the attributes it excludes in rows where it is on."""
    on = att[:, index] != 0
    for other in _CONFLICTS.get(names[index], ()):
        if other in names:
            j = names.index(other)
            att[:, j] = torch.where(on, torch.zeros_like(att[:, j]), att[:, j])
    return att


class AttGAN(DeepfakeModel):
    """AttGAN generator + protocol.  ``AttGAN(scale="demo", checkpoint=None)``.

    Conditions are scaled attribute vectors ``[B, 13]``; ``generate(x, a)`` -> ``[B, 3, H, W]`` in
    [-1, 1]; ``encode(x)`` -> the deepest encoder map ``[B, C, H/2**L, W/2**L]``.
    """

    # the demo-scale training schedule (tsdf_bench.models.zoo.get_model; train() keyword arguments
    # plus "steps"); measured in docs/model-card.md
    demo_weights_dir = WEIGHTS  # shipped demo checkpoints (tsdf_bench.models.shipped)
    # the long demo recipe, chosen from its training curve (docs/model-card.md); shipped trained
    demo_recipe = dict(steps=1500, batch_size=8, n_critic=1, lr=2e-4, lr_d=2e-4, recon_warmup_steps=100,
                       recon_lr=1e-3, reg_every=4)

    name = "attgan"
    official_checkpoint_file = "weights.199.pth of 256_shortcut1_inject0_none"
    official_discriminator_file = "weights.199.pth (its 'D' entry) of 256_shortcut1_inject0_none"
    attributes = ATTRIBUTES
    train_defaults = {"lr_g": 2e-4, "lr_d": 2e-4, "betas": (0.5, 0.999), "n_critic": 5}
    thres_int, test_int = 0.5, 1.0
    lambda_rec, lambda_g_att, lambda_d_att, lambda_gp = 100.0, 10.0, 1.0, 10.0

    def __init__(self, scale: str = "demo", checkpoint=None, **overrides):
        cfg = scale_config(CONFIGS, scale)
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ConfigError(f"unknown attgan option(s) {sorted(unknown)}; valid: scale, checkpoint, {', '.join(cfg)}")
        cfg.update(overrides)
        super().__init__(scale, cfg["image_size"])
        self.config = cfg
        self.G = AttGANGenerator(cfg["enc_dim"], cfg["enc_layers"], cfg["dec_dim"], cfg["dec_layers"],
                                 len(self.attributes), cfg["shortcut_layers"], cfg["inject_layers"], cfg["max_dim"])
        set_generator_norm(self.G, "enc_layers", cfg["enc_norm"])
        set_generator_norm(self.G, "dec_layers", cfg["dec_norm"])
        self.eval()
        if checkpoint is not None:
            from tsdf_bench.models.checkpoints import load_model_checkpoint

            load_model_checkpoint(self, checkpoint)

    def official_state_dict(self):
        return self.G.state_dict()

    def load_official_state_dict(self, state_dict, strict=True):
        return self.G.load_state_dict(state_dict, strict=strict)

    # -- inference -------------------------------------------------------------------------
    def scale_attrs(self, attrs: torch.Tensor) -> torch.Tensor:
        """Binary attributes -> the generator's input scale ``(att * 2 - 1) * thres_int``."""
        return (attrs.float() * 2 - 1) * self.thres_int

    def conditions(self, attrs):
        """CMUA's 14 test vectors: reconstruction, then each attribute flipped (conflicts resolved)."""
        if not isinstance(attrs, torch.Tensor) or attrs.dim() != 2 or attrs.shape[1] != len(self.attributes):
            shape = tuple(attrs.shape) if isinstance(attrs, torch.Tensor) else type(attrs).__name__
            raise ConfigError(f"attgan needs attrs [B, 13] of 0/1 labels over {list(self.attributes)}, got {shape}")
        attrs = attrs.float()
        out = [self.scale_attrs(attrs)]
        for i in range(len(self.attributes)):
            tmp = attrs.clone()
            tmp[:, i] = 1 - tmp[:, i]
            tmp = resolve_conflicts(tmp, i, list(self.attributes))
            c = self.scale_attrs(tmp)
            c[:, i] = c[:, i] * (self.test_int / self.thres_int)
            out.append(c)
        return out

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"attgan needs images [B, 3, H, W] in [-1, 1], got {shape}")
        if x.shape[-1] % 2 ** len(self.G.enc_layers) or x.shape[-2] % 2 ** len(self.G.enc_layers):
            raise ConfigError(f"attgan at scale {self.scale!r} needs H and W divisible by "
                              f"{2 ** len(self.G.enc_layers)} (trained at {self.image_size}), got {tuple(x.shape[-2:])}")
        return x

    def generate(self, x, condition):
        return self.G(self._check_x(x), condition.to(x.device))

    def forward(self, x, condition):
        return self.generate(x, condition)

    def generate_all(self, x, attrs):
        """All 14 targets in one batched forward: ``[B, 14, 3, H, W]`` (exact in eval mode)."""
        x = self._check_x(x)
        conds = torch.stack(self.conditions(attrs)).to(x.device)
        t, b = conds.shape[:2]
        xs = x.unsqueeze(0).expand(t, *x.shape).reshape(t * b, *x.shape[1:])
        out = self.G(xs, conds.reshape(t * b, -1))
        return out.view(t, b, *out.shape[1:]).transpose(0, 1)

    def encode(self, x, condition=None):
        """The deepest encoder map (``condition`` is ignored: AttGAN's encoder sees no labels)."""
        return self.G.encode(self._check_x(x))[-1]

    # -- training ---------------------------------------------------------------------------
    def generator_parameters(self):
        return self.G.parameters()

    def make_discriminator(self):
        c = self.config
        return AttGANDiscriminator(c["image_size"], c["d_dim"], c["d_layers"], len(self.attributes), c["d_fc_dim"],
                                   c["max_dim"])

    @staticmethod
    def discriminator_key_from_official(key: str) -> str:
        """An official D key (``elvisyjlin/AttGAN-PyTorch``) as ours: its fully connected heads wrap
        each Linear in a ``LinearBlock`` (``fc_adv.0.layers.0``, ``fc_adv.1.layers.0``: Linear, ReLU
        / Linear), ours are one Sequential (``fc_adv.0``, ReLU, ``fc_adv.2``).  The conv trunk's
        keys (``conv.<i>.layers.<j>``) are the same."""
        head, dot, rest = key.partition(".")
        if head in ("fc_adv", "fc_cls") and dot:
            index, _, tail = rest.partition(".layers.0.")
            if index in ("0", "1") and tail:
                return f"{head}.{2 * int(index)}.{tail}"
        return key

    def reconstruction_loss(self, x, attrs):
        """Demo warm-up term (see :func:`tsdf_bench.models.training.train`): ``lambda_rec * |G(x, a) - x|_1``."""
        return {"g_rec_id": self.lambda_rec * (self.G(x, self.scale_attrs(attrs)) - x).abs().mean()}

    def losses(self, discriminator, x, attrs, part, reg_scale=1.0):
        """AttGAN's official objective for one batch (``part`` "d" or "g").

        ``reg_scale`` multiplies the gradient penalty (lazy regularisation; 0 skips it).
        """
        att_a = attrs.float()
        att_b = att_a[torch.randperm(att_a.size(0))]
        a_, b_ = self.scale_attrs(att_a), self.scale_attrs(att_b)
        if part == "d":
            with torch.no_grad():
                fake = self.G(x, b_)
            d_real, dc_real = discriminator(x)
            d_fake, _ = discriminator(fake)
            return {"d_adv": d_fake.mean() - d_real.mean(),
                    "d_gp": (reg_scale * self.lambda_gp * gradient_penalty(lambda z: discriminator(z)[0], x, fake)
                             if reg_scale else x.new_zeros(())),
                    "d_att": self.lambda_d_att * F.binary_cross_entropy_with_logits(dc_real, att_a)}
        if part == "g":
            zs = self.G.encode(x)
            fake = self.G.decode(zs, b_)
            recon = self.G.decode(zs, a_)
            d_fake, dc_fake = discriminator(fake)
            return {"g_adv": -d_fake.mean(),
                    "g_att": self.lambda_g_att * F.binary_cross_entropy_with_logits(dc_fake, att_b),
                    "g_rec": self.lambda_rec * (recon - x).abs().mean()}
        raise ConfigError(f"part must be 'd' or 'g', got {part!r}")
