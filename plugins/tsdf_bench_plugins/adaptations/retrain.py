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

from tsdf_bench.adaptations.base import Adaptation, check_pipeline
from tsdf_bench.errors import ConfigError


class RetrainAdaptation(Adaptation):
    """Fine-tune a deep copy of the model on the attacker's crops.

    The budget (``adapt(..., steps=g_steps)``) counts **generator updates**; D takes ``n_critic``
    steps per G update.  ``n_critic``, ``lr``, ``lr_d`` and ``reg_every`` default to the recipe the
    model was trained with (``model.train_recipe``, set by the model zoo from the checkpoint's
    manifest: the demo recipes use n_critic 1 and a lazy penalty every 4th D step), else to the
    model's official ``train_defaults`` (n_critic 5, lr 1e-4, penalty every step).

    Args (all optional): ``batch_size`` (16), ``lr`` / ``lr_d`` / ``n_critic`` / ``reg_every``
    (None: as above), ``warmup_d_steps`` (None: ``g_steps // 4``; used only when no discriminator is
    available: the official checkpoints ship G only, so a fresh D is first trained alone, as TSDF
    does for HiSD), ``pipeline`` ("detect": the attacker's detector and crop, TSDF's threat model;
    "aligned": already aligned faces, no detector, the LoRA Patching setting).

    The discriminator is taken from ``adapt(..., discriminator=D)`` (the harness passes the official
    D of ``[models.<name>] discriminator_checkpoint``, or the D the demo model was trained with),
    else from a ``model.discriminator`` attribute, else from an earlier ``adapt`` call that
    produced ``model`` (multi-round retraining continues with its D); otherwise it is built fresh
    and warmed up alone first.  ``last_info["discriminator"]`` says how the chain's D started when
    the caller did not give it: ``"fresh, warm-up N D steps"`` or ``"the model's own"``.
    With no crops at all (the detector was fully poisoned) the attacker has nothing to train
    on: the model is returned unchanged (a copy) and ``last_info["skipped"]`` says why.
    ``last_info`` records ``g_steps`` and ``d_steps`` actually taken, ``n_critic``, ``lr``, ``lr_d``,
    ``reg_every`` and where they came from.

    Example::

        new_model = RetrainAdaptation().adapt(model, crops, attrs, steps=40, seed=0)  # 40 G updates
    """

    name = "retrain"
    retrains = True

    def __init__(self, batch_size: int = 16, lr: float | None = None, lr_d: float | None = None,
                 n_critic: int | None = None, warmup_d_steps: int | None = None, reg_every: int | None = None,
                 pipeline: str = "detect"):
        if int(batch_size) < 1:
            raise ConfigError(f"adaptation 'retrain': batch_size must be >= 1, got {batch_size}")
        for key, value in (("n_critic", n_critic), ("reg_every", reg_every)):
            if value is not None and int(value) < 1:
                raise ConfigError(f"adaptation 'retrain': {key} must be >= 1, got {value}")
        self.pipeline = check_pipeline(pipeline, "retrain")
        self.batch_size = int(batch_size)
        self.lr, self.lr_d, self.n_critic = lr, lr_d, n_critic
        self.warmup_d_steps = warmup_d_steps
        self.reg_every = reg_every
        self.last_info: dict = {}
        self.last_result = None
        self._discriminators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def schedule(self, model) -> dict:
        """``n_critic``, ``lr``, ``lr_d``, ``reg_every`` for ``model`` and their ``schedule_source``."""
        recipe = dict(getattr(model, "train_recipe", None) or {})
        defaults = {"lr_g": 1e-4, "lr_d": 1e-4, "n_critic": 5, **(getattr(model, "train_defaults", None) or {})}
        source = "model recipe" if recipe else "official defaults"
        pick = lambda mine, key, fallback: mine if mine is not None else recipe.get(key, fallback)  # noqa: E731
        return {"n_critic": int(pick(self.n_critic, "n_critic", defaults["n_critic"])),
                "lr": float(pick(self.lr, "lr", defaults["lr_g"])),
                "lr_d": float(pick(self.lr_d, "lr_d", defaults["lr_d"])),
                "reg_every": int(pick(self.reg_every, "reg_every", 1)), "schedule_source": source}

    def adapt(self, model, crops: torch.Tensor, attrs: torch.Tensor, *, steps: int, seed: int,
              progress: bool = False, discriminator=None, checkpoint_dir=None):
        """Return a deep copy of ``model`` fine-tuned for ``steps`` generator updates."""
        from tsdf_bench.models.training import train

        origin = None  # how the chain's D started, when the caller did not give it (the caller records its own)
        if discriminator is None:
            discriminator = getattr(model, "discriminator", None)
            origin = "the model's own" if discriminator is not None else None
        if discriminator is None and model in self._discriminators:
            discriminator, origin = self._discriminators[model]
        new_model = copy.deepcopy(model)
        n = int(crops.shape[0]) if isinstance(crops, torch.Tensor) else 0
        plan = self.schedule(model)
        warmup = self.warmup_d_steps if self.warmup_d_steps is not None else steps // 4
        if discriminator is None:
            origin = f"fresh, warm-up {int(warmup)} D steps"
        described = {"discriminator": origin} if origin is not None else {}
        if n == 0 or steps == 0:
            new_model.eval()
            self.last_result = None
            self.last_info = {"images": n, "g_steps": 0, "d_steps": 0, **plan,
                              **(described if discriminator is not None else {}),
                              "skipped": "no usable crops collected" if n == 0 else "g_steps=0"}
            if discriminator is not None:
                self._discriminators[new_model] = (discriminator, origin)
            return new_model
        result = train(new_model, crops, attrs, int(steps) * plan["n_critic"],
                       discriminator=copy.deepcopy(discriminator) if discriminator is not None else None,
                       batch_size=self.batch_size, lr=plan["lr"], lr_d=plan["lr_d"], n_critic=plan["n_critic"],
                       seed=int(seed), warmup_d_steps=int(warmup), progress=progress,
                       checkpoint_dir=checkpoint_dir, reg_every=plan["reg_every"])
        self._discriminators[result.model] = (result.discriminator, origin)
        self.last_result = result
        parts = [row.get("part") for row in result.history]
        self.last_info = {"images": n, "g_steps": parts.count("g"), "d_steps": parts.count("d"), **plan,
                          "warmup_d_steps": int(warmup) if discriminator is None else 0, **described}
        return result.model


class AlignedRetrainAdaptation(RetrainAdaptation):
    """The detector-free scenario: :class:`RetrainAdaptation` on pre-aligned faces (``pipeline =
    "aligned"``, the LoRA Patching setting): the attacker's collection is not prepared by a face
    detector, so a detector poison cannot starve it.  Same options as ``retrain``."""

    name = "retrain-aligned"

    def __init__(self, batch_size: int = 16, lr: float | None = None, lr_d: float | None = None,
                 n_critic: int | None = None, warmup_d_steps: int | None = None, reg_every: int | None = None):
        super().__init__(batch_size, lr, lr_d, n_critic, warmup_d_steps, reg_every, pipeline="aligned")
