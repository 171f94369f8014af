"""HiSD's building blocks (Li et al., "Image-to-image Translation via Hierarchical Style
Disentanglement", CVPR 2021), re-implemented with the module and parameter names of the official
``imlixinyang/HiSD`` ``core/networks.py`` so that official state_dicts load strictly.

The plugin itself (scales, protocol, training objective) is :mod:`.hisd`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.errors import ConfigError

TAGS = (
    ("Bangs", ("with", "without")),
    ("Eyeglasses", ("with", "without")),
    ("HairColor", ("black", "blond", "brown")),
)
TAG_IRRELEVANT_DIM = 2  # (Male, Young), as the official preprocessor writes them


def _instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """HiSD's instance norm: ``(x - mean) / (unbiased std + eps) * weight + bias`` per channel.

    Differs from ``nn.InstanceNorm2d`` (which divides by ``sqrt(biased var + eps)``);
    ``weight``/``bias`` are ``[N or 1, C, 1]``.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True)
    return ((flat - mean) / (std + eps) * weight + bias).reshape(n, c, h, w)


class InstanceNorm(nn.Module):
    """Affine HiSD instance norm; parameters ``weight``/``bias`` of shape ``[1, C, 1]``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x):
        return _instance_norm(x, self.weight, self.bias, self.eps)


class DownBlock(nn.Module):
    """Residual block, halves the resolution: avgpool(sc(x)) + conv2(act(pool(conv1(act(x))))).

    ``norm=True`` adds HiSD instance norms before each activation (encoder); the extractor and
    the discriminator use none.  Output divided by sqrt(2).
    """

    def __init__(self, cin: int, cout: int, norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        if norm:
            self.in1 = InstanceNorm(cin)
            self.in2 = InstanceNorm(cin)
        self.norm = norm
        self.sc = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    def forward(self, x):
        residual = F.avg_pool2d(self.sc(x), 2)
        h = self.in1(x) if self.norm else x
        h = F.avg_pool2d(self.conv1(F.leaky_relu(h, 0.2)), 2)
        h = self.in2(h) if self.norm else h
        h = self.conv2(F.leaky_relu(h, 0.2))
        return (residual + h) / math.sqrt(2)


class UpBlock(nn.Module):
    """Residual block with HiSD instance norms, doubles the resolution (nearest upsampling, as the
    official code; ``mode="bilinear"`` is a parameter-free demo option)."""

    def __init__(self, cin: int, cout: int, mode: str = "nearest"):
        super().__init__()
        self.mode = mode
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.in1 = InstanceNorm(cin)
        self.in2 = InstanceNorm(cout)
        self.sc = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    def forward(self, x):
        residual = F.interpolate(self.sc(x), scale_factor=2, mode=self.mode)
        h = F.interpolate(F.leaky_relu(self.in1(x), 0.2), scale_factor=2, mode=self.mode)
        h = self.conv2(F.leaky_relu(self.in2(self.conv1(h)), 0.2))
        return (residual + h) / math.sqrt(2)


class MiddleBlock(nn.Module):
    """Residual block with two AdaIN layers whose scale/shift come from a style code."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    @property
    def num_adain_params(self) -> int:
        return 2 * (self.cin + self.cout)

    def forward(self, x, params):
        """``params [N, 2*(cin+cout)]``: (bias1, weight1-1, bias2, weight2-1), official order."""
        c1, c2 = self.cin, self.cout
        b1, w1 = params[:, :c1, None], params[:, c1:2 * c1, None] + 1
        b2, w2 = params[:, 2 * c1:2 * c1 + c2, None], params[:, 2 * c1 + c2:, None] + 1
        h = self.conv1(F.leaky_relu(_instance_norm(x, w1, b1), 0.2))
        h = self.conv2(F.leaky_relu(_instance_norm(h, w2, b2), 0.2))
        return (self.sc(x) + h) / math.sqrt(2)


class LinearBlock(nn.Module):
    """ReLU then Linear (the official mapper block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(F.relu(x))


class Extractors(nn.Module):
    """Style extractor F: one network whose last 1x1 conv gives ``style_dim`` per tag."""

    def __init__(self, channels, style_dim: int, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        self.model = nn.Sequential(
            nn.Conv2d(3, channels[0], 1, 1, 0),
            *[DownBlock(channels[k], channels[k + 1], norm=False) for k in range(len(channels) - 1)],
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels[-1], style_dim * num_tags, 1, 1, 0),
        )

    def forward(self, x, tag: int):
        return self.model(x).view(x.size(0), self.num_tags, -1)[:, tag]


class Translator(nn.Module):
    """Tag-specific translator T_i: AdaIN blocks + attention mask m; ``f*m + e*(1-m)``."""

    def __init__(self, content_dim: int, channels, style_dim: int):
        super().__init__()
        self.model = nn.ModuleList(
            [nn.Conv2d(content_dim, channels[0], 1, 1, 0)]
            + [MiddleBlock(channels[k], channels[k + 1]) for k in range(len(channels) - 1)]
        )
        self.style_to_params = nn.Linear(style_dim, sum(b.num_adain_params for b in self.model[1:]))
        self.features = nn.Sequential(nn.Conv2d(channels[-1], content_dim, 1, 1, 0))
        self.masks = nn.Sequential(nn.Conv2d(channels[-1], content_dim, 1, 1, 0), nn.Sigmoid())

    def forward(self, e, s):
        params = self.style_to_params(s)
        h = self.model[0](e)
        offset = 0
        for block in self.model[1:]:
            n = block.num_adain_params
            h = block(h, params[:, offset:offset + n])
            offset += n
        m = self.masks(h)
        return self.features(h) * m + e * (1 - m)


class Mapper(nn.Module):
    """Tag-specific mapper M_i: noise -> style, a shared trunk and one head per attribute."""

    def __init__(self, noise_dim: int, pre, post, style_dim: int, num_attributes: int):
        super().__init__()
        self.pre_model = nn.Sequential(
            nn.Linear(noise_dim, pre[0]), *[LinearBlock(pre[k], pre[k + 1]) for k in range(len(pre) - 1)]
        )
        self.post_models = nn.ModuleList([
            nn.Sequential(*[LinearBlock(post[k], post[k + 1]) for k in range(len(post) - 1)],
                          nn.Linear(post[-1], style_dim))
            for _ in range(num_attributes)
        ])

    def forward(self, z, attribute: int):
        return self.post_models[attribute](self.pre_model(z))


class HiSDDiscriminator(nn.Module):
    """Multi-task discriminator: shared trunk, one head per tag conditioned on (style, y).

    ``forward(x, s, y, tag) -> [N, 2, num_attributes(tag)]``; row 0 judges translated
    images, row 1 cycle-translated ones (official Eq. 4), one column per attribute.
    """

    def __init__(self, channels, style_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, channels[0], 1, 1, 0),
            *[DownBlock(channels[k], channels[k + 1], norm=False) for k in range(len(channels) - 1)],
            nn.AdaptiveAvgPool2d(1),
        )
        self.fcs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels[-1] + style_dim + TAG_IRRELEVANT_DIM, 2 * len(attrs), 1, 1, 0))
            for _, attrs in TAGS
        ])

    def forward(self, x, s, y, tag: int):
        f = self.conv(x)
        cond = torch.cat([s, y], 1)[:, :, None, None].expand(-1, -1, f.size(2), f.size(3))
        return self.fcs[tag](torch.cat([f, cond], 1)).view(f.size(0), 2, -1)

    def pick(self, x, s, y, tag: int, attribute: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 2]`` (translated, cycle) at each sample's ``attribute`` column."""
        out = self.forward(x, s, y, tag)
        return out.gather(2, attribute.view(-1, 1, 1).expand(-1, 2, 1)).squeeze(2)


def _official_init(module: nn.Module) -> None:
    """The official ``init: kaiming``: Conv*/Linear weights kaiming-normal (fan_in), biases 0.01."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.01)


def _demo_init(model: "HiSD", cfg: dict) -> None:
    """Demo-only initial-weight changes (no-ops for configs without these keys, e.g. ``paper``).

    ``mask_bias_init``: every translator's attention-mask bias, so that ``m = sigmoid(.)`` starts
    near 0 and ``T(e, s) ~= e`` (a translation starts as the reconstruction);
    ``style_init_gain``: scales the last layer of the mappers and of the extractor and the
    translators' ``style_to_params``, so that style codes and AdaIN parameters start small.
    """
    bias = cfg.get("mask_bias_init")
    gain = cfg.get("style_init_gain")
    with torch.no_grad():
        for tr in model.translators:
            if cfg.get("translator_identity_init"):
                _identity_translator(tr)
            if bias is not None:
                tr.masks[0].bias.fill_(float(bias))
            if gain is not None:
                tr.style_to_params.weight.mul_(gain)
                tr.style_to_params.bias.zero_()
        if gain is not None:
            model.extractors.model[-1].weight.mul_(gain)
            for mapper in model.mappers:
                for head in mapper.post_models:
                    head[-1].weight.mul_(gain)


def _identity_translator(tr: "Translator") -> None:
    """Initialise ``tr`` so that its feature branch is the identity: ``features(h) = e`` and so
    ``T(e, s) = e`` for any mask and style (needs translator channels == content channels).

    The 1x1 convs (input, shortcuts, features) become identities (shortcuts x sqrt(2), undoing the
    block's 1/sqrt(2)), the second 3x3 conv of each AdaIN block starts at zero (a residual branch
    that the edit grows from nothing) and the 1x1 convs' biases start at zero.
    """
    def eye(conv, scale=1.0):
        c_out, c_in = conv.weight.shape[:2]
        if c_out != c_in:
            raise ConfigError("HiSD translator_identity_init needs translator channels == content channels")
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(c_out) * scale
        if conv.bias is not None:
            conv.bias.zero_()

    eye(tr.model[0])
    for block in tr.model[1:]:
        eye(block.sc, math.sqrt(2))
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    eye(tr.features[0])


class _FrozenParams:
    """Context: ``requires_grad=False`` on a module's parameters while a graph is built."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _r1(d_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """R1 penalty: mean over the batch of ``|d D(x) / d x|^2`` (official ``compute_grad2``)."""
    (grad,) = torch.autograd.grad(d_out.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
