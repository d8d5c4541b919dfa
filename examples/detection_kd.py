"""Detection distillation on a procedurally generated dataset, offline: a small GFL student
trained (a) alone, (b) with Chen et al. 2017 and (c) with Localization Distillation from a
larger GFL teacher, over several seeds; COCO mAP@[.5:.95] and mAP@.5 (pycocotools). (b) and (c)
run twice: with the methods' published weights, and with weights calibrated on the seed's first
batch (``kdkernels.distill.calibrate_weights``: the method's loss set to the GFL task loss); the
table gives each one's paired difference from (a), seed by seed (mean ± sd, seeds better /
worse, Wilcoxon signed-rank p).

The images (deterministic from a seed, no download) hold 1–4 shapes — squares, discs and
triangles (the three classes) of random colour, size 10–36 px and position — on a noisy
background, with their boxes. The teacher (``CompactGFL`` width 16, 64 head channels, two
tower convs) is trained first; every student (width 8, 32 channels, one tower conv) starts
from the same weights for a given seed and sees the same batches.

    python examples/detection_kd.py                  # the default run (3 seeds; minutes per seed)
    python examples/detection_kd.py --synthetic      # a seconds-long smoke run (CI)

Writes ``results.csv``, ``results.md`` and ``map.png`` to ``--out`` (default examples/out/detection_kd).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from _common import paired_cells, paired_differences, spread
from _training import batches
from kdkernels.distill import ChenDetectionKD, Distiller, LocalizationDistillation, calibrate_weights
from kdkernels.distill.detection.gfl_detector import CompactGFL

CLASSES = ("square", "disc", "triangle")


# data ------------------------------------------------------------------------------------
@dataclass
class DetectionSet:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    boxes: list[torch.Tensor]  # (K_i, 4) x1, y1, x2, y2 in pixels
    labels: list[torch.Tensor]  # (K_i,) in [0, 3)


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_shapes(n: int, size: int = 64, seed: int = 0, max_objects: int = 4, min_side: float = 10.0, max_side: float = 36.0) -> DetectionSet:
    """``n`` images of ``size``×``size`` pixels, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, all_boxes, all_labels = [], [], []
    for _ in range(n):
        base = torch.rand(3, 1, 1, generator=g) * 0.4 + 0.1
        coarse = torch.rand(3, size // 8, size // 8, generator=g) * 0.3
        img = base + torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        img = img + 0.05 * torch.randn(3, size, size, generator=g)
        boxes, labels = [], []
        for _ in range(1 + int(torch.randint(max_objects, (), generator=g))):
            for _attempt in range(20):
                w, h = uniform(min_side, max_side), uniform(min_side, max_side)
                cls = int(torch.randint(len(CLASSES), (), generator=g))
                if cls == 1:
                    h = w  # discs are round
                x1, y1 = uniform(0, size - w), uniform(0, size - h)
                box = (x1, y1, x1 + w, y1 + h)
                if all(_iou(box, b) < 0.2 for b in boxes):
                    break
            else:
                continue
            if cls == 0:
                mask = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
            elif cls == 1:
                cx, cy, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, w / 2
                mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            else:  # apex at the top centre, base at the bottom
                cx = (box[0] + box[2]) / 2
                frac = ((ys - box[1]) / h).clamp(0, 1)
                mask = (ys >= box[1]) & (ys <= box[3]) & ((xs - cx).abs() <= frac * w / 2)
            colour = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5 * (torch.rand(3, 1, 1, generator=g) > 0.5)
            img = torch.where(mask, colour, img)
            boxes.append(box)
            labels.append(cls)
        images.append(img.clamp(0, 1))
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    return DetectionSet(torch.stack(images), all_boxes, all_labels)


# metric ----------------------------------------------------------------------------------
def coco_map(predictions: list[dict], boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, float]:
    """COCO-style ``{"map": mAP@[.5:.95], "map50": mAP@.5}`` with pycocotools' COCOeval (bbox,
    up to 100 detections per image). Predictions: per image ``boxes`` (x1, y1, x2, y2),
    ``scores``, ``labels``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, (b, l) in enumerate(zip(boxes, labels)):
        images.append({"id": i})
        for box, label in zip(b.tolist(), l.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label, "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    for i, p in enumerate(predictions):
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            detections.append({"image_id": i, "category_id": int(label), "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    if not detections:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(len(CLASSES))]}
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0)}


# models and training ---------------------------------------------------------------------
def teacher_model() -> CompactGFL:
    return CompactGFL(len(CLASSES), width=16, channels=64, stacked_convs=2)


def student_model() -> CompactGFL:
    return CompactGFL(len(CLASSES), width=8, channels=32, stacked_convs=1)


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


VARIANTS = (("none", False), ("chen", False), ("chen", True), ("ld", False), ("ld", True))  # (method, calibrated)


def variant_name(method: str, calibrated: bool) -> str:
    return f"student {method}" + (" calibrated" if calibrated else "")


def task_loss(model: CompactGFL, outputs, targets, size, method: str, mu: float) -> dict[str, torch.Tensor]:
    """The GFL losses as trained: Chen's L_cls = μ·hard + (1 − μ)·soft has its soft part in the method."""
    losses = model.loss(outputs, targets, size)
    if method == "chen":
        losses["qfl"] = mu * losses["qfl"]
    return losses


def train(model: CompactGFL, data: DetectionSet, steps: int, batch_size: int, lr: float, seed: int,
          method: str = "none", teacher: CompactGFL | None = None, desc: str = "", mu: float = 0.5,
          calibrate: bool = False) -> tuple[list[float], float | None]:
    """Trains ``model`` with its GFL losses, plus Chen's or LD's terms from ``teacher`` (with
    ``calibrate``, their weight set on the first batch so that they start at the task loss).
    Returns the total loss per step and the method's weight."""
    size = tuple(data.images.shape[-2:])
    distiller = None
    if method == "chen":
        chen = ChenDetectionKD(
            "head.cls_out", "head.cls_out", "head.distances", "head.distances", "neck.outputs.0", "neck.outputs.0",
            student_channels=model.head.cls_logits.in_channels, teacher_channels=teacher.head.cls_logits.in_channels,
            mu=mu, sigmoid=True, hard_terms=False, cls_normalizer="positive",
        )
        distiller = Distiller(model, teacher, [chen])
    elif method == "ld":
        distiller = Distiller(model, teacher, [LocalizationDistillation("head.cls_out", "head.reg_out", "head.cls_out", "head.reg_out")])
    order = list(batches(len(data.images), batch_size, steps, seed))
    weight = None
    if distiller is not None:
        if calibrate:
            idx = order[0]
            first = model.assign([data.boxes[i] for i in idx], [data.labels[i] for i in idx], size, vlr=method == "ld")
            calibrate_weights(distiller, data.images[idx], first, verbose=False,
                              task_loss=lambda outputs, targets: sum(task_loss(model, outputs, targets, size, method, mu).values()))
        weight = float(distiller.methods[0].weight)
    params = list(distiller.parameters()) if distiller is not None else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    (distiller or model).train()
    history = []
    for step, idx in enumerate(tqdm(order, total=steps, desc=desc, leave=False, mininterval=2)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x = data.images[idx]
        targets = model.assign([data.boxes[i] for i in idx], [data.labels[i] for i in idx], size, vlr=method == "ld")
        if distiller is None:
            outputs, kd = model(x), {}
        else:
            out = distiller(x, targets)
            outputs, kd = out.student_output, out.losses
        losses = task_loss(model, outputs, targets, size, method, mu)
        total = sum(losses.values()) + sum(kd.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        history.append(float(total.detach()))
    if distiller is not None:
        distiller.remove_hooks()
    return history, weight


def evaluate(model: CompactGFL, data: DetectionSet, batch_size: int = 64) -> dict[str, float]:
    predictions = []
    for start in range(0, len(data.images), batch_size):
        predictions += model.predict(data.images[start : start + batch_size])
    return coco_map(predictions, data.boxes, data.labels)


def run(args) -> list[dict]:
    torch.manual_seed(0)
    train_set = make_shapes(args.train_images, args.image_size, seed=1)
    test_set = make_shapes(args.test_images, args.image_size, seed=2)
    t0 = time.time()
    teacher = teacher_model()
    train(teacher, train_set, args.teacher_steps, args.batch_size, args.lr, seed=0, desc="teacher")
    teacher.eval()
    rows = [{"model": "teacher", "seed": 0, **evaluate(teacher, test_set), "seconds": time.time() - t0}]
    print(f"teacher: mAP {100 * rows[0]['map']:.1f}  mAP50 {100 * rows[0]['map50']:.1f}  ({rows[0]['seconds']:.0f} s)", flush=True)
    for seed in range(args.seeds):
        for method, calibrated in VARIANTS:
            t0 = time.time()
            name = variant_name(method, calibrated)
            torch.manual_seed(1000 + seed)  # the same initial student for every run of a seed
            student = student_model()
            _, weight = train(student, train_set, args.student_steps, args.batch_size, args.lr, seed=100 + seed, method=method,
                              teacher=teacher, desc=f"seed {seed} {name}", calibrate=calibrated)
            row = {"model": name, "seed": seed, **evaluate(student, test_set), "seconds": time.time() - t0, "weight": weight}
            rows.append(row)
            print(f"seed {seed} {name[8:]:>15}: mAP {100 * row['map']:.1f}  mAP50 {100 * row['map50']:.1f}  "
                  f"({row['seconds']:.0f} s{'' if weight is None else f', weight {weight:.3g}'})", flush=True)
    return rows


def paired(rows: list[dict], name: str, key: str = "map") -> dict:
    """``name``'s mAP − the no-KD student's, seed by seed (points): :func:`_common.paired_differences`
    (mean, sd, better / worse, Wilcoxon p)."""
    base = {r["seed"]: 100 * r[key] for r in rows if r["model"] == "student none"}
    return paired_differences([100 * r[key] - base[r["seed"]] for r in rows if r["model"] == name])


def summary(rows: list[dict]) -> str:
    lines = ["| model | runs | mAP@[.5:.95] (mean ± sd) | mAP@.5 (mean ± sd) | Δ mAP vs no KD (paired) | better / worse | p | weight (median) | per seed mAP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        m = [100 * r["map"] for r in rows if r["model"] == name]
        m50 = [100 * r["map50"] for r in rows if r["model"] == name]
        sd = spread
        pair, weight = "– | – | –", "–"
        if name not in ("teacher", "student none"):
            pair = paired_cells(paired(rows, name))
        weights = [r["weight"] for r in rows if r["model"] == name and r.get("weight") is not None]
        if weights:
            weight = f"{statistics.median(weights):.3g}"
        lines.append(f"| {name} | {len(m)} | {statistics.mean(m):.1f} ± {sd(m):.1f} | {statistics.mean(m50):.1f} ± {sd(m50):.1f} | {pair} | {weight} | "
                     f"{', '.join(f'{v:.1f}' for v in m)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in dict.fromkeys(r["model"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "map", "mAP@[.5:.95]"), (axes[1], "map50", "mAP@.5")):
        for i, name in enumerate(names):
            values = [100 * r[key] for r in rows if r["model"] == name]
            ax.bar(i, statistics.mean(values), color="0.8" if name == "teacher" else f"C{i}")
            ax.plot([i] * len(values), values, "k.", ms=6)
        ax.set_xticks(range(len(names)), [n.replace("student ", "").replace(" calibrated", "\ncal.") for n in names])
        ax.set_title(title)
        ax.set_ylabel("%")
    fig.suptitle("GFL student (none / Chen et al. / LD, published and calibrated weights) vs teacher; dots: seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="tiny data and few steps: a smoke run of seconds")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=400)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: kindest to a shared machine)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "detection_kd"))
    args = p.parse_args(argv)
    if args.synthetic:
        args.seeds, args.train_images, args.test_images = 1, 32, 16
        args.teacher_steps, args.student_steps, args.batch_size = 6, 4, 8
    torch.set_num_threads(args.threads)
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "seed", "map", "map50", "seconds", "weight"])
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(args.out, "map.png"))
    print(table)
    print(f"wrote {args.out}/results.csv, results.md, map.png")


if __name__ == "__main__":
    main()
