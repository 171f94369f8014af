"""Figures written with every run (matplotlib, Agg backend: no display needed).

* ``visual_<model>.png``: per defense, the input, the protected input, the forgery of the clean
  input and the forgery of the protected input (and, after retraining, the retrained model's
  forgery of it): the layout of TSDF's Fig. 5 (Zheng et al., arXiv 2508.07795).
* ``detections.png``: the boxes of every measured detector on a clean and a protected input.
* ``persistence.png``: a metric before (round 0) vs after retraining (last round) per defense
  and model: the layout of TSDF's Fig. 1 bar chart.  It plots ``sr_mask`` when the rows have it,
  else ``ssim_out``, ``l2_mask`` or ``l2``.

The images come from ``<run_dir>/samples`` (saved by the runner for the first seed); the bars
from the run's result rows.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

PERSISTENCE_METRICS = ("sr_mask", "ssim_out", "l2_mask", "l2")
_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _img(t: torch.Tensor):
    """[3, H, W] in [-1, 1] -> H x W x 3 numpy on [0, 1]."""
    return ((t.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _load_samples(samples_dir: Path) -> dict:
    out = {}
    for path in sorted(samples_dir.glob("*.pt")):
        if path.name.startswith("detections__"):
            continue
        blob = torch.load(path, map_location="cpu", weights_only=False)
        c = blob["cell"]
        out[(c["defense"], c["model"], c["adaptation"], c["round"])] = blob
    return out


def _order(names, preferred):
    preferred = [n for n in preferred if n in names]
    return preferred + sorted(n for n in names if n not in preferred)


def visual_grids(samples_dir, out_dir, defenses=(), models=()) -> list[Path]:
    """One ``visual_<model>.png`` per model (see the module docstring)."""
    plt = _plt()
    samples = _load_samples(Path(samples_dir))
    written = []
    all_models = _order({k[1] for k in samples}, models)
    for model in all_models:
        keys = [k for k in samples if k[1] == model]
        rows = _order({k[0] for k in keys}, defenses)
        # the adaptation with the most retraining rounds shows persistence best
        last_round = {a: max(k[3] for k in keys if k[2] == a) for a in sorted({k[2] for k in keys})}
        adaptation = max(last_round, key=lambda a: last_round[a])
        last = last_round[adaptation]
        cols = ["input", "protected", "forgery (clean)", "forgery (protected)"]
        if last > 0:
            cols.append(f"after retraining (round {last})")
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.0 * len(cols), 2.0 * len(rows)), squeeze=False)
        for i, defense in enumerate(rows):
            r0 = samples.get((defense, model, adaptation, 0))
            rl = samples.get((defense, model, adaptation, last)) if last > 0 else None
            images = [None] * len(cols)
            if r0 is not None:
                images[:4] = [r0["clean"][0], r0["protected"][0], r0["fake_clean"][0], r0["fake_protected"][0]]
            if rl is not None:
                images[4] = rl["fake_protected"][0]
            for j, im in enumerate(images):
                ax = axes[i][j]
                ax.set_xticks([])
                ax.set_yticks([])
                if im is not None:
                    ax.imshow(_img(im))
                else:
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                if i == 0:
                    ax.set_title(cols[j], fontsize=8)
                if j == 0:
                    ax.set_ylabel(defense, fontsize=9)
        fig.suptitle(f"{model}: forgeries of clean vs protected inputs (attacker: {adaptation})", fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / f"visual_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def detection_figure(samples_dir, out_dir, defenses=()) -> Path | None:
    """``detections.png``: boxes of every detector on one clean and one protected input per defense."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    blobs = {p.name[len("detections__"):-3]: torch.load(p, map_location="cpu", weights_only=False)
             for p in sorted(Path(samples_dir).glob("detections__*.pt"))}
    if not blobs:
        return None
    rows = _order(set(blobs), defenses)
    detectors = sorted({d for b in blobs.values() for d in b["boxes"]})
    colour = {d: _COLOURS[i % len(_COLOURS)] for i, d in enumerate(detectors)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.0, 2.5 * len(rows)), squeeze=False)
    for i, defense in enumerate(rows):
        blob = blobs[defense]
        for j, which in enumerate(("clean", "protected")):
            ax = axes[i][j]
            ax.imshow(_img(blob[which][0]))
            ax.set_xticks([])
            ax.set_yticks([])
            for det, boxes in blob["boxes"].items():
                for box, score in zip(boxes[which], boxes[f"{which}_scores"]):
                    x1, y1, x2, y2 = (float(v) for v in box[:4])
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour[det]))
                    ax.text(x1, y1, f"{det} {float(score):.2f}", color=colour[det], fontsize=5, va="bottom")
            if i == 0:
                ax.set_title(f"{which} input", fontsize=9)
            if j == 0:
                ax.set_ylabel(defense, fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, fill=False, ec=colour[d], label=d) for d in detectors]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7)
    fig.suptitle("face detections on clean vs protected inputs", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(out_dir) / "detections.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def persistence_values(rows: list[dict], metric: str | None = None):
    """``(metric, {(defense, model): (before, after)})`` averaged over seeds, ok rows of retraining chains."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if metric is None:
        metric = next((m for m in PERSISTENCE_METRICS if any(r.get(m) is not None for r in ok)), None)
    if metric is None:
        return None, {}
    last = defaultdict(int)
    for r in ok:
        key = (r["defense"], r["model"], r["adaptation"])
        last[key] = max(last[key], r["round"])
    acc = defaultdict(lambda: ([], []))
    for r in ok:
        key = (r["defense"], r["model"], r["adaptation"])
        value = r.get(metric)
        if last[key] == 0 or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if r["round"] == 0:
            acc[(r["defense"], r["model"])][0].append(float(value))
        elif r["round"] == last[key]:
            acc[(r["defense"], r["model"])][1].append(float(value))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return metric, {k: (mean(b), mean(a)) for k, (b, a) in acc.items()}


def persistence_figure(rows: list[dict], out_dir, metric: str | None = None, defenses=(), models=()) -> Path | None:
    """``persistence.png``: before vs after retraining per defense, one panel per model."""
    plt = _plt()
    metric, values = persistence_values(rows, metric)
    if not values:
        return None
    model_names = _order({m for _, m in values}, models)
    defense_names = _order({d for d, _ in values}, defenses)
    panel_width = max(3.5, 0.5 * len(defense_names) + 1.5)
    fig, axes = plt.subplots(1, len(model_names), figsize=(panel_width * len(model_names), 3.2), squeeze=False)
    width = 0.38
    for ax, model in zip(axes[0], model_names):
        xs = list(range(len(defense_names)))
        before = [values.get((d, model), (float("nan"),) * 2)[0] for d in defense_names]
        after = [values.get((d, model), (float("nan"),) * 2)[1] for d in defense_names]
        ax.bar([x - width / 2 for x in xs], before, width, label="before retraining", color="#4363d8")
        ax.bar([x + width / 2 for x in xs], after, width, label="after retraining", color="#f58231")
        ax.set_xticks(xs)
        ax.set_xticklabels(defense_names, rotation=45, ha="right", fontsize=7)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(f"persistence: {metric} before vs after the attacker retrains", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(out_dir) / "persistence.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def transfer_heatmaps(rows: list[dict], out_dir) -> list[Path]:
    """One heat map per (defense, adaptation) of PDB's normalised TE matrix (rows: fitted on,
    columns: measured on); none without ``[transfer]`` rows."""
    from ..leaderboard.field import transferability

    _, matrices = transferability(rows)
    written = []
    for (defense, adaptation), matrix in matrices.items():
        sources = sorted({s for s, _ in matrix}, key=str)
        targets = sorted({t for _, t in matrix}, key=str)
        values = [[matrix.get((s, t)) for t in targets] for s in sources]
        plt = _plt()
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(targets), 1.0 + 0.8 * len(sources)))
        grid = [[math.nan if v is None else v for v in line] for line in values]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(targets)), [str(t) for t in targets], rotation=30, ha="right")
        ax.set_yticks(range(len(sources)), [str(s) for s in sources])
        for i, line in enumerate(values):
            for j, v in enumerate(line):
                ax.text(j, i, "—" if v is None else f"{v:.2f}", ha="center", va="center",
                        color="white" if v is not None and v < 0.5 else "black", fontsize=8)
        ax.set_xlabel("measured on")
        ax.set_ylabel("fitted on")
        ax.set_title(f"TE pair scores: {defense} ({adaptation})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = Path(out_dir) / f"transfer_{defense}_{adaptation}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def make_figures(run_dir, rows: list[dict], out_dir=None, defenses=(), models=()) -> list[Path]:
    """Write every figure of a run; returns the paths written (missing inputs skip a figure)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "figures")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = list(visual_grids(run_dir / "samples", out_dir, defenses, models))
    for path in (detection_figure(run_dir / "samples", out_dir, defenses),
                 persistence_figure(rows, out_dir, None, defenses, models)):
        if path is not None:
            written.append(path)
    written += transfer_heatmaps(rows, out_dir)
    return written
