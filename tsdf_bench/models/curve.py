"""Training curves of the demo generators: how edit strength and sensitivity grow with training.

:func:`train_with_curve` trains a demo model in increments of ``every`` joint steps (each increment
resumes the same seeded run from its ``.train/`` state, so the final weights are those of one
uninterrupted run) and, after each increment, measures one curve point on the **evaluated
persons' held-out photos** (the embedded ``eval`` role, never seen in generator training):

* ``recon_loss``: the model's own reconstruction term (``reconstruction_loss``, weighted as in
  training; StarGAN-family: lambda_rec * |G(x, own attributes) - x|_1) (the face stays recognisable);
* ``change``, ``d_acc_edited`` / ``d_acc_unedited``: :func:`tsdf_bench.models.zoo.edit_report`
  with the trained discriminator's attribute head (how visible the targeted edit is);
* ``pgd_sr_mask`` / ``pgd_l2_mask``: per-image PGD (Ruiz et al.) at eps 0.05, 10 iterations, step
  0.01, all targets, against this model alone, scored with CMUA's masked L2 and its 0.05 threshold
  (the sensitivity a defense can exploit), with its (successes, pairs) count.

Points are appended to ``<model>-seed<seed>.curve.jsonl`` beside the cached model; a point
already there is not measured again, so an interrupted curve resumes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..metrics import SUCCESS_THRESHOLD, edit_mask, l2_mask

PGD_OPTIONS = dict(eps=0.05, iterations=10, step=0.01)


def curve_path(name: str, scale: str = "demo", seed: int = 0) -> Path:
    from .zoo import model_path

    return model_path(name, scale, seed).with_suffix(".curve.jsonl")


def read_curve(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def _recon_loss(model, x, a) -> float | None:
    if not hasattr(model, "reconstruction_loss"):
        return None
    return float(sum(v.float() for v in model.reconstruction_loss(x, a).values()))


def held_out(model, n_eval: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluated persons' held-out views ``(x, attrs)`` prepared for ``model`` (what a curve
    point and the model card measure on)."""
    from ..data.embedded import load_embedded
    from .training import prepare_images
    from .zoo import select_attributes

    held = load_embedded(image_size=128, n_eval=n_eval, seed=seed).eval
    return (prepare_images(held.images, model.image_size),
            select_attributes(held.attrs, held.attr_names, model.attributes))


def sensitivity(model, x: torch.Tensor, a: torch.Tensor, seed: int = 0, batch: int = 8) -> dict:
    """Per-image PGD at eps 0.05 against ``model``: SR_mask, mean L2_mask and the pair count."""
    from ..plugins import get_registry

    pgd = get_registry().create("defense", "pgd", seed=seed, **PGD_OPTIONS)
    pgd.fit(x[:1], {model.name: a[:1]}, [model], [])
    values = []
    for s in range(0, x.shape[0], batch):
        xb, ab = x[s:s + batch], a[s:s + batch]
        prot = pgd.protect(xb, {model.name: ab})
        with torch.no_grad():
            clean, fake = model.generate_all(xb, ab), model.generate_all(prot, ab)
        values.append(l2_mask(fake, clean, edit_mask(clean, xb)).flatten())
    v = torch.cat(values)
    hits = int((v > SUCCESS_THRESHOLD).sum())  # an empty edit mask (NaN) is no success, as in CMUA
    return {"pgd_sr_mask": hits / v.numel(), "pgd_hits": hits, "pgd_pairs": int(v.numel()),
            "pgd_l2_mask": float(torch.nan_to_num(v).mean())}


def measure_point(model, discriminator, x: torch.Tensor, a: torch.Tensor) -> dict:
    from .zoo import edit_report

    model.eval()
    point = {"recon_loss": _recon_loss(model, x, a)}
    if discriminator is not None and getattr(model, "d_attribute_head", True):
        rep = edit_report(model, discriminator, x, a)
        point.update(change=rep["mean_abs_change"], d_acc_edited=rep["cls_acc_edited"],
                     d_acc_unedited=rep["cls_acc_unedited"])
    else:  # a discriminator without an attribute head (HiSD's is tag-conditioned): the edit size only
        with torch.no_grad():
            point["change"] = float((model.generate_all(x, a) - x.unsqueeze(1)).abs().mean())
    point.update(sensitivity(model, x, a))
    return point


def train_with_curve(name: str, steps: int, every: int, *, scale: str = "demo", seed: int = 0, n_eval: int = 24,
                     progress: bool = False, log=print, threads: int | None = 1) -> list[dict]:
    """Train ``name`` to ``steps`` joint steps, measuring a curve point every ``every`` steps."""
    from .checkpoints import load_discriminator
    from .zoo import get_model

    path = curve_path(name, scale, seed)
    done = {p["steps"] for p in read_curve(path)}
    for k in range(every, steps + every, every):
        k = min(k, steps)
        t0 = time.time()
        model = get_model(name, scale=scale, steps=k, seed=seed, progress=progress, grid=k == steps,
                          shipped=False, threads=threads)
        if k in done:
            continue
        train_s = time.time() - t0
        x, a = held_out(model, n_eval, seed)
        point = {"model": name, "steps": k, "seed": seed, "train_s": round(train_s, 1),
                 **measure_point(model, load_discriminator(model, model.weights_file), x, a)}
        with path.open("a") as handle:
            handle.write(json.dumps(point) + "\n")
        log(json.dumps(point))
    return read_curve(path)


def curve_table(points: list[dict]) -> str:
    """A curve as the model card's Markdown table (one row per point)."""
    from tabulate import tabulate

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [[p["steps"], num(p.get("recon_loss"), ".2f"), num(p.get("change"), ".3f"),
             f"{num(p.get('d_acc_edited'), '.2f')} / {num(p.get('d_acc_unedited'), '.2f')}",
             f"{p['pgd_sr_mask']:.2f} ({p['pgd_hits']}/{p['pgd_pairs']})", f"{p['pgd_l2_mask']:.3f}", p.get("train_s")]
            for p in sorted(points, key=lambda p: p["steps"])]
    return tabulate(rows, headers=["joint steps", "recon loss", "mean change", "D acc edited / unedited",
                                   "PGD SR_mask@0 (hits/pairs)", "PGD L2_mask", "train s"], tablefmt="github")
