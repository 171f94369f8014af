"""Retraining on collected protected images: TSDF's threat model (Zheng et al., the seed paper).

The attacker scrapes protected photos, runs its data preparation (detect, crop, align) and
fine-tunes the forgery model on the crops it gets, with the model's own GAN objective
(:func:`tsdf_bench.models.training.train`).  A defense *persists* when the retrained model's
forgeries of protected images are still broken; TSDF's point is that perturbations of the
generator alone fade after such retraining, while poisoning the detectors starves it of data.
"""
from __future__ import annotations

import copy
import weakref

import torch

from tsdf_bench.adaptations.base import Adaptation
from tsdf_bench.errors import ConfigError


class RetrainAdaptation(Adaptation):
    """Fine-tune a deep copy of the model on the attacker's crops.

    Args (all optional): ``batch_size`` (16), ``lr`` / ``lr_d`` (None: the model's
    ``train_defaults``, else 1e-4), ``n_critic`` (None: model default), ``warmup_d_steps``
    (None: ``steps // 4``; used only when no discriminator is available: the official
    checkpoints ship G only, so a fresh D is first trained alone, as TSDF does for HiSD),
    ``reg_every`` (None: the interval the model was trained with -- a demo-scale model's
    recipe in :data:`tsdf_bench.models.zoo.DEMO_RECIPES`, lazy regularisation every 4th D step;
    1, the official every-step penalty, for every other scale).

    The discriminator is taken from ``adapt(..., discriminator=D)``, else from a
    ``model.discriminator`` attribute, else from an earlier ``adapt`` call that produced
    ``model`` (multi-round retraining continues with its D); otherwise it is built fresh.
    With no crops at all (the detector was fully poisoned) the attacker has nothing to train
    on: the model is returned unchanged (a copy) and ``last_info["skipped"]`` says why.

    Example::

        new_model = RetrainAdaptation().adapt(model, crops, attrs, steps=200, seed=0)
    """

    name = "retrain"
    retrains = True

    def __init__(self, batch_size: int = 16, lr: float | None = None, lr_d: float | None = None,
                 n_critic: int | None = None, warmup_d_steps: int | None = None, reg_every: int | None = None):
        if int(batch_size) < 1:
            raise ConfigError(f"adaptation 'retrain': batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.lr, self.lr_d, self.n_critic = lr, lr_d, n_critic
        self.warmup_d_steps = warmup_d_steps
        if reg_every is not None and int(reg_every) < 1:
            raise ConfigError(f"adaptation 'retrain': reg_every must be >= 1, got {reg_every}")
        self.reg_every = reg_every
        self.last_info: dict = {}
        self.last_result = None
        self._discriminators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def adapt(self, model, crops: torch.Tensor, attrs: torch.Tensor, *, steps: int, seed: int,
              progress: bool = False, discriminator=None, checkpoint_dir=None):
        """Return a fine-tuned deep copy of ``model`` (``model`` itself is left untouched)."""
        from tsdf_bench.models.training import train

        if discriminator is None:
            discriminator = getattr(model, "discriminator", None)
        if discriminator is None:
            discriminator = self._discriminators.get(model)
        new_model = copy.deepcopy(model)
        n = int(crops.shape[0]) if isinstance(crops, torch.Tensor) else 0
        if n == 0 or steps == 0:
            new_model.eval()
            self.last_result = None
            self.last_info = {"images": n, "steps": 0,
                              "skipped": "no usable crops collected" if n == 0 else "steps=0"}
            if discriminator is not None:
                self._discriminators[new_model] = discriminator
            return new_model
        warmup = self.warmup_d_steps if self.warmup_d_steps is not None else steps // 4
        reg_every = self._reg_every(model)
        result = train(new_model, crops, attrs, int(steps),
                       discriminator=copy.deepcopy(discriminator) if discriminator is not None else None,
                       batch_size=self.batch_size, lr=self.lr, lr_d=self.lr_d, n_critic=self.n_critic,
                       seed=int(seed), warmup_d_steps=int(warmup), progress=progress,
                       checkpoint_dir=checkpoint_dir, reg_every=reg_every)
        self._discriminators[result.model] = result.discriminator
        self.last_result = result
        self.last_info = {"images": n, "steps": result.steps, "reg_every": reg_every,
                          "warmup_d_steps": int(warmup) if discriminator is None else 0}
        return result.model

    def _reg_every(self, model) -> int:
        """The gradient-penalty interval: as configured, else the one the model was trained with."""
        if self.reg_every is not None:
            return int(self.reg_every)
        if getattr(model, "scale", None) != "demo":
            return 1
        from tsdf_bench.models.zoo import recipe_of

        return int(recipe_of(model, "demo").get("reg_every", 1))
