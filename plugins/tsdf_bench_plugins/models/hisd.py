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
               path: saves an encode, a decode and a D pass per step), ``translation_l1`` 5
               (``|T(e, s_trg) - e|_1`` keeps the content change sparse) and
               ``decoder_upsample="bilinear"`` (the decoder's two up-samplings; parameter-free,
               so official weights still load: with the official nearest, the frozen decoder
               rendered translated 16x16 features as a 4-px checkerboard).  Measured (the
               shipped 1,500-step model, held-out views): reconstruction L1 0.091, per-image PGD
               SR_mask 0.50 (12/24), blurred but recognisable faces, the hair recoloured towards
               a greenish tint rather than a clean blond
               (``docs/model-card.md``).
    ``smoke``  tiny, 32 px, for tests.

Reference: ``reference=`` (or :meth:`HiSD.set_reference`) takes one face with glasses: an
image file (``[models.hisd] reference = "reference_glasses_2.jpg"``, the file CMUA and TSDF use,
from the official repository's ``examples/``; read as the official ``core/test.py`` reads a
reference) or a tensor ``[1, 3, S, S]`` in [-1, 1]; it is resized to the model's size and kept
as a non-persistent buffer (so it never enters the state_dict); a file's path and sha256 are in
``reference_source``.  Without a reference image the protocol's style
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
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tsdf_bench.errors import ConfigError
from tsdf_bench.models.base import SCALES, DeepfakeModel

from ._hisd_blocks import (TAG_IRRELEVANT_DIM, TAGS, DownBlock, Extractors, HiSDDiscriminator,  # noqa: F401
                           InstanceNorm, LinearBlock, Mapper, MiddleBlock, Translator, UpBlock, _demo_init,
                           _FrozenParams, _official_init, _r1)

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
        decoder_upsample="bilinear",  # nearest (official) rendered translated features as 4-px blocks
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
# the plugin
# --------------------------------------------------------------------------------------


class HiSD(DeepfakeModel):
    """HiSD generator (official ``Gen`` layout) as a tsdf-bench deepfake model.

    Args:
        scale: ``"paper"`` (official celeba-hq_256), ``"demo"`` (64 px) or ``"smoke"`` (32 px).
        checkpoint: path to an official ``gen_*.pt`` (uses ``gen_test``, else ``gen``) or a
            bare generator state_dict; loaded strictly with ``weights_only=True``.
        reference: optional reference face for the protocol edit: an image file (the
            protocol's ``reference_glasses_2.jpg``; read as the official test script does) or a
            tensor ``[1, 3, S, S]`` in [-1, 1] (see :meth:`set_reference`).

    Attributes (columns of ``attrs`` for :meth:`losses`, 0/1): Bangs, Eyeglasses, Black_Hair,
    Blond_Hair, Brown_Hair, Male, Young.  HairColor samples need exactly one hair colour set.

    Example::

        m = HiSD("demo"); x = torch.rand(4, 3, 64, 64) * 2 - 1
        out = m.generate(x, m.conditions(torch.zeros(4, 7))[0])   # [4, 3, 64, 64]
    """

    # the demo-scale training schedule (tsdf_bench.models.zoo.get_model; train() keyword arguments
    # plus "steps"); measured in docs/model-card.md
    demo_weights_dir = Path(__file__).with_name("weights")  # shipped demo checkpoints (tsdf_bench.models.shipped)
    demo_recipe = dict(steps=1500, batch_size=8, lr=1e-4, lr_d=5e-4, betas=(0.9, 0.99), recon_warmup_steps=250,
                       recon_lr=4e-3, reg_every=4)

    name = "hisd"
    d_attribute_head = False  # the discriminator judges (image, style, tag); no attribute logits to score edits
    official_checkpoint_keys = ("gen_test", "gen")  # gen_test: the EMA weights the official test uses
    official_checkpoint_file = "gen_00600000.pt of the celeba-hq_256 config"
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

    def __init__(self, scale: str = "demo", checkpoint: str | Path | None = None,
                 reference: torch.Tensor | str | Path | None = None):
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
            *[UpBlock(dec[k], dec[k + 1], cfg.get("decoder_upsample", "nearest")) for k in range(len(dec) - 1)],
            nn.Conv2d(dec[-1], 3, 1, 1, 0)
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
        self.reference_source: dict | None = None  # {"path", "sha256"} of a reference file
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
    def set_reference(self, image: torch.Tensor | str | Path | None) -> None:
        """Use ``image`` as the reference of the protocol edit (style ``F(ref, edit tag)``).

        ``image`` is an image file (``str`` or path; read by :func:`load_reference_image`, its
        path and sha256 kept in ``reference_source``) or a tensor ``[1, 3, H, W]`` / ``[3, H, W]``
        in [-1, 1], resized (bilinear, antialiased) to the model's image size.  ``None`` returns
        to the default latent-guided style.
        """
        if image is None:
            self.reference, self.reference_source = None, None
            return
        source = None
        if isinstance(image, (str, os.PathLike)):
            path = Path(image).expanduser()
            image = load_reference_image(path, self.image_size)
            source = {"path": str(path.resolve()), "sha256": _sha256(path)}
        if not torch.is_tensor(image):
            raise TypeError(f"HiSD reference must be an image path or a torch tensor [1, 3, H, W] in [-1, 1], "
                            f"got {type(image).__name__}")
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
        self.reference_source = source

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
    def official_state_dict(self) -> dict:
        """The official ``Gen`` state_dict (the whole module; the reference is not in it)."""
        return self.state_dict()

    def load_official_state_dict(self, state_dict: dict, strict: bool = True):
        return self.load_state_dict(state_dict, strict=strict)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load an official ``gen_*.pt`` (``gen_test`` = EMA weights, else ``gen``), a bare
        generator state_dict or a tsdf-bench checkpoint, strictly, with the shared loader
        (:func:`tsdf_bench.models.checkpoints.load_model_checkpoint`)."""
        from tsdf_bench.models.checkpoints import load_model_checkpoint

        load_model_checkpoint(self, path)

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

    def discriminator_outputs(self, discriminator: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The discriminator's outputs on ``x`` for every tag, with seeded style codes and
        tag-irrelevant inputs (its forward takes them beside the image); for the shipped float16
        check (:func:`tsdf_bench.models.shipped.d_change`)."""
        g = torch.Generator().manual_seed(0)
        outs = []
        for tag in range(len(TAGS)):
            s = torch.randn(x.shape[0], self.style_dim, generator=g).to(x)
            y = torch.randn(x.shape[0], TAG_IRRELEVANT_DIM, generator=g).to(x)
            outs.append(discriminator(x, s, y, tag))
        return outs

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


def load_reference_image(path: str | Path, image_size: int) -> torch.Tensor:
    """A reference face from an image file as ``[1, 3, S, S]`` in [-1, 1].

    The official ``core/test.py`` reads a reference with ``Resize(new_size)`` (PIL bilinear),
    ``ToTensor`` and ``Normalize(0.5, 0.5)``; for a square file (the shipped
    ``examples/reference_glasses_2.jpg`` is 128x128) this is exactly that.  A non-square file is
    first cropped to its central square (the official code would keep its aspect ratio).
    """
    from tsdf_bench.data._common import crop_resize
    from tsdf_bench.errors import ImageError
    from tsdf_bench.imageio import read_image_pil

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"HiSD reference image {path} does not exist; set [models.hisd] reference to the "
                          "reference face (the protocol's reference_glasses_2.jpg from the official HiSD "
                          "repository's examples/), or remove the option for the latent-guided style")
    try:
        img = read_image_pil(path)
    except ImageError as exc:
        raise ConfigError(f"HiSD reference image {path} cannot be used: {exc}") from None
    return crop_resize(img, None, image_size).unsqueeze(0)


def _sha256(path: Path) -> str:
    from tsdf_bench.hashing import file_sha256

    return file_sha256(path)
