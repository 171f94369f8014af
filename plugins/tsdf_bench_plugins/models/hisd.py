"""HiSD: hierarchical style disentanglement for image-to-image translation.

Li et al., "Image-to-image Translation via Hierarchical Style Disentanglement", CVPR 2021
(official code ``imlixinyang/HiSD``; this is an independent re-implementation whose module
and parameter names match the official ``Gen`` so that its checkpoints load strictly).

The generator has five parts: a shared encoder ``E`` (1x1 conv, then residual down blocks
with HiSD's own instance norm), a shared decoder ``G`` (residual up blocks, then a 1x1 conv to
RGB, **no tanh**), one translator ``T_i`` per *tag* (AdaIN residual blocks whose parameters
come from a style code, plus an attention mask that blends the translated features with the
input features), a style extractor ``F`` (one network, one style slice per tag) and one
mapper ``M_i`` per tag (noise -> style, one head per attribute of the tag).

Tags (celeba-hq config): ``Bangs`` (with/without), ``Eyeglasses`` (with/without),
``HairColor`` (black/blond/brown); tag-irrelevant conditions are (Male, Young) in {-1, +1}.

The CMUA/TSDF protocol uses one edit, adding glasses from a reference face::

    c = E(x); s = F(ref, tag=1); out = G(T_1(c, s))

Scales:
    ``paper``  the official celeba-hq_256 configuration (256 px, 19.04M parameters);
               ``checkpoint`` takes the official ``gen_00600000.pt`` (key ``gen_test``).
    ``demo``   the same module layout at 64 px: encoder 16/32/64, translators of 64 channels
               (2 AdaIN blocks), extractor and discriminator 8/16/32/64/64, style_dim 64,
               noise_dim 16 (CPU training in about 90 s).
               **The demo edit is HairColor -> blond, not Eyeglasses**: in the embedded demo
               data only one identity (Grace Hopper) wears glasses, so "add glasses" cannot be
               learned from it (an earlier Eyeglasses demo run diverged); three hair colours
               over seven identities are the best-supported tag (but only one *training*
               identity is blond).  ``conditions()`` still
               returns one edit, the latent-guided style ``M_2(z, 'blond')`` (or a reference's
               HairColor style), and the demo trains that tag only (``train_tags``).  Also demo
               only: the generator's adversarial loss omits the ALI real term
               ``D(x, F(x))`` (``ali_real_term``): its gradient to the extractor made style
               magnitudes explode in short CPU runs; the fake-image terms are kept; and the
               mappers train at the full lr (``mapper_lr_ratio`` 1, official 0.01), else the
               latent-guided blond style stays at its random initialisation in a short run.
               Further demo-only training aids (config keys; absent = official behaviour):
               ``translator_identity_init`` (the translator's 1x1 convs start as identities and
               each AdaIN block's second conv at zero, so ``T(e, s) = e`` at the start and an
               edit grows from the reconstruction), ``style_init_gain`` 0.1 (mapper/extractor
               output layers and ``style_to_params`` scaled down at init: small styles),
               ``warmup_terms="plain"`` (the warm-up trains E/G as an auto-encoder only),
               ``joint_autoencoder=False`` (after the warm-up E and G are frozen; the joint
               phase trains translator, extractor and mappers), ``cycle=False`` (no cycle
               path: saves an encode, a decode and a D pass per step) and ``translation_l1`` 5
               (``|T(e, s_trg) - e|_1`` keeps the content change sparse).  Measured (demo
               recipe, 1 thread, ~90 s): reconstruction L1 0.093 on held-out views; the blond
               edit changes the top (hair) rows about twice as much as the face centre (0.31
               vs 0.18), but the new hair is a light *bluish* colour with a 4-px block texture,
               not a clean blond (see :mod:`tsdf_bench.models.zoo`).
    ``smoke``  tiny, 32 px, for tests.

Reference: ``reference=`` (or :meth:`HiSD.set_reference`) takes one face with glasses,
``[1, 3, S, S]`` in [-1, 1]; it is resized to the model's size and kept as a non-persistent
buffer (so it never enters the state_dict).  Without a reference image the protocol's style
is HiSD's *latent-guided* style for "Eyeglasses: with": ``M_1(z, 'with')`` with
``z = randn(1, noise_dim)`` from ``torch.Generator().manual_seed(DEFAULT_STYLE_SEED)``
(a noise *image* has no meaningful glasses style, a mapped latent does).

Training (:meth:`HiSD.losses`) follows the official trainer: per step one tag ``i``, source
attribute ``j`` per sample (from its labels) and a random target ``j_trg != j``; hinge
adversarial loss (the official trainer's form) against a multi-task discriminator conditioned on the tag, the style code
(ALI) and the tag-irrelevant conditions, with R1 on real images; style reconstruction
``|F(x_trg) - s_trg|``; image reconstruction (plain, self-translation and cycle); all
weights 1; Adam betas (0, 0.99), lr 1e-4 (mappers 1e-6), gradient-norm clip 100, EMA 0.99.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.errors import CheckpointError, ConfigError
from tsdf_bench.models.base import SCALES, DeepfakeModel

TAGS = (
    ("Bangs", ("with", "without")),
    ("Eyeglasses", ("with", "without")),
    ("HairColor", ("black", "blond", "brown")),
)
TAG_IRRELEVANT_DIM = 2  # (Male, Young), as the official preprocessor writes them
EYEGLASSES = 1  # the protocol's tag
HAIRCOLOR = 2
DEFAULT_STYLE_SEED = 0

_PAPER = dict(
    image_size=256, style_dim=256, noise_dim=32,
    encoder=[64, 128, 256], decoder=[256, 128, 64], translators=[64] * 8,
    extractors=[32, 64, 128, 256, 512, 512, 512], discriminators=[32, 64, 128, 256, 512, 512, 512],
    mappers_pre=[256, 256, 256], mappers_post=[256, 256, 256], train_tags=(0, 1, 2),
    edit=(EYEGLASSES, 0), ali_real_term=True,
)
CONFIGS = {
    "paper": _PAPER,
    "demo": dict(
        image_size=64, style_dim=64, noise_dim=16,
        encoder=[16, 32, 64], decoder=[64, 32, 16], translators=[64] * 3,
        extractors=[8, 16, 32, 64, 64], discriminators=[8, 16, 32, 64, 64],
        mappers_pre=[64, 64, 64], mappers_post=[64, 64, 64], train_tags=(HAIRCOLOR,),
        edit=(HAIRCOLOR, 1), ali_real_term=False, mapper_lr_ratio=1.0,
        # demo-only training aids (see the module doc); absent keys = official behaviour
        translator_identity_init=True, style_init_gain=0.1, warmup_terms="plain",
        joint_autoencoder=False, cycle=False, translation_l1=5.0,
    ),
    "smoke": dict(
        image_size=32, style_dim=16, noise_dim=8,
        encoder=[8, 16, 32], decoder=[32, 16, 8], translators=[16] * 3,
        extractors=[8, 16, 32, 32], discriminators=[8, 16, 32, 32],
        mappers_pre=[16, 16], mappers_post=[16, 16], train_tags=(0, 1, 2),
        edit=(EYEGLASSES, 0), ali_real_term=True,
    ),
}


# --------------------------------------------------------------------------------------
# building blocks (names follow the official module so state_dict keys match)
# --------------------------------------------------------------------------------------
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
    """Residual block with HiSD instance norms, doubles the resolution (nearest upsampling)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.in1 = InstanceNorm(cin)
        self.in2 = InstanceNorm(cout)
        self.sc = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    def forward(self, x):
        residual = F.interpolate(self.sc(x), scale_factor=2, mode="nearest")
        h = F.interpolate(F.leaky_relu(self.in1(x), 0.2), scale_factor=2, mode="nearest")
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


# --------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------
class HiSD(DeepfakeModel):
    """HiSD generator (official ``Gen`` layout) as a tsdf-bench deepfake model.

    Args:
        scale: ``"paper"`` (official celeba-hq_256), ``"demo"`` (64 px) or ``"smoke"`` (32 px).
        checkpoint: path to an official ``gen_*.pt`` (uses ``gen_test``, else ``gen``) or a
            bare generator state_dict; loaded strictly with ``weights_only=True``.
        reference: optional face with glasses ``[1, 3, S, S]`` in [-1, 1] (see module doc).

    Attributes (columns of ``attrs`` for :meth:`losses`, 0/1): Bangs, Eyeglasses, Black_Hair,
    Blond_Hair, Brown_Hair, Male, Young.  HairColor samples need exactly one hair colour set.

    Example::

        m = HiSD("demo"); x = torch.rand(4, 3, 64, 64) * 2 - 1
        out = m.generate(x, m.conditions(torch.zeros(4, 7))[0])   # [4, 3, 64, 64]
    """

    name = "hisd"
    attributes = ("Bangs", "Eyeglasses", "Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
    tags = tuple(t for t, _ in TAGS)
    # optimiser settings of configs/celeba-hq_256.yaml, for the shared trainer
    lr = 1e-4
    mapper_lr_ratio = 0.01  # lr_gen_mappers 1e-6 / lr_gen_others 1e-4
    betas = (0.0, 0.99)
    grad_clip_norm = 100.0  # official; for trainers that clip (the shared trainer does not yet)
    ema_decay = 0.99  # official gen_test = EMA of gen; for trainers that keep an EMA copy
    loss_weights = {"adv": 1.0, "sty": 1.0, "rec": 1.0}
    # read by tsdf_bench.models.training.train: one D and one G update per iteration
    train_defaults = {"lr_g": 1e-4, "lr_d": 1e-4, "betas": (0.0, 0.99), "n_critic": 1}

    def __init__(self, scale: str = "demo", checkpoint: str | Path | None = None, reference: torch.Tensor | None = None):
        if scale not in CONFIGS:
            raise ConfigError(f"HiSD: unknown scale {scale!r}; use one of {', '.join(SCALES)}.")
        cfg = CONFIGS[scale]
        super().__init__(scale, cfg["image_size"])
        self.config = copy.deepcopy(cfg)
        self.style_dim, self.noise_dim = cfg["style_dim"], cfg["noise_dim"]
        self.mapper_lr_ratio = cfg.get("mapper_lr_ratio", type(self).mapper_lr_ratio)
        enc, dec = cfg["encoder"], cfg["decoder"]
        if enc[-1] != dec[0]:
            raise ConfigError("HiSD: encoder's last channel count must equal decoder's first")
        self.encoder = nn.Sequential(
            nn.Conv2d(3, enc[0], 1, 1, 0), *[DownBlock(enc[k], enc[k + 1], norm=True) for k in range(len(enc) - 1)]
        )
        self.decoder = nn.Sequential(
            *[UpBlock(dec[k], dec[k + 1]) for k in range(len(dec) - 1)], nn.Conv2d(dec[-1], 3, 1, 1, 0)
        )
        self.extractors = Extractors(cfg["extractors"], self.style_dim, len(TAGS))
        self.translators = nn.ModuleList([Translator(enc[-1], cfg["translators"], self.style_dim) for _ in TAGS])
        self.mappers = nn.ModuleList([
            Mapper(self.noise_dim, cfg["mappers_pre"], cfg["mappers_post"], self.style_dim, len(attrs))
            for _, attrs in TAGS
        ])
        _official_init(self)
        _demo_init(self, cfg)
        self.register_buffer("reference", None, persistent=False)
        if reference is not None:
            self.set_reference(reference)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    # -- the official Gen interface ---------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Content code E(x) ``[N, C, S/4, S/4]`` (the feature universal attacks use)."""
        return self.encoder(self._check_images(x, "x"))

    def decode(self, e: torch.Tensor) -> torch.Tensor:
        """G(e): images ``[N, 3, S, S]`` (unbounded, no tanh, as in the official model)."""
        return self.decoder(e)

    def extract(self, x: torch.Tensor, tag: int) -> torch.Tensor:
        """F(x, tag): style code ``[N, style_dim]``."""
        return self.extractors(self._check_images(x, "reference"), tag)

    def map(self, z: torch.Tensor, tag: int, attribute: int) -> torch.Tensor:
        """M(z, tag, attribute): style code ``[N, style_dim]`` from noise ``[N, noise_dim]``."""
        return self.mappers[tag](z, attribute)

    def translate(self, e: torch.Tensor, s: torch.Tensor, tag: int) -> torch.Tensor:
        """T_tag(e, s): translated content code, same shape as ``e``."""
        return self.translators[tag](e, s)

    # -- reference ---------------------------------------------------------------------------
    def set_reference(self, image: torch.Tensor | None) -> None:
        """Use ``image`` ``[1, 3, H, W]`` or ``[3, H, W]`` in [-1, 1] as the glasses reference.

        Resized (bilinear, antialiased) to the model's image size.  ``None`` returns to the
        default latent-guided style.
        """
        if image is None:
            self.reference = None
            return
        if not torch.is_tensor(image):
            raise TypeError(f"HiSD reference must be a torch tensor [1, 3, H, W] in [-1, 1], got {type(image).__name__}")
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"HiSD reference must be one RGB image [1, 3, H, W]; got shape {tuple(image.shape)}")
        image = image.detach().float()
        if image.min() < -1.001 or image.max() > 1.001:
            raise ValueError(
                f"HiSD reference must be in [-1, 1] (got [{image.min():.3g}, {image.max():.3g}]); "
                "map [0, 1] images with x * 2 - 1"
            )
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(image, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        device = next(self.parameters()).device
        self.reference = image.to(device)

    @property
    def edit_tag(self) -> int:
        """The tag of the protocol edit: Eyeglasses (paper, smoke) or HairColor (demo, see module doc)."""
        return self.config["edit"][0]

    def reference_style(self) -> torch.Tensor:
        """The protocol's style code ``[1, style_dim]`` ("Eyeglasses: with"; demo: "HairColor: blond")."""
        tag, attribute = self.config["edit"]
        if self.reference is not None:
            return self.extract(self.reference, tag)
        gen = torch.Generator().manual_seed(DEFAULT_STYLE_SEED)
        z = torch.randn(1, self.noise_dim, generator=gen).to(next(self.parameters()).device)
        return self.map(z, tag, attribute)

    # -- DeepfakeModel -------------------------------------------------------------------------
    def conditions(self, attrs: torch.Tensor) -> list[Any]:
        """One condition: the reference's Eyeglasses style, ``[B, style_dim]`` (detached)."""
        with torch.no_grad():
            s = self.reference_style()
        return [s.detach().expand(attrs.shape[0], -1)]

    def edit_targets(self, attrs: torch.Tensor) -> list:
        """What the protocol edit should produce, for :func:`tsdf_bench.models.zoo.edit_report`:
        ``[(0, attribute index, wanted [B])]`` (Eyeglasses on; demo: Blond_Hair on)."""
        tag, attribute = self.config["edit"]
        name = {EYEGLASSES: "Eyeglasses", HAIRCOLOR: ("Black_Hair", "Blond_Hair", "Brown_Hair")[attribute]}[tag]
        return [(0, self.attributes.index(name), torch.ones(attrs.shape[0]))]

    def generate(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``G(T_1(E(x), s))``: add glasses with style ``condition`` ``[B or 1, style_dim]``."""
        if not torch.is_tensor(condition) or condition.dim() != 2 or condition.shape[1] != self.style_dim:
            shape = tuple(condition.shape) if torch.is_tensor(condition) else type(condition).__name__
            raise ValueError(f"HiSD condition must be a style code [B, {self.style_dim}] (from conditions()); got {shape}")
        return self.decode(self.translate(self.encode(x), condition, self.edit_tag))

    def _check_images(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"HiSD {what} must be images [N, 3, H, W]; got shape {tuple(x.shape)}")
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"HiSD {what}: height and width must be multiples of 4; got {tuple(x.shape[-2:])}")
        return x

    # -- checkpoints ---------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> None:
        """Load an official ``gen_*.pt`` (``gen_test`` = EMA weights, else ``gen``) or a state_dict."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"HiSD checkpoint {path} does not exist (official file: gen_00600000.pt)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
            raise CheckpointError(f"HiSD checkpoint {path} could not be read with torch.load(weights_only=True): {exc}") from exc
        self.load_generator_state(obj, source=str(path))

    def load_generator_state(self, obj: Any, source: str = "state_dict") -> None:
        """Strictly load ``obj`` (a checkpoint dict or a bare state_dict); errors name the keys."""
        if isinstance(obj, dict):
            for key in ("gen_test", "gen", "generator", "state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{source}: not a HiSD generator checkpoint (expected key 'gen_test' or 'gen', or a bare "
                f"state_dict of tensors; found {keys})"
            )
        own = self.state_dict()
        missing = [k for k in own if k not in obj]
        unexpected = [k for k in obj if k not in own]
        wrong = [f"{k} {tuple(obj[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in obj and obj[k].shape != v.shape]
        if missing or unexpected or wrong:
            hint = _guess_scale(obj)
            fix = (f"it matches scale={hint!r}: build HiSD(scale={hint!r})" if hint and hint != self.scale else
                   "pass the HiSD generator file gen_XXXXXXXX.pt of the celeba-hq_256 config (scale='paper') "
                   "or a checkpoint trained by tsdf-bench at this scale")
            parts = []
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
                if items:
                    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                    parts.append(f"{label} {len(items)}: {', '.join(items[:5])}{more}")
            raise CheckpointError(f"{source} does not fit HiSD(scale={self.scale!r}): {'; '.join(parts)}. Fix: {fix}.")
        self.load_state_dict(obj, strict=True)

    # -- training ------------------------------------------------------------------------------
    def optimizer_param_groups(self, lr: float | None = None) -> list[dict]:
        """Adam groups as the official trainer: everything at ``lr``, mappers at ``lr/100``."""
        lr = self.lr if lr is None else lr
        others = [p for n, p in self.named_parameters() if not n.startswith("mappers.")]
        return [{"params": others, "lr": lr},
                {"params": list(self.mappers.parameters()), "lr": lr * self.mapper_lr_ratio}]

    def generator_parameters(self):
        """What a single-lr trainer updates: all but the mappers.

        The official lr of the mappers is 1e-6, 100x below the rest; a trainer with one lr
        leaves them fixed (the closest single-lr approximation).  Trainers that support
        parameter groups should use :meth:`optimizer_param_groups` instead.
        """
        return [p for n, p in self.named_parameters() if not n.startswith("mappers.")]

    def make_discriminator(self) -> nn.Module:
        d = HiSDDiscriminator(self.config["discriminators"], self.style_dim)
        _official_init(d)
        return d.to(next(self.parameters()).device)

    def _labels(self, attrs: torch.Tensor, tag: int):
        """Per-sample attribute index for ``tag`` and a mask of samples where it is defined."""
        a = attrs.float() > 0.5
        if tag == 2:  # HairColor: exactly one of black / blond / brown
            hair = a[:, 2:5]
            return hair.float().argmax(1), hair.sum(1) == 1
        return (~a[:, tag]).long(), torch.ones_like(a[:, 0])

    def _sample_task(self, x, attrs, tag=None):
        """Pick a tag (uniform over tags with labelled samples) and random targets j_trg != j."""
        if attrs.dim() != 2 or attrs.shape[1] != len(self.attributes) or attrs.shape[0] != x.shape[0]:
            raise ValueError(f"HiSD attrs must be [B, {len(self.attributes)}] ({', '.join(self.attributes)}); "
                             f"got {tuple(attrs.shape)} for {x.shape[0]} images")
        candidates = [t for t in self.config["train_tags"] if bool(self._labels(attrs, t)[1].any())]
        if tag is None:
            if not candidates:  # only HairColor can be unlabelled
                raise ValueError("HiSD.losses: no sample of this batch is labelled for the trained tags "
                                 f"{[TAGS[t][0] for t in self.config['train_tags']]}")
            tag = candidates[int(torch.randint(len(candidates), ()))]
        elif not bool(self._labels(attrs, tag)[1].any()):
            raise ValueError(f"HiSD.losses: no sample of this batch is labelled for tag {TAGS[tag][0]!r}")
        j, valid = self._labels(attrs, tag)
        x, attrs, j = x[valid], attrs[valid], j[valid].to(x.device)
        n_attr = len(TAGS[tag][1])
        j_trg = (j + torch.randint(1, n_attr, j.shape, device=x.device)) % n_attr
        y = attrs[:, 5:7].float().to(x.device) * 2 - 1  # (Male, Young) in {-1, 1}
        return tag, x, y, j, j_trg

    def _translations(self, x, tag, j_trg):
        """The official generator paths; returns every tensor the two loss parts need."""
        e = self.encode(x)
        s = self.extract(x, tag)
        z = torch.randn(x.shape[0], self.noise_dim, device=x.device)
        s_all = torch.stack([self.map(z, tag, a) for a in range(len(TAGS[tag][1]))], 1)
        s_trg = s_all[torch.arange(x.shape[0], device=x.device), j_trg]
        e_trg = self.translate(e, s_trg, tag)
        x_trg = self.decode(e_trg)
        x_cyc = self.decode(self.translate(self.encode(x_trg), s, tag)) if self.config.get("cycle", True) else None
        return e, e_trg, s, s_trg, x_trg, x_cyc

    def reconstruction_loss(self, x: torch.Tensor, attrs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Demo warm-up term (see :func:`tsdf_bench.models.training.train`): HiSD's plain and
        self-translation reconstructions ``|G(E(x)) - x| + |G(T(E(x), F(x))) - x|`` for the edit tag."""
        e = self.encode(x)
        if self.config.get("warmup_terms", "both") == "plain":  # demo: the auto-encoder alone
            return {"g_rec_id": self.loss_weights["rec"] * F.l1_loss(self.decode(e), x)}
        tag = self.edit_tag
        x_slf = self.decode(self.translate(e, self.extract(x, tag), tag))
        return {"g_rec_id": self.loss_weights["rec"] * (F.l1_loss(self.decode(e), x) + F.l1_loss(x_slf, x))}

    def losses(self, discriminator: nn.Module, x: torch.Tensor, attrs: torch.Tensor, part: str,
               *, tag: int | None = None, reg_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """HiSD's objective for one batch (see module doc); ``part`` ``"d"`` or ``"g"``.

        ``tag`` (0 Bangs, 1 Eyeglasses, 2 HairColor) fixes the step's tag; by default it is
        drawn uniformly, as the official trainer does, from the tags the batch has labels for.
        ``reg_scale`` multiplies the R1 penalty (lazy regularisation; 0 skips it).
        """
        if part not in ("d", "g"):
            raise ValueError(f"HiSD.losses: part must be 'd' or 'g', got {part!r}")
        tag, x, y, j, j_trg = self._sample_task(x, attrs, tag)
        w = self.loss_weights
        if part == "d":
            with torch.no_grad():
                _, _, s, s_trg, x_trg, x_cyc = self._translations(x, tag, j_trg)
            x_real = x.detach().requires_grad_(bool(reg_scale))
            real = discriminator.pick(x_real, s, y, tag, j)
            rows = range(2) if x_cyc is not None else range(1)
            r1 = reg_scale * sum(_r1(real[:, k], x_real) for k in rows) if reg_scale else x.new_zeros(())
            out = {
                "d_adv_real": w["adv"] * sum(F.relu(1 - real[:, k]).mean() for k in rows),
                "d_r1": w["adv"] * r1,
                "d_adv_fake_trg": w["adv"] * F.relu(1 + discriminator.pick(x_trg, s_trg, y, tag, j_trg)[:, 0]).mean(),
            }
            if x_cyc is not None:
                out["d_adv_fake_cyc"] = w["adv"] * F.relu(1 + discriminator.pick(x_cyc, s, y, tag, j)[:, 1]).mean()
            return out
        train_ae = self.config.get("joint_autoencoder", True)
        frozen = [discriminator] if train_ae else [discriminator, self.encoder, self.decoder]
        with contextlib.ExitStack() as stack:
            for module in frozen:
                stack.enter_context(_FrozenParams(module))
            e, e_trg, s, s_trg, x_trg, x_cyc = self._translations(x, tag, j_trg)
            x_slf = self.decode(self.translate(e, s, tag))
            s_trg_rec = self.extract(x_trg, tag)
            if self.config["ali_real_term"]:
                real = discriminator.pick(x, s, y, tag, j)
                adv = real[:, 0].mean() + real[:, 1].mean()
            else:  # demo: no ALI real term (its style gradient made s explode in short runs)
                adv = x.new_zeros(())
            adv = adv - discriminator.pick(x_trg, s_trg.detach(), y, tag, j_trg)[:, 0].mean()
            rec = F.l1_loss(x_slf, x)
            if train_ae:  # demo: E and G stay as the warm-up left them (joint_autoencoder False)
                rec = rec + F.l1_loss(self.decode(e), x)
            if x_cyc is not None:
                adv = adv - discriminator.pick(x_cyc, s.detach(), y, tag, j)[:, 1].mean()
                rec = rec + F.l1_loss(x_cyc, x)
        terms = {
            "g_adv": w["adv"] * adv,
            "g_sty": w["sty"] * F.l1_loss(s_trg_rec, s_trg),
            "g_rec": w["rec"] * rec,
        }
        if self.config.get("translation_l1"):  # demo: keep T(e, s) close to e (a sparse edit)
            terms["g_trans_l1"] = self.config["translation_l1"] * (e_trg - e).abs().mean()
        return terms


def _r1(d_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """R1 penalty: mean over the batch of ``|d D(x) / d x|^2`` (official ``compute_grad2``)."""
    (grad,) = torch.autograd.grad(d_out.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def _guess_scale(state: dict) -> str | None:
    """The scale whose generator layout ``state`` matches exactly, if any."""
    for scale in CONFIGS:
        own = {k: tuple(v.shape) for k, v in HiSD(scale).state_dict().items()}
        if set(own) == set(state) and all(tuple(state[k].shape) == own[k] for k in own):
            return scale
    return None
