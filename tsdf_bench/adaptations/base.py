"""The interface of an attacker adaptation: what the forger does against a defense.

Two hooks, both optional:

* :meth:`Adaptation.purify` transforms protected images before they reach the model (JPEG,
  blur, resize ...).  Default: identity.
* :meth:`Adaptation.adapt` changes the model after the attacker collected protected images
  (retraining on the crops its data preparation yields, LoRA patching ...).  Default: the
  model unchanged.  ``retrains`` tells the harness whether rounds after 0 make sense.

``pipeline`` is how the attacker gets faces out of photos in retraining rounds
(:mod:`tsdf_bench.harness.attacker`): ``"detect"`` (its face detector, crop and resize: the
step TSDF poisons) or ``"aligned"`` (the photos are already aligned faces, only resized: the
LoRA Patching setting, where a detector poison cannot help).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


PIPELINES = ("detect", "aligned")


def check_pipeline(pipeline: str, who: str) -> str:
    if pipeline not in PIPELINES:
        raise ConfigError(f"adaptation {who!r}: pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    return pipeline


class Adaptation:
    name: str = ""
    retrains: bool = False
    pipeline: str = "detect"

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def adapt(self, model, crops: torch.Tensor, attrs: torch.Tensor, *, steps: int, seed: int, progress: bool = False):
        """Return the adapted model (a new object; ``model`` itself is left untouched).

        An adaptation that trains against a discriminator may also accept ``discriminator=`` (the
        harness then passes the one the model came with, e.g. the official D); one without that
        keyword never gets it."""
        return model
