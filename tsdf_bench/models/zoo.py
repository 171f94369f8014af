"""Trained demo models on demand: ``get_model("stargan")`` trains on first use, then loads the cache.

No pretrained generator can be downloaded here, so demo-scale models are trained with their own
objective (:func:`tsdf_bench.models.training.train`) on the embedded face set
(:func:`tsdf_bench.data.embedded.load_embedded`, resized to the model's 64 px) and cached under
``cache_dir("models", scale)`` as ``<name>-seed<seed>.pt`` with a JSON manifest (config, data
hash, steps, seed, package versions, sha256 of the weights).  A cached file is reused only when
its manifest matches the request; an interrupted training resumes from
``<name>-seed<seed>.train/``.

Each model plugin declares its demo schedule as a ``demo_recipe`` class attribute (``steps`` plus
:func:`train` keyword arguments; :data:`DEFAULT_DEMO_RECIPE` for a plugin without one).  Each model keeps its own
objective (WGAN-GP + classification + reconstruction for StarGAN/AttentionGAN/AttGAN; HiSD's
adversarial/style/reconstruction losses) and Adam betas.  Departures, all demo-only, chosen by
measurement to fit about 90 s per model on 2 CPU cores -- a demo, not a reproduction:

* StarGAN and AttGAN: a reconstruction warm-up (``recon_warmup_steps`` at ``recon_lr`` 1e-3): G
  alone as a conditional auto-encoder first, no D (from scratch at n_critic 1, 600 joint WGAN-GP
  steps gave noise), then n_critic 1 and lr 2e-4 (official 5 and 1e-4), so that the attacker's
  retraining takes one D step per generator update (StarGAN at the official n_critic 5 without
  warm-up: as sensitive, blurrier held-out faces; measured in docs/model-card.md).  AttentionGAN keeps the official
  n_critic 5 and lr 1e-4 with no warm-up: after a warm-up its attention mask starts at
  pass-through and the model stays insensitive to eps 0.05 (docs/model-card.md);
* batch 8 (HiSD's lr 2e-4, official 1e-4), and the gradient penalty / R1 only every 4th D step,
  scaled by 4 ("lazy regularisation", ``reg_every``);
* architecture/configuration at demo scale only (see each plugin's docstring): StarGAN and
  AttentionGAN up-sample with nearest + 3x3 conv; AttGAN uses 2 shortcut and 1 inject layers
  and an instance-normalised encoder (the official code's ``--enc_norm instancenorm``; with
  BatchNorm it hardly reacts to eps 0.05: docs/model-card-attgan-sensitivity.md);
  HiSD edits HairColor -> blond (one identity wears glasses), without the ALI real term and
  with mappers at the full lr; its demo recipe differs further (see the HiSD module doc):
  250 warm-up steps of E/G alone at lr 4e-3, Adam betas (0.9, 0.99), then 1,500 joint steps
  (G lr 1e-4, D lr 5e-4) of translator/extractor/mappers with E/G frozen, an identity-initialised
  translator, no cycle path, a content-change L1 (weight 5), a smaller D/extractor and bilinear
  up-sampling in the decoder (nearest rendered translated features as a 4-px checkerboard).

Measured edit strength and sensitivity of the recipes (tables, curves, grids): ``docs/model-card.md``.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..hashing import file_sha256
from ..paths import cache_dir
from . import checkpoints
from .shipped import applies, cpu_name, shipped_path, verify
from .training import StaleTrainingState, data_fingerprint, prepare_images, train

# a model plugin without its own ``demo_recipe`` is trained with this at demo scale
DEFAULT_DEMO_RECIPE = dict(steps=600, batch_size=8)
SMOKE_RECIPE = dict(steps=4, batch_size=4, n_critic=2)
TRAIN_THREADS = 1  # torch threads while training: the weights depend on it (see get_model)
# ``[models.<name>]`` options that get_model takes itself (the rest go to the plugin)
ZOO_OPTIONS = ("seed", "steps", "shipped", "threads")


def recipe_for(name: str, scale: str, steps: int | None = None, registry=None) -> dict:
    """The training schedule ``get_model`` uses for model plugin ``name`` at ``scale``: the
    plugin's ``demo_recipe`` (its class attribute) at demo scale, :data:`SMOKE_RECIPE` at smoke
    scale; ``steps`` overrides."""
    if scale == "paper":
        raise ConfigError("paper-scale models are not trained here; load official weights with "
                          "create('model', name, scale='paper', checkpoint=PATH)")
    own = None
    if scale == "demo":
        from ..plugins import get_registry
        from ..records import resolve_factory

        own = getattr(resolve_factory((registry or get_registry()).get("model", name).factory), "demo_recipe", None)
    recipe = dict(SMOKE_RECIPE if scale == "smoke" else own or DEFAULT_DEMO_RECIPE)
    if steps is not None:
        recipe["steps"] = int(steps)
    return recipe


def recipe_of(model, scale: str, steps: int | None = None) -> dict:
    """The schedule for an already created ``model``: its ``demo_recipe`` at demo scale."""
    if scale == "paper":
        return recipe_for(model.name, scale)
    recipe = dict(SMOKE_RECIPE if scale == "smoke" else getattr(model, "demo_recipe", None) or DEFAULT_DEMO_RECIPE)
    if steps is not None:
        recipe["steps"] = int(steps)
    return recipe


def select_attributes(attrs: torch.Tensor, attr_names, wanted) -> torch.Tensor:
    """Columns of ``attrs`` for the names ``wanted`` (a clear error names the missing ones)."""
    attr_names = list(attr_names)
    missing = [n for n in wanted if n not in attr_names]
    if missing:
        raise ConfigError(f"training data lacks attribute(s) {missing} (it has {attr_names}); "
                          "label them in the data's attribute file")
    return attrs[:, [attr_names.index(n) for n in wanted]].float()


def _unpack(data):
    """``(images, attrs, attr_names)`` from a FaceSet-like object or a 3-tuple."""
    if isinstance(data, (tuple, list)) and len(data) == 3:
        return data
    if all(hasattr(data, a) for a in ("images", "attrs", "attr_names")):
        return data.images, data.attrs, data.attr_names
    raise ConfigError("train_data must have .images [N,3,H,W] in [-1,1], .attrs [N,A] and .attr_names, "
                      "or be a tuple (images, attrs, attr_names)")


def default_data(split: str = "train", image_size: int = 128, seed: int = 0):
    """The embedded demo faces (``split`` "train" or "eval")."""
    from ..data.embedded import load_embedded

    data = load_embedded(image_size=image_size, seed=seed)
    return getattr(data, split)


def model_path(name: str, scale: str, seed: int = 0) -> Path:
    return cache_dir("models", scale) / f"{name}-seed{seed}.pt"


def request(name: str, scale: str, registry, train_data=None, steps: int | None = None, seed: int = 0):
    """What ``get_model`` would train: ``(model, recipe, images, attrs, expect)``, the model freshly
    initialised from ``seed``, the training tensors prepared for it and ``expect`` the manifest
    fields a checkpoint must match (config, data hash, steps, seed, recipe)."""
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(seed)
        model = registry.create("model", name, scale=scale)
    recipe = recipe_of(model, scale, steps)
    images, attrs, attr_names = _unpack(train_data if train_data is not None else default_data())
    images = prepare_images(images, model.image_size)
    attrs = select_attributes(torch.as_tensor(attrs), attr_names, model.attributes)
    expect = {"config": getattr(model, "config", {}), "data_hash": data_fingerprint(images, attrs),
              "steps": recipe["steps"], "seed": seed, "recipe": recipe}
    return model, recipe, images, attrs, expect


def get_model(name: str, scale: str = "demo", registry=None, train_data=None, steps: int | None = None,
              seed: int = 0, progress: bool = True, retrain: bool = False, grid: bool = True, device=None,
              shipped: bool = True, threads: int | None = TRAIN_THREADS):
    """A trained ``name`` model at ``scale`` ("demo" or "smoke"), in eval mode.

    Loads ``cache_dir("models", scale)/<name>-seed<seed>.pt`` when its manifest matches
    (same config, data hash, steps and seed); otherwise trains it on ``train_data`` (default: the
    embedded training faces) with the plugin's ``demo_recipe``, resuming an interrupted run, writes the
    checkpoint, manifest and (``grid=True``) an edit grid PNG beside it.  The trained
    discriminator is kept in the checkpoint (``checkpoints.load_discriminator``).  ``device``: where
    to train (default CPU); the model is returned on the CPU either way, and the manifest records
    the device (a checkpoint trained on either is reused on both: the device is not a cache key).

    Before the cache, a checkpoint the plugin ships (:mod:`tsdf_bench.models.shipped`) is used when
    the request is the shipped one (embedded training faces, the demo recipe, ``seed``) and
    ``shipped`` is true; one that fails its sha256 or was made for other data is refused.
    ``threads``: torch threads while training (default 1: the weights depend on the thread count,
    and the shipped ones were trained with 1; None keeps torch's setting).  The returned model's
    ``weights_file`` is the file it was loaded from or saved to, ``weights_source`` one of
    "shipped", "cached", "trained".
    """
    if registry is None:
        from ..plugins import get_registry

        registry = get_registry()
    model, recipe, images, attrs, expect = request(name, scale, registry, train_data, steps, seed)
    ship = shipped_path(model, seed) if scale == "demo" and shipped and train_data is None and not retrain else None
    if ship is not None and applies(checkpoints.read_manifest(ship), expect):
        verify(ship, name, expect["data_hash"])
        return _loaded(model, ship, recipe, "shipped")
    path = model_path(name, scale, seed)
    if path.is_file() and not retrain:
        manifest = checkpoints.read_manifest(path)
        if all(manifest.get(k) == _jsonish(v) for k, v in expect.items()) and \
                manifest.get("sha256") == file_sha256(path):
            return _loaded(model, path, recipe, "cached")
    kwargs = {k: v for k, v in recipe.items() if k != "steps"}
    train_device = torch.device(device) if device is not None else torch.device("cpu")
    start = time.time()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        result = train(model.to(train_device), images, attrs, recipe["steps"], seed=seed, progress=progress,
                       checkpoint_dir=path.with_suffix(".train"), resume=not retrain, **kwargs)
    except StaleTrainingState as exc:
        # the saved state was made with other settings (an older architecture or recipe): it is
        # recomputed, never resumed into a model that would claim this manifest
        warnings.warn(f"{name}: {exc}; training afresh", stacklevel=2)
        shutil.rmtree(path.with_suffix(".train"), ignore_errors=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = registry.create("model", name, scale=scale)
        result = train(model.to(train_device), images, attrs, recipe["steps"], seed=seed, progress=progress,
                       checkpoint_dir=path.with_suffix(".train"), resume=False, **kwargs)
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(previous_threads)
    model.cpu()
    result.discriminator.cpu()
    expect.update(train_seconds=round(time.time() - start, 1), torch_threads=used_threads, cpu=cpu_name(),
                  train_device=str(train_device),
                  final_losses={k: v for k, v in result.history[-1].items() if k not in ("step", "part")}
                  if result.history else {})
    checkpoints.save_model(model, path, result.discriminator, manifest=expect)
    if grid:
        try:
            held = default_data("eval") if train_data is None else None
            gi, ga, gn = _unpack(held) if held is not None else (images, attrs, model.attributes)
            save_edit_grid(model, prepare_images(gi[:6], model.image_size),
                           select_attributes(torch.as_tensor(ga[:6]), gn, model.attributes),
                           path.with_suffix(".grid.png"))
        except Exception as exc:  # noqa: BLE001 - a figure must never lose a trained model
            warnings.warn(f"could not write the edit grid for {name}: {exc}", stacklevel=2)
    return _loaded(model, path, recipe, "trained", load=False)


def _loaded(model, path: Path, recipe: dict, source: str, load: bool = True):
    """``model`` with the weights of ``path`` (unless ``load`` is false), in eval mode, carrying the
    recipe an attacker fine-tuning it starts from and where its weights came from."""
    if load:
        checkpoints.load_model_checkpoint(model, path)
    model.train_recipe = dict(recipe)
    model.weights_file, model.weights_source = path, source
    model.eval()
    return model


def _jsonish(value):
    import json

    return json.loads(json.dumps(value, default=str))


@torch.no_grad()
def save_edit_grid(model, images: torch.Tensor, attrs: torch.Tensor, path) -> Path:
    """PNG grid: one row per image, columns = input then each protocol target's output."""
    from PIL import Image

    out = model.generate_all(images, attrs).clamp(-1, 1)  # [B, T, 3, H, W]
    rows = torch.cat([images.unsqueeze(1), out], dim=1)  # [B, 1+T, 3, H, W]
    b, t, c, h, w = rows.shape
    pad = 2
    grid = torch.ones(c, b * (h + pad) + pad, t * (w + pad) + pad)
    for i in range(b):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = (rows[i, j] + 1) / 2
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@torch.no_grad()
def edit_report(model, discriminator, images: torch.Tensor, attrs: torch.Tensor, classifier=None) -> dict:
    """How much a model really edits: per target, mean |G(x) - x|, and an attribute classifier's
    accuracy on the targeted attribute for edited vs unedited images.

    The classifier is ``classifier`` (logits over ``model.attributes``, e.g. from
    :func:`tsdf_bench.models.edit_check.train_attribute_classifier`) or, without one, the
    discriminator's auxiliary head (``discriminator(x) -> (source, logits)``).  Only
    single-attribute targets are scored: a model's ``edit_targets(attrs)`` (list of
    ``(target k, attribute i, wanted 0/1 [B])``) when it has one, else the StarGAN family's rule
    (target i -> attribute i; AttGAN target k >= 1 -> attribute k - 1).  ``cls_acc_unedited`` is
    how often the *input* already has the wanted value (the baseline an edit must beat).
    Returns ``{"mean_abs_change", "cls_acc_edited", "cls_acc_unedited", "per_target": [...]}``.
    """
    model.eval()
    judge = classifier
    if judge is None:
        if discriminator is None:
            raise ConfigError("edit_report needs a discriminator with an attribute head or classifier=")
        discriminator.eval()
        judge = lambda z: discriminator(z)[1]  # noqa: E731
    conds = model.conditions(attrs)
    out = model.generate_all(images, attrs)
    if hasattr(model, "edit_targets"):
        targets = model.edit_targets(attrs)
    else:
        offset = len(conds) - len(model.attributes)  # AttGAN: the first target is the reconstruction
        targets = [(k, k - offset, (conds[k][:, k - offset] > 0).float() if offset else conds[k][:, k - offset])
                   for k in range(offset, len(conds))]
    real_logits = judge(images)
    rows = []
    for k, i, target in targets:
        fake = out[:, k]
        logits = judge(fake)
        rows.append({"attribute": model.attributes[i], "mean_abs_change": float((fake - images).abs().mean()),
                     "cls_acc_edited": float(((logits[:, i] > 0).float() == target).float().mean()),
                     "cls_acc_unedited": float(((real_logits[:, i] > 0).float() == target).float().mean())})
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"mean_abs_change": mean("mean_abs_change"), "cls_acc_edited": mean("cls_acc_edited"),
            "cls_acc_unedited": mean("cls_acc_unedited"), "per_target": rows}


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of ``[N,3,H,W]`` images to ``size`` x ``size``."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
