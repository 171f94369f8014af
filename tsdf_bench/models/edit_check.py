"""An independent attribute classifier, to check that a trained demo model really edits.

A generator's own discriminator is a biased judge of its edits (the generator was trained to fool
exactly that classifier, possibly with invisible adversarial changes), and HiSD's discriminator
is no classifier at all.  :func:`train_attribute_classifier` fits a small CNN on *real* images
and their labels in a few seconds; :func:`tsdf_bench.models.zoo.edit_report` can score edits
with it (``classifier=``).  On the 10-identity demo data it partly recognises identities rather
than attributes, so its accuracy on edits is a sanity check, not a research metric.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class AttributeClassifier(nn.Module):
    """Four stride-2 conv blocks (BatchNorm, LeakyReLU), global average pool, linear -> one logit per attribute."""

    def __init__(self, n_attrs: int, width: int = 16):
        super().__init__()
        layers, c = [], 3
        for k in range(4):
            layers += [nn.Conv2d(c, width * 2 ** k, 4, 2, 1), nn.BatchNorm2d(width * 2 ** k), nn.LeakyReLU(0.2)]
            c = width * 2 ** k
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_attrs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_attribute_classifier(images: torch.Tensor, attrs: torch.Tensor, steps: int = 150, batch_size: int = 32,
                               lr: float = 2e-3, seed: int = 0) -> AttributeClassifier:
    """A classifier of ``attrs`` ``[N, A]`` (0/1) from ``images`` ``[N, 3, H, W]`` in [-1, 1], in eval mode.

    Trained with BCE and Adam on random horizontal flips plus small colour-preserving noise, so
    it judges colour and shape rather than exact pixels.  About 5 s for 150 steps at 64 px on one core.
    """
    if images.dim() != 4 or images.shape[1] != 3 or attrs.dim() != 2 or attrs.shape[0] != images.shape[0]:
        raise ConfigError(f"train_attribute_classifier needs images [N, 3, H, W] and attrs [N, A]; got "
                          f"{tuple(images.shape)} and {tuple(attrs.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = AttributeClassifier(attrs.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    images, attrs = images.detach().float(), attrs.detach().float()
    clf.train()
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        loss = F.binary_cross_entropy_with_logits(clf(x), attrs[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval()
