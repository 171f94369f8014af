"""Layers shared by the StarGAN-family and AttGAN plugins, plus the WGAN-GP pieces.

Module and parameter names reproduce the official state_dict layouts
(``../shared/official-layouts/*_layout.json``) so official checkpoints load strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d(affine=True, track_running_stats=True)`` as in StarGAN's generator,
    with a switch for which statistics it uses.

    ``use_instance_stats=True`` (default) normalises every image by its own statistics, which is
    what CMUA/upstream StarGAN compute because they never call ``G.eval()``; the running
    statistics are kept (so checkpoints round-trip) but never updated.  ``False`` uses the
    running statistics (the official ``eval()`` behaviour) outside training.
    """

    def __init__(self, num_features):
        super().__init__(num_features, affine=True, track_running_stats=True)
        self.use_instance_stats = True

    def forward(self, x):
        if self.use_instance_stats or self.training:
            return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ResidualBlock(nn.Module):
    """StarGAN residual block: conv3x3-IN-ReLU-conv3x3-IN plus identity (keys ``main.0/1/3/4``)."""

    def __init__(self, dim):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), InstanceNorm2d(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.main(x)


class StarGANGenerator(nn.Module):
    """StarGAN's generator (Choi et al., CVPR 2018), layer for layer as ``yunjey/stargan``.

    ``out_channels=4, tanh=False`` gives AttentionGAN-v1-multi's raw output.  ``bottleneck_index``
    is the index in ``main`` of the last residual block (its output is the feature attacks use).
    ``upsample="nearest"`` (demo scale only; the official layout is ``"transpose"``) replaces each
    4x4 stride-2 transposed conv by nearest-neighbour upsampling + 3x3 conv (one ``nn.Sequential``
    at the same index of ``main``), which avoids the checkerboard artefacts of transposed convs
    early in training (Odena et al., "Deconvolution and Checkerboard Artifacts", Distill 2016).
    """

    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6, out_channels=3, tanh=True, upsample="transpose"):
        super().__init__()
        layers = [nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False), InstanceNorm2d(conv_dim), nn.ReLU(inplace=True)]
        dim = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1, bias=False), InstanceNorm2d(dim * 2), nn.ReLU(inplace=True)]
            dim *= 2
        layers += [ResidualBlock(dim) for _ in range(repeat_num)]
        self.bottleneck_index = len(layers) - 1
        if upsample not in ("transpose", "nearest"):
            raise ValueError(f"upsample must be 'transpose' (official) or 'nearest', got {upsample!r}")
        for _ in range(2):
            up = (nn.ConvTranspose2d(dim, dim // 2, 4, 2, 1, bias=False) if upsample == "transpose" else
                  nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim // 2, 3, 1, 1, bias=False)))
            layers += [up, InstanceNorm2d(dim // 2), nn.ReLU(inplace=True)]
            dim //= 2
        layers.append(nn.Conv2d(dim, out_channels, 7, 1, 3, bias=False))
        if tanh:
            layers.append(nn.Tanh())
        self.main = nn.Sequential(*layers)

    @staticmethod
    def _input(x, c):
        c = c.to(x.dtype).view(c.size(0), c.size(1), 1, 1).expand(-1, -1, x.size(2), x.size(3))
        return torch.cat([x, c], dim=1)

    def forward(self, x, c):
        return self.main(self._input(x, c))

    def features(self, x, c):
        """Output of the residual bottleneck ``main[bottleneck_index]``."""
        return self.main[: self.bottleneck_index + 1](self._input(x, c))

    def encoder_features(self, x, c):
        """Output of the down-sampling encoder (before the residual blocks)."""
        return self.main[:9](self._input(x, c))


class StarGANDiscriminator(nn.Module):
    """PatchGAN critic with an auxiliary attribute classifier (StarGAN's D; LeakyReLU 0.01)."""

    def __init__(self, image_size=256, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        if image_size % (2 ** repeat_num):
            raise ValueError(f"image_size {image_size} must be divisible by 2**repeat_num={2 ** repeat_num}")
        layers = [nn.Conv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
        dim = conv_dim
        for _ in range(1, repeat_num):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            dim *= 2
        self.main = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(dim, 1, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(dim, c_dim, image_size // 2 ** repeat_num, bias=False)

    def forward(self, x):
        h = self.main(x)
        return self.conv1(h), self.conv2(h).view(x.size(0), -1)


class Conv2dBlock(nn.Module):
    """AttGAN's conv block: ``layers`` = conv (bias only without norm) [+ norm] [+ activation]."""

    def __init__(self, n_in, n_out, norm="batchnorm", acti="lrelu", transpose=False):
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        layers = [conv(n_in, n_out, 4, 2, 1, bias=norm == "none")]
        if norm == "batchnorm":
            layers.append(nn.BatchNorm2d(n_out))
        elif norm == "instancenorm":
            layers.append(nn.InstanceNorm2d(n_out, affine=True))
        elif norm != "none":
            raise ValueError(f"unknown norm {norm!r}")
        layers.append({"lrelu": nn.LeakyReLU(0.01), "relu": nn.ReLU(), "tanh": nn.Tanh()}[acti])
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class AttGANGenerator(nn.Module):
    """AttGAN's encoder-decoder (He et al., IEEE TIP 2019), names as ``elvisyjlin/AttGAN-PyTorch``.

    Encoder: ``enc_layers`` stride-2 convs (BatchNorm, LeakyReLU) with ``min(enc_dim*2**i, max_dim)``
    channels.  Decoder: the attribute vector tiled at the bottleneck, ``dec_layers`` stride-2
    transposed convs (BatchNorm, ReLU; the last to 3 channels, tanh, no norm); with
    ``shortcut_layers`` the mirrored encoder maps are concatenated after the first decoder layers,
    with ``inject_layers`` the tiled attributes too.
    """

    def __init__(self, enc_dim=64, enc_layers=5, dec_dim=64, dec_layers=5, n_attrs=13, shortcut_layers=1,
                 inject_layers=0, max_dim=1024):
        super().__init__()
        self.shortcut_layers = min(shortcut_layers, dec_layers - 1)
        self.inject_layers = min(inject_layers, dec_layers - 1)
        enc_dims = [min(enc_dim * 2 ** i, max_dim) for i in range(enc_layers)]
        self.enc_layers = nn.ModuleList()
        n_in = 3
        for n_out in enc_dims:
            self.enc_layers.append(Conv2dBlock(n_in, n_out, "batchnorm", "lrelu"))
            n_in = n_out
        self.dec_layers = nn.ModuleList()
        n_in = enc_dims[-1] + n_attrs
        for i in range(dec_layers):
            if i < dec_layers - 1:
                n_out = min(dec_dim * 2 ** (dec_layers - i - 1), max_dim)
                self.dec_layers.append(Conv2dBlock(n_in, n_out, "batchnorm", "relu", transpose=True))
                n_in = n_out
                if self.shortcut_layers > i:
                    n_in += enc_dims[dec_layers - 2 - i]
                if self.inject_layers > i:
                    n_in += n_attrs
            else:
                self.dec_layers.append(Conv2dBlock(n_in, 3, "none", "tanh", transpose=True))

    def encode(self, x):
        zs = []
        for layer in self.enc_layers:
            x = layer(x)
            zs.append(x)
        return zs

    def decode(self, zs, a):
        def tile(h):
            return a.to(h.dtype).view(a.size(0), -1, 1, 1).expand(-1, -1, h.size(2), h.size(3))

        z = torch.cat([zs[-1], tile(zs[-1])], dim=1)
        for i, layer in enumerate(self.dec_layers):
            z = layer(z)
            if self.shortcut_layers > i:
                z = torch.cat([z, zs[len(self.dec_layers) - 2 - i]], dim=1)
            if self.inject_layers > i:
                z = torch.cat([z, tile(z)], dim=1)
        return z

    def forward(self, x, a):
        return self.decode(self.encode(x), a)


class AttGANDiscriminator(nn.Module):
    """AttGAN's critic + attribute classifier: strided convs (InstanceNorm, LeakyReLU) then two
    fully connected heads (``fc_adv`` -> 1, ``fc_cls`` -> n_attrs)."""

    def __init__(self, image_size=256, dim=64, n_layers=5, n_attrs=13, fc_dim=1024, max_dim=1024):
        super().__init__()
        layers, n_in = [], 3
        for i in range(n_layers):
            n_out = min(dim * 2 ** i, max_dim)
            layers.append(Conv2dBlock(n_in, n_out, "instancenorm", "lrelu"))
            n_in = n_out
        self.conv = nn.Sequential(*layers)
        flat = n_in * (image_size // 2 ** n_layers) ** 2
        self.fc_adv = nn.Sequential(nn.Linear(flat, fc_dim), nn.ReLU(), nn.Linear(fc_dim, 1))
        self.fc_cls = nn.Sequential(nn.Linear(flat, fc_dim), nn.ReLU(), nn.Linear(fc_dim, n_attrs))

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return self.fc_adv(h), self.fc_cls(h)


def gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al., NeurIPS 2017): ``mean((||d critic(x_hat)/d x_hat||_2 - 1)^2)``
    on random interpolates; ``critic`` returns the source score (first output of D)."""
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    grad = torch.autograd.grad(out.sum(), x_hat, create_graph=True)[0]
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def classification_loss(logit, target):
    """StarGAN's domain classification loss: BCE with logits summed over attributes, mean over batch."""
    return F.binary_cross_entropy_with_logits(logit, target, reduction="sum") / logit.size(0)


def set_instance_stats(module: nn.Module, flag: bool):
    """Switch every :class:`InstanceNorm2d` of ``module`` between instance and running statistics."""
    for m in module.modules():
        if isinstance(m, InstanceNorm2d):
            m.use_instance_stats = flag
