"""The interface of an attacker adaptation: what the forger does against a defense.

Two hooks, both optional:

* :meth:`Adaptation.purify` transforms protected images before they reach the model (JPEG,
  blur, resize ...).  Default: identity.
* :meth:`Adaptation.adapt` changes the model after the attacker collected protected images
  (retraining on the crops its data preparation yields, LoRA patching ...).  Default: the
  model unchanged.  ``retrains`` tells the harness whether rounds after 0 make sense.
"""
from __future__ import annotations

import torch


class Adaptation:
    name: str = ""
    retrains: bool = False

    def purify(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def adapt(self, model, crops: torch.Tensor, attrs: torch.Tensor, *, steps: int, seed: int, progress: bool = False):
        """Return the adapted model (a new object; ``model`` itself is left untouched)."""
        return model
