"""The attacker of TSDF's threat model, in one place (see ``docs/threat-model.md``).

After a person posts protected photos, the attacker

1. **collects** them (the run's ``collect`` split, protected by the defense);
2. **prepares** them like a face-editing pipeline does: its detector (``[detectors] attacker``)
   finds a face, the crop (``[detectors] crop``; ``"frame"`` reproduces the framing the models
   were trained on) cuts it, resized to the model's input.  A photo that yields no face drops out:
   this is where poisoning bites.  An adaptation with ``pipeline = "aligned"`` skips detection
   (pre-aligned faces, the LoRA Patching setting): there a detector poison cannot help;
3. **retrains** its current model on the crops it got (the adaptation, ``g_steps`` generator
   updates per round);
4. **forges** other protected photos (the ``eval`` split) through the same preparation: a photo
   the pipeline drops cannot be forged, and is counted (``eval_dropped``), not skipped silently.

Per (model, adaptation, round, seed) the attacker also retrains a **control** model with the same
budget and seed on the *clean* versions of the same collection: shared by every defense, it
separates "retraining on the protected photos removed the protection" from "the model changed".
After a round it forges with the model it prefers (:func:`keeps`): the retrained one unless
retraining broke it or made its forgeries worse.

A collected crop is *usable* (:func:`usable_crops`) when it overlaps the clean photo's crop at
IoU >= 0.5: the attacker got the right face.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TsdfBenchError
from ..hashing import state_sha256
from ..metrics import SUCCESS_THRESHOLD
from ..paths import temp_path
from .data import select_attrs, to_size
from .mapped import new_images
from .provenance import derived_seed
from .state import _cached

CROP_IOU_USABLE = 0.5
# Photos per detection batch of the attacker's preparation: the detector's activations and one
# batch's crops are in memory at a time (the demo's 32 collected photos are one batch).
PREP_BATCH = 64


@dataclass
class Collection:
    """What the attacker's preparation made of a set of photos (one model input size)."""

    crops: torch.Tensor  # [K, 3, s, s] of the kept photos
    attrs: torch.Tensor  # their attribute rows (all data columns)
    kept: list  # indices of the kept photos
    n_photos: int
    usable: list | None = None  # per photo: the crop overlaps the clean crop (collections only)


@dataclass
class Forgeable:
    """The eval photos as the attacker's pipeline gives them: protected crops and clean crops cut
    with the same geometry (so only the perturbation differs), for the photos it kept."""

    protected: torch.Tensor
    clean: torch.Tensor
    kept: list
    n_photos: int


@dataclass
class Retrained:
    """A model after a retraining round, with what the round did."""

    model: object
    hash: str
    info: dict = field(default_factory=dict)
    seconds: float = 0.0


class ModelChangedInPlace(TsdfBenchError):
    """An adaptation modified the model it was given (it must return a new one)."""


def usable_crops(clean, protected, n: int) -> list[bool]:
    """Per photo: the attacker got a crop and it overlaps the clean photo's crop at IoU >= 0.5
    (:func:`tsdf_bench.prep.crop_ious`).  Where the clean photo yields no crop there is no
    reference, and a crop of the protected photo counts as usable."""
    from ..prep import crop_ious

    ious = crop_ious(clean, protected)
    kept = {int(k) for k in protected.kept.tolist()}
    return [(ious[i] >= CROP_IOU_USABLE) if i in ious else (i in kept) for i in range(n)]


class Attacker:
    """The attacker for one run: ``cfg`` (the run config), ``data`` (a callable giving the
    :class:`~tsdf_bench.harness.data.RunData`), ``detector`` (name -> loaded detector), ``device``;
    ``controls_dir``: where retrained controls are saved for other worker processes of the run
    (None: kept in memory only); ``folder``: where crops too large for memory are kept
    (:func:`~tsdf_bench.harness.mapped.new_images`; None: always in memory).  Photos are prepared
    :data:`PREP_BATCH` at a time."""

    def __init__(self, cfg, data, detector, device, progress: bool = False, controls_dir: Path | None = None,
                 folder: Path | None = None):
        self.cfg, self._data, self._detector, self.device, self.progress = cfg, data, detector, device, progress
        self.controls_dir, self.folder = controls_dir, folder
        self._clean: dict = {}
        self._controls: dict = {}

    @property
    def data(self):
        return self._data()

    def detector_name(self, adaptation=None) -> str:
        """The attacker's detector: the adaptation's own (``attacker_detector`` in its table), else
        ``[detectors] attacker``."""
        own = getattr(adaptation, "config_name", None)
        return (self.cfg.adaptations.attacker_detector(own) if own else None) or self.cfg.detectors.attacker

    def prep_key(self, adaptation) -> tuple:
        """What makes two adaptations' preparations of the same photos differ: their input
        transform, the attacker's detector and the pipeline."""
        return _purify_key(adaptation), self.detector_name(adaptation), getattr(adaptation, "pipeline", "detect")

    def preparation(self, size: int, adaptation=None):
        from ..prep import DataPreparation

        return DataPreparation(self._detector(self.detector_name(adaptation)), size, crop=self.cfg.detectors.crop)

    def _new_crops(self, shape) -> torch.Tensor:
        return new_images(shape, self.folder)

    def _prepare(self, photos: torch.Tensor, size: int, adaptation):
        """The preparation of ``photos`` after ``adaptation.purify``, :data:`PREP_BATCH` at a time."""
        return self.preparation(size, adaptation).in_batches(adaptation.purify(photos), PREP_BATCH, self._new_crops)

    # -- 1-2: collect and prepare ------------------------------------------------------------
    def collection(self, photos: torch.Tensor, size: int, adaptation) -> Collection:
        """The attacker's crops of ``photos`` (protected ``collect`` photos) after ``adaptation.purify``.
        With ``adaptation.pipeline == "aligned"`` the photos are taken as aligned faces: resized, all kept."""
        if _aligned(adaptation):
            n = photos.shape[0]
            return Collection(to_size(adaptation.purify(photos), size).float().cpu(), self.data.collect.attrs,
                              list(range(n)), n, [True] * n)
        res = self._prepare(photos, size, adaptation)
        clean = self._clean_prep("collect", size, adaptation)
        return self._collected(res, photos.shape[0], usable_crops(clean, res, photos.shape[0]))

    def clean_collection(self, size: int, adaptation) -> Collection:
        """The same preparation of the clean ``collect`` photos (what the control retrains on)."""
        if _aligned(adaptation):
            return self.collection(self.data.collect.images, size, adaptation)
        return self._collected(self._clean_prep("collect", size, adaptation), self.data.collect.images.shape[0])

    def _collected(self, res, n_photos: int, usable=None) -> Collection:
        """A :class:`Collection` of the collect photos ``res`` (a prep result) kept."""
        kept = res.kept.cpu().long()
        return Collection(res.crops, self.data.collect.attrs[kept], kept.tolist(), n_photos, usable)

    def _clean_prep(self, split: str, size: int, adaptation):
        key = (split, size, *self.prep_key(adaptation))
        if key not in self._clean:
            self._clean[key] = self._prepare(getattr(self.data, split).images, size, adaptation)
        return self._clean[key]

    # -- 4: forge ----------------------------------------------------------------------------
    def forgeable(self, protected_eval: torch.Tensor, size: int, adaptation) -> Forgeable:
        """The protected eval photos through the attacker's pipeline, and the clean photos cut with
        the geometry found on the protected ones (``"aligned"`` pipeline: both resized, all kept)."""
        if _aligned(adaptation):
            n = protected_eval.shape[0]
            return Forgeable(to_size(adaptation.purify(protected_eval), size).float().cpu(),
                             to_size(adaptation.purify(self.data.eval.images), size).float().cpu(), list(range(n)), n)
        prep = self.preparation(size, adaptation)
        res = prep.in_batches(adaptation.purify(protected_eval), PREP_BATCH, self._new_crops)
        clean = prep.crop_like_in_batches(adaptation.purify(self.data.eval.images), res, PREP_BATCH, self._new_crops)
        return Forgeable(res.crops, clean, res.kept.tolist(), protected_eval.shape[0])

    # -- 3: retrain --------------------------------------------------------------------------
    def retrain(self, model, collection: Collection, adaptation, *, seed: int, k: int, discriminator=None) -> Retrained:
        """Round ``k``: ``adaptation.adapt`` a copy of ``model`` on ``collection`` for ``g_steps``.
        The seed depends on (seed, round) only, so the control and every defense train alike."""
        t0 = time.perf_counter()
        before = state_sha256(model.state_dict())
        if collection.crops.shape[0] == 0:
            return Retrained(model, before, {"retrain_images": 0, "model_unchanged": True,
                                             "g_steps": 0, "d_steps": 0}, time.perf_counter() - t0)
        attrs = select_attrs(collection.attrs, self.data.attr_names, model.attributes, f"model {model.name!r}")
        extra = {}
        if discriminator is not None and _takes(adaptation.adapt, "discriminator"):
            # only adaptations that train a GAN objective take the D (retrain); LoRA patching has none
            extra["discriminator"] = discriminator.to(self.device)
        torch.manual_seed(derived_seed(seed, "adapt-torch", k))
        new = adaptation.adapt(model, collection.crops.to(self.device), attrs.to(self.device),
                               steps=self.cfg.adaptations.g_steps, seed=derived_seed(seed, "adapt", k) % (2 ** 31),
                               progress=self.progress, **extra)
        if state_sha256(model.state_dict()) != before:
            raise ModelChangedInPlace(f"adaptation {getattr(adaptation, 'name', adaptation)!r} changed the model in "
                                 "place; adapt() must return a new model and leave its input untouched")
        new = new.to(self.device).eval()
        digest = state_sha256(new.state_dict())
        info = {"retrain_images": collection.crops.shape[0], "model_unchanged": digest == before,
                "g_steps_budget": self.cfg.adaptations.g_steps}
        last = getattr(adaptation, "last_info", None)
        if isinstance(last, dict):
            info.update({k_: last[k_] for k_ in ("g_steps", "d_steps", "n_critic", "lr", "lr_d", "reg_every")
                         if k_ in last})
            if discriminator is None and last.get("discriminator"):  # how the adaptation's own D started
                info["discriminator"] = last["discriminator"]
            info["adaptation_info"] = dict(last)
        return Retrained(new, digest, info, time.perf_counter() - t0)

    def control(self, name: str, adaptation_name: str, adaptation, seed: int, k: int, base, discriminator=None, *,
                base_hash: str):
        """The clean-retraining control of round ``k`` (cached: computed once per (model,
        adaptation, seed, round) and shared by every defense).  ``base`` is the round-0 model,
        ``base_hash`` its weights' digest (it keys the saved controls)."""
        def compute():
            path = None
            if self.controls_dir is not None:
                path = Path(self.controls_dir) / f"{name}-{adaptation_name}-seed{seed}-round{k}-{base_hash[:16]}.pt"
                if path.is_file():  # retrained by another worker of this run
                    return _load_control(path, self.device)
            previous = base if k == 1 else self.control(name, adaptation_name, adaptation, seed, k - 1, base,
                                                        discriminator, base_hash=base_hash).model
            clean = self.clean_collection(base.image_size, adaptation)
            done = self.retrain(previous, clean, adaptation, seed=seed, k=k,
                                discriminator=discriminator if k == 1 else None)
            if path is not None:
                _save_control(path, done)
            return done

        # a failure is cached too and re-raised for every defense that needs this control
        return _cached(self._controls, (name, adaptation_name, seed, k), compute, "the clean-retraining control failed")

    def has_control(self, name: str, adaptation_name: str, seed: int, k: int) -> bool:
        return (name, adaptation_name, seed, k) in self._controls

    def keep_controls_of_seed(self, seed: int) -> None:
        """Drop the other seeds' controls (models and discriminators): every defense of a seed
        shares them, and seeds are the outer loop."""
        for key in [key for key in self._controls if key[2] != seed]:
            del self._controls[key]


def _save_control(path: Path, done: Retrained) -> None:
    """The whole retrained module, not its state into a copy of the base: an adaptation may change
    the architecture (LoRA patching wraps layers in adapters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    torch.save({"model": done.model, "hash": done.hash, "info": done.info}, tmp)  # loaded onto the CPU
    os.replace(tmp, path)  # atomic: another worker sees the whole file or none


def _load_control(path: Path, device) -> Retrained:
    blob = torch.load(path, map_location="cpu", weights_only=False)  # written by this run's workers
    model = blob["model"]
    if state_sha256(model.state_dict()) != blob["hash"]:
        raise TsdfBenchError(f"saved control {path} does not match its hash; delete the run's cache folder and resume")
    return Retrained(model.to(device).eval(), blob["hash"], blob["info"], 0.0)


def keeps(retrained_clean_mse: float | None, sr_retrained: float | None, sr_original: float | None,
          max_drift: float = SUCCESS_THRESHOLD) -> str:
    """The model the attacker forges with after a retraining round: ``"retrained"`` or ``"original"``.

    It keeps the retrained model unless retraining broke it (its clean forgeries drift from the
    original's by an MSE above ``max_drift``, the success threshold) or the protection disrupts
    the retrained model's forgeries more than the original's (a higher SR_mask).  On a tie it keeps
    the retrained model: it retrained on purpose, and goes back only when that made things worse."""
    if (retrained_clean_mse or 0.0) > max_drift:
        return "original"
    return "original" if (sr_original or 0.0) < (sr_retrained or 0.0) else "retrained"


def _aligned(adaptation) -> bool:
    return getattr(adaptation, "pipeline", "detect") == "aligned"


def _purify_key(adaptation, name: str = "") -> str:
    """Adaptations that keep the base identity ``purify`` share one cache entry."""
    from ..adaptations.base import Adaptation

    if type(adaptation).purify is Adaptation.purify:
        return "identity"
    return name or getattr(adaptation, "config_name", None) or type(adaptation).__name__


def _takes(fn, keyword: str) -> bool:
    """Whether callable ``fn`` accepts the keyword argument ``keyword``."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)
