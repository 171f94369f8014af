"""How many faces can one universal perturbation hide from a face detector?

TSDF's poisoning stage fits **one** perturbation (within eps) that should make the attacker's
detector miss every protected face.  This study isolates that question from the rest of TSDF:
no stage 1, no mask, the whole budget for the poison.  For each number of fitting faces N it
fits a universal perturbation against one detector and reports that detector's recall (the
project's metric: detections above 0.7 matching the clean ones at IoU 0.7) on the N fitting
faces and on held-out faces.  A per-image attack is the N = 1 row.

    .venv/bin/python examples/poison_capacity.py --detector mtcnn --faces 1,4,16
    .venv/bin/python examples/poison_capacity.py --detector retinaface --loss output

Losses: ``output`` is TSDF's eq. 13 as this project implements it
(:func:`tsdf_bench.defenses.detector_losses.output_loss`: every anchor's ``-log(1 - s)`` and its
box, weighted by the clean scores); ``refine`` (MTCNN only) is ``-log(1 - s)`` of the R-Net and
O-Net scores on the face box, the last stages a face must pass.  Adam on the perturbation,
clamped to +-eps after each step.  Faces: the embedded demo faces (``configs/demo.toml``'s data).
Demo scale; one seed.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="mtcnn")
    parser.add_argument("--faces", default="1,4,16", help="comma-separated numbers of fitting faces")
    parser.add_argument("--loss", choices=("output", "refine"), default="refine")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=24)
    args = parser.parse_args(argv)
    if args.loss == "refine" and args.detector != "mtcnn":
        parser.error("--loss refine needs --detector mtcnn (it attacks MTCNN's R-Net and O-Net)")

    from tsdf_bench.data.embedded import load_embedded
    from tsdf_bench.defenses.detector_losses import output_loss, score_penalty
    from tsdf_bench.metrics import detection_scores
    from tsdf_bench.plugins import get_registry

    det = get_registry().create("detector", args.detector).eval()
    counts = [int(n) for n in args.faces.split(",")]
    data = load_embedded(image_size=args.size, seed=0)
    # fit on faces the detector finds when clean (recall is undefined on a face it never saw)
    pool = data.train.images[: 4 * max(counts)]
    with torch.no_grad():
        found = torch.tensor([len(d) > 0 for d in det.detect(pool)])
    train, held = pool[found][: max(counts)], data.eval.images[: args.held_out]

    def recall(x, w):
        return detection_scores(det.detect(x), det.detect((x + w).clamp(-1, 1)))["recall"]

    def loss_of(x, w, clean):
        out = det.forward_attack((x + w).clamp(-1, 1))
        if args.loss == "output":
            return output_loss(out, clean, args.size)
        k = det.refine_per_image  # scores end with R-Net's K, then O-Net's K candidates
        return score_penalty(out.scores[:, -2 * k:]).mean()

    print(f"detector {args.detector}, loss {args.loss}, eps {args.eps}, {args.steps} Adam steps (lr {args.lr}), "
          f"{args.size} px, {held.shape[0]} held-out faces")
    print(f"{'faces':>5}  {'loss first -> last':>20}  {'recall fit':>10}  {'recall held-out':>15}  {'s':>5}")
    rows = []
    for n in counts:
        x = train[:n]
        with torch.no_grad():
            clean = det.forward_attack(x)
        w = torch.zeros(1, 3, args.size, args.size, requires_grad=True)
        opt = torch.optim.Adam([w], lr=args.lr)
        t0, first = time.perf_counter(), None
        for _ in range(args.steps):
            loss = loss_of(x, w, clean)
            first = float(loss.detach()) if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.clamp_(-args.eps, args.eps)
        w = w.detach()
        row = {"faces": n, "loss_first": first, "loss_last": float(loss.detach()), "recall_fit": recall(x, w),
               "recall_held_out": recall(held, w), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{n:>5}  {row['loss_first']:>9.3f} -> {row['loss_last']:<8.3f}  {row['recall_fit']:>10.3f}  "
              f"{row['recall_held_out']:>15.3f}  {row['seconds']:>5.0f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
