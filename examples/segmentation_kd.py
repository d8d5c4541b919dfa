"""Structured knowledge distillation for semantic segmentation, offline (Liu et al., CVPR 2019).

Data: procedurally generated images of shapes on textured backgrounds; every pixel is labelled
background, disc, square or triangle. A shape's colour is random, so its class comes from its
geometry, not its colour. Models: SegFormer (``transformers`` SegformerForSemanticSegmentation,
built from small configs: plain PyTorch, no hub download). The teacher (0.51 M parameters) is
trained on a large labelled set; the student (0.08 M) on a small one, seven ways, for several
seeds; for a given seed every variant starts from the same initial weights and sees the same
batches:

    no KD            CE only
    pixel            CE + pixel-wise distillation (λ_pi = 10)
    pixel + pair     CE + pixel-wise + pair-wise (λ_pa = 1, on the decoder's fused feature)
    all three        CE + pixel-wise + pair-wise + holistic (λ_d = 0.1, WGAN-GP critic on the score maps)

each KD variant twice: with the official weights (docs/methods.md §5) and "calibrated": the
StructuredKD method's weight (``method.weight``, a factor on all of its parts, so the parts keep
the official ratios) set on the seed's first batch by ``kdkernels.distill.calibrate_weights`` so
that the method's loss starts equal to the task loss (the pixel CE of :class:`SegmentationCE`).
For "all three" the loss calibrated on is λ_pi ℓ_pi + λ_pa ℓ_pa − λ_d E D(Q_s) with the critic D
at its random initialisation; its −λ_d E D(Q_s) is a small number of either sign that says
nothing of the term's later size, so the weight is in effect set by the pixel and pair terms
(the run's ``results.json`` keeps each calibrated loss part). The critic's own WGAN-GP loss is
not rescaled (its scale only sets its step size).

Prints a table of test mIoU: mean ± sd over seeds and, per KD variant, the paired difference
from the same seed's "no KD" student (mean ± sd, seeds better / worse, Wilcoxon signed-rank p),
the weight used (median over seeds) and the per-seed values; writes ``results.json``,
``table.md`` and ``masks.png`` (test images, ground truth, teacher and each student of seed 0)
under ``--out``.

    python examples/segmentation_kd.py                 # the full default run (see examples/results/segmentation_kd/)
    python examples/segmentation_kd.py --synthetic     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_run_flags, json_args, paired_cells, paired_differences, save_figure, spread, write_results
from _training import batches, progress
from kdkernels.distill import AdversarialTrainer, Distiller, Method, StructuredKD, calibrate_weights, generator_parameters

CLASSES = ("background", "disc", "square", "triangle")
SCORES = "decode_head.classifier"  # the (B, C, H/4, W/4) score maps
FEATURE = "decode_head.activation"  # the decoder's fused feature, before the classifier
SEEDS = 8  # the default: the fewest seeds whose two-sided Wilcoxon p can fall below 0.01 (2 / 2⁸)
BASELINE = "no KD"
KD_TERMS = {  # the StructuredKD part weights of each KD variant (official values)
    "pixel": dict(pixel_wise_weight=10.0, pair_wise_weight=0.0, holistic_weight=0.0),
    "pixel + pair": dict(pixel_wise_weight=10.0, pair_wise_weight=1.0, holistic_weight=0.0),
    "all three": dict(pixel_wise_weight=10.0, pair_wise_weight=1.0, holistic_weight=0.1),
}
# name -> (StructuredKD part weights or None, calibrated)
VARIANTS: dict[str, tuple[dict | None, bool]] = {BASELINE: (None, False)}
for _name, _terms in KD_TERMS.items():
    VARIANTS[_name] = (_terms, False)
    VARIANTS[f"{_name} calibrated"] = (_terms, True)


# --- data ---------------------------------------------------------------------------------------


def make_shapes(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, size, size) images in [-1, 1] and (count, size, size) labels."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images = torch.empty(count, 3, size, size)
    labels = torch.zeros(count, size, size, dtype=torch.long)
    for n in range(count):
        # Background: a dim random colour gradient plus blotchy noise; shapes are brighter.
        a, b = 0.35 * u(3, 1, 1), 0.35 * u(3, 1, 1)
        direction = u(1) * 2 * math.pi
        ramp = (torch.cos(direction) * xs + torch.sin(direction) * ys) / size
        blotches = F.interpolate(u(1, 3, size // 8, size // 8), size=(size, size), mode="bilinear", align_corners=False)[0]
        image = a + (b - a) * ramp + 0.2 * (blotches - 0.5)
        label = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(u(1) * 4) + 1):
            kind = int(u(1) * 3) + 1
            r = size * (0.08 + 0.12 * u(1))
            cy, cx = r + (size - 2 * r) * u(1), r + (size - 2 * r) * u(1)
            dy, dx = ys - cy, xs - cx
            if kind == 1:
                mask = dy**2 + dx**2 <= r**2
            elif kind == 2:
                angle = u(1) * math.pi / 2
                ry = torch.cos(angle) * dy - torch.sin(angle) * dx
                rx = torch.sin(angle) * dy + torch.cos(angle) * dx
                mask = (ry.abs() <= r * 0.85) & (rx.abs() <= r * 0.85)
            else:  # an upright equilateral-ish triangle
                mask = (dy <= r * 0.6) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.62)
            colour = 0.45 + 0.55 * u(3, 1, 1)
            image = torch.where(mask, colour + 0.08 * (u(3, size, size) - 0.5), image)
            label[mask] = kind
        images[n] = (image.clamp(0, 1) + 0.05 * torch.randn(3, size, size, generator=g)) * 2 - 1
        labels[n] = label
    return images, labels


# --- models -------------------------------------------------------------------------------------


def segformer(hidden_sizes, depths, decoder_hidden_size, heads) -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=depths, sr_ratios=[4, 2, 1, 1], hidden_sizes=hidden_sizes,
        num_attention_heads=heads, mlp_ratios=[2, 2, 2, 2], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        decoder_hidden_size=decoder_hidden_size, num_labels=len(CLASSES),
    )
    return SegformerForSemanticSegmentation(config)


def make_teacher() -> nn.Module:
    return segformer([16, 32, 64, 128], [2, 2, 2, 2], 64, [1, 1, 2, 2])


def make_student() -> nn.Module:
    return segformer([8, 16, 32, 64], [1, 1, 1, 1], 32, [1, 1, 1, 1])


def upsampled_logits(scores: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)


class SegmentationCE(Method):
    """The task loss: pixel CE of the score maps, upsampled to the labels' size."""

    name = "ce"

    def __init__(self) -> None:
        super().__init__([SCORES], [], weight=1.0)

    def forward(self, student, teacher, target):
        return F.cross_entropy(upsampled_logits(student[0], target.shape[-1]), target)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    out = [upsampled_logits(model(images[i : i + batch]).logits, images.shape[-1]).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out)


def mean_iou(prediction: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of TP / (TP + FP + FN), from the confusion matrix of the whole test set."""
    k = len(CLASSES)
    confusion = torch.bincount(labels.flatten() * k + prediction.flatten(), minlength=k * k).reshape(k, k).double()
    tp = confusion.diag()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp).clamp(min=1)
    return iou.mean().item()


def train_teacher(images, labels, steps: int, batch: int, quiet: bool) -> nn.Module:
    torch.manual_seed(0)
    teacher = make_teacher()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=5e-3, weight_decay=1e-4)
    teacher.train()
    for idx in progress(batches(len(images), batch, steps, seed=0), steps, "teacher", quiet):
        optimizer.zero_grad(set_to_none=True)
        scores = teacher(images[idx]).logits
        F.cross_entropy(upsampled_logits(scores, images.shape[-1]), labels[idx]).backward()
        optimizer.step()
    return teacher.eval()


def task_loss(output, labels: torch.Tensor) -> torch.Tensor:
    """SegmentationCE's loss from the student's output (what ``calibrate_weights`` compares with)."""
    return F.cross_entropy(upsampled_logits(output.logits, labels.shape[-1]), labels)


def train_student(variant: str, teacher, images, labels, steps: int, batch: int, seed: int, map_size: int, quiet: bool) -> tuple[nn.Module, dict | None]:
    """Trains one student; returns it and, for a KD variant, ``{"weight": StructuredKD's weight,
    "calibration": what calibrate_weights measured (None uncalibrated)}``."""
    terms, calibrated = VARIANTS[variant]
    torch.manual_seed(1000 + seed)  # the same initial student for every variant of a seed
    student = make_student()
    methods: list[Method] = [SegmentationCE()]
    kd = None
    if terms is not None:
        depth = max(1, int(math.log2(map_size // 4)))  # the critic's last 4×4 conv sees a 4×4 map
        kd = StructuredKD(SCORES, SCORES, FEATURE, FEATURE, num_classes=len(CLASSES), discriminator_conv_dim=32, discriminator_depth=depth, **terms)
        methods.append(kd)
    distiller = Distiller(student, teacher, methods)
    order = list(batches(len(images), batch, steps, seed=seed))
    info = None
    if kd is not None:
        if calibrated:
            first = order[0]
            calibrate_weights(distiller, images[first], labels[first], task_loss=task_loss, verbose=False)
        info = {"weight": float(kd.weight), "calibration": kd.calibration}
    optimizer = torch.optim.AdamW(generator_parameters(distiller), lr=5e-3, weight_decay=1e-4)
    adversarial = terms is not None and terms["holistic_weight"] > 0
    trainer = AdversarialTrainer(distiller, optimizer) if adversarial else None
    distiller.train()
    for idx in progress(order, steps, f"{variant} (seed {seed})", quiet):
        if trainer is not None:
            trainer.step(images[idx], labels[idx])
        else:
            optimizer.zero_grad(set_to_none=True)
            distiller(images[idx], labels[idx]).total.backward()
            optimizer.step()
    distiller.remove_hooks()
    return student, info


def save_masks(path: Path, images, labels, predictions: dict[str, torch.Tensor], count: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#222222", "#e4572e", "#29335c", "#f3a712"])
    columns = ["image", "ground truth"] + list(predictions)
    fig, axes = plt.subplots(count, len(columns), figsize=(1.6 * len(columns), 1.6 * count), squeeze=False)
    for row in range(count):
        panels = [(images[row].permute(1, 2, 0) + 1) / 2, labels[row]] + [p[row] for p in predictions.values()]
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            if col == 0:
                ax.imshow(panel.clamp(0, 1).numpy())
            else:
                ax.imshow(panel.numpy(), cmap=cmap, vmin=0, vmax=len(CLASSES) - 1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser, seeds=SEEDS, out="examples/out/segmentation_kd")
    parser.add_argument("--size", type=int, default=48, help="image side (score maps are size/4)")
    parser.add_argument("--teacher-images", type=int, default=1000)
    parser.add_argument("--student-images", type=int, default=128, help="the student's small labelled set")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    if args.synthetic:
        args.seeds, args.size, args.teacher_images, args.student_images, args.test_images = 1, 32, 16, 8, 8
        args.teacher_steps, args.student_steps, args.batch = 3, 2, 4
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    teacher_x, teacher_y = make_shapes(args.teacher_images, args.size, seed=1)
    student_x, student_y = make_shapes(args.student_images, args.size, seed=2)
    test_x, test_y = make_shapes(args.test_images, args.size, seed=3)
    teacher = train_teacher(teacher_x, teacher_y, args.teacher_steps, args.batch, args.quiet)
    teacher_pred = predict(teacher, test_x)
    results = {"teacher": mean_iou(teacher_pred, test_y), "teacher_seconds": time.time() - start}
    print(f"teacher: mIoU {100 * results['teacher']:.1f} ({results['teacher_seconds']:.0f} s)", flush=True)
    results.update({key: {v: [] for v in VARIANTS} for key in ("students", "weights", "calibration", "run_seconds")})
    shown = {"teacher": teacher_pred}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            t0 = time.time()
            student, info = train_student(variant, teacher, student_x, student_y, args.student_steps, args.batch, seed, args.size // 4, args.quiet)
            prediction = predict(student, test_x)
            results["students"][variant].append(mean_iou(prediction, test_y))
            results["weights"][variant].append(None if info is None else info["weight"])
            results["calibration"][variant].append(None if info is None else info["calibration"])
            results["run_seconds"][variant].append(time.time() - t0)
            weight = "" if info is None else f", weight {info['weight']:.3g}"
            print(f"seed {seed} {variant}: mIoU {100 * results['students'][variant][-1]:.1f} ({results['run_seconds'][variant][-1]:.0f} s{weight})", flush=True)
            if seed == 0:
                shown[variant] = prediction
    results["paired"] = {v: paired_differences(differences(results["students"], v)) for v in VARIANTS if v != BASELINE}
    results["seconds"] = time.time() - start
    results["args"] = json_args(args)
    write_results(args.out, results, summary(results, args))
    save_masks(args.out / "masks.png", test_x, test_y, shown, count=min(4, len(test_x)))
    return results


def differences(students: dict[str, list[float]], variant: str) -> list[float]:
    """``variant``'s test mIoU − the same seed's no-KD student's, in points."""
    return [100 * (a - b) for a, b in zip(students[variant], students[BASELINE], strict=True)]


def summary(results: dict, args) -> str:
    """The Markdown table: mIoU mean ± sd, the paired Δ from no KD, the weight, per-seed values."""
    rows = [f"| teacher (SegFormer 0.51 M, {args.teacher_images} images) | 1 | {100 * results['teacher']:.1f} | – | – | – | – | {100 * results['teacher']:.1f} |"]
    for variant, scores in results["students"].items():
        points = [100 * s for s in scores]
        pair = "– | – | –" if variant == BASELINE else paired_cells(results["paired"][variant])
        weights = [w for w in results["weights"][variant] if w is not None]
        weight = f"{statistics.median(weights):.3g}" if weights else "–"
        rows.append(f"| student (0.08 M, {args.student_images} images): {variant} | {len(points)} | {statistics.mean(points):.1f} ± {spread(points):.1f} | "
                    f"{pair} | {weight} | {' '.join(f'{v:.1f}' for v in points)} |")
    header = "| model | runs | test mIoU % (mean ± sd) | Δ mIoU vs no KD (paired) | better / worse | p | weight (median) | per seed mIoU |\n|---|---|---|---|---|---|---|---|\n"
    return header + "\n".join(rows)


if __name__ == "__main__":
    main()
