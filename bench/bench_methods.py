"""What each distillation method gives a weak student on real data, offline: scikit-learn's digits.

The study (issue 19): a small CNN student (4/8/16 channels, 16×16 inputs: the 8×8 digits
upsampled) is trained on 10 labelled images per class, plus 150 unlabelled training images that
only the distillation terms use (label -100, ignored by every cross-entropy), with every method and
scheme of ``kdkernels.distill`` — with the published default weights and with calibrated weights
(``calibrate_weights``: each method's initial loss set equal to the CE) — and compared, seed by
seed, with the same student (same images, same initial weights) trained on the CE alone. The
teacher (8/16/32 channels) is trained once per seed on the whole labelled training split. Per method:
the mean paired difference in test accuracy, the seeds better / worse, a Wilcoxon signed-rank
test, and the method's weighted loss over the CE at the first step.

FitNets has two rows: RepDistiller's one stage (CE + 100 × hint) and the paper's two stages (the
hint alone on the student's first stages, then Hinton KD; see ``run_fitnets_two_stage``), the
second also compared with Hinton KD alone; both guide the student's last stage through
RepDistiller's regressor (``--hint-layer``, ``--hint-regressor``; chosen on validation seeds).
Born-again also reports the paper's final model, the ensemble of generations 0 and 1, next to a
control that averages two CE students (``--born-again-init``: generation 1's initial weights);
BYOT's heads go where ``--byot-heads`` says and are what ``--byot-head`` says. Both were chosen
on validation seeds too
(``bench/results/{born_again,byot}_validation/``).

    python bench/bench_methods.py                     # the full study (20 seeds; ~17 min on one thread)
    python bench/bench_methods.py --quick             # a smoke run (CI: tests/test_bench_methods_quick.py)
    python bench/bench_methods.py --methods fitnets,fitnets_two_stage --update
                                                      # rerun some rows of the stored study
    python bench/bench_methods.py --methods fitnets --first-seed 100 --seeds 10 --split validation --out /tmp/val
                                                      # choose a variant away from the study's seeds and test images

Writes ``<out>/methods_digits.{json,md,png}`` (default ``--out bench/results``). ``--update`` keeps
the other rows of ``<out>/methods_digits.json`` and refuses unless this run reproduces its teacher
and CE accuracies exactly, seed by seed (the training is deterministic on one thread with the same
code; a change of a loss's kernel can still change that method's rows, so rerun them all then).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import (
    BYOT,
    BornAgainEnsemble,
    FSP,
    OFD,
    RKD,
    AttentionTransfer,
    CrossEntropy,
    Distiller,
    FeatureSpec,
    FitNets,
    HintonKD,
    MutualLearning,
    SimilarityPreserving,
)
from kdkernels.distill.calibration import LossScaleWarning, calibrate_weights
from kdkernels.distill.connectors import make_connector
from kdkernels.distill.schemes.byot import HEADS as BYOT_HEADS
from kdkernels.distill.methods.fitnets import hint_parameters

STUDENT_WIDTHS = (4, 8, 16)
TEACHER_WIDTHS = (8, 16, 32)
PRE_RELU = [FeatureSpec(f"relu{i}", on="input") for i in (1, 2, 3)]


class CNN(nn.Module):
    """Three conv-BN stages (the 2nd and 3rd with stride 2), separate ReLU modules (their inputs
    are the pre-ReLU stage outputs), global pooling, a linear classifier."""

    def __init__(self, widths=STUDENT_WIDTHS, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stage1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1))
        self.relu1 = nn.ReLU()
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2))
        self.relu2 = nn.ReLU()
        self.stage3 = nn.Sequential(nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c3))
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.stage1(x))
        x = self.relu2(self.stage2(x))
        x = self.relu3(self.stage3(x))
        return self.fc(self.pool(x).flatten(1))


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_16(test_fraction: float = 0.4) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(len(x) * test_fraction)
    return Data(x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]])


def labelled_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten() for c in range(10)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks])


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    was = model.training
    model.eval()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train(was)
    return acc


def train_teacher(data: Data, seed: int, steps: int, batch: int = 256) -> nn.Module:
    """Adam on random minibatches of the whole training split."""
    torch.manual_seed(seed)
    teacher = CNN(TEACHER_WIDTHS)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (batch,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(teacher(data.x_train[idx]), data.y_train[idx]).backward()
        optimizer.step()
    return teacher.eval()


def transfer_batch(data: Data, per_class: int, unlabelled: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_class`` labelled images per class plus ``unlabelled`` other training images whose
    label is -100 (ignored by every cross-entropy): the CE learns from the labelled ones, the
    distillation terms from all. Also returns the indices (into the training split) it used."""
    idx = labelled_subset(data.y_train, per_class, seed)
    mask = torch.ones(len(data.y_train), dtype=torch.bool)
    mask[idx] = False
    rest = torch.nonzero(mask).flatten()
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(10_000 + seed))[:unlabelled]]
    x = torch.cat([data.x_train[idx], data.x_train[rest]])
    y = torch.cat([data.y_train[idx], torch.full((len(rest),), -100, dtype=torch.long)])
    return x, y, torch.cat([idx, rest])


def validation_split(data: Data, used: torch.Tensor) -> Data:
    """The training images the student never sees (outside its transfer batch) in place of the
    test split: to choose between variants without looking at the test images. (The teacher was
    trained on them, so it is a validation set for the student only.)"""
    mask = torch.ones(len(data.y_train), dtype=torch.bool)
    mask[used] = False
    return Data(data.x_train, data.y_train, data.x_train[mask], data.y_train[mask])


class ConvReg(nn.Sequential):
    """RepDistiller's FitNets regressor (``ConvReg``) for equal spatial sizes: a 1×1 conv with
    bias, BatchNorm, ReLU (its hint, like ``relu2`` / ``relu3`` here, is a post-ReLU feature)."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__(nn.Conv2d(student_channels, teacher_channels, 1), nn.BatchNorm2d(teacher_channels), nn.ReLU())


HINT_CHANNELS = {"relu2": (8, 16), "relu3": (16, 32)}  # (student, teacher) channels at the guided / hint layer
BYOT_HEAD_CHANNELS = {"relu1": 4, "relu2": 8}  # the student's shallow stages that can carry a BYOT head
BYOT_HEAD_STRIDES = {"relu1": 4, "relu2": 2}  # their resolution (16×16, 8×8) over the deepest stage's (4×4)


def hint_regressor(kind: str, layer: str) -> nn.Module:
    """FitNets' regressor from the student's to the teacher's channels at ``layer``: ``"conv"``,
    the library's default 1×1 conv, or ``"convreg"``, RepDistiller's (see ``ConvReg``)."""
    return ConvReg(*HINT_CHANNELS[layer]) if kind == "convreg" else make_connector("conv", *HINT_CHANNELS[layer])


def fitnets_hint(args, weight: float) -> FitNets:
    """The hint of both FitNets rows: the student's stage ``args.hint_layer`` guided by the same
    stage of the teacher (twice as wide), post-ReLU, RepDistiller's mean squared error. The study's
    default, the last stage (``relu3``) with RepDistiller's regressor, was chosen on validation
    seeds; the paper and RepDistiller (``hint_layer=2`` of its ResNets) guide a middle stage
    (``relu2`` here), which on this 4/8/16-channel student hurts (see the README)."""
    return FitNets(args.hint_layer, args.hint_layer, connector=hint_regressor(args.hint_regressor, args.hint_layer), weight=weight)


# Each method: the losses beside the student, with the published weights (see each class's
# docstring). Every method but Hinton KD (which carries its own (1 − α)·CE) adds the CE.
METHODS: dict[str, Callable[[argparse.Namespace], list]] = {
    "hinton_kd": lambda args: [HintonKD()],
    "fitnets": lambda args: [CrossEntropy(), fitnets_hint(args, weight=100.0)],
    "attention_transfer": lambda args: [CrossEntropy(), AttentionTransfer(["relu1", "relu2", "relu3"], ["relu1", "relu2", "relu3"])],
    "fsp": lambda args: [
        CrossEntropy(),
        FSP([("relu1", "relu2"), ("relu2", "relu3")], [("relu1", "relu2"), ("relu2", "relu3")], connector="conv",
            student_channels=[(4, 8), (8, 16)], teacher_channels=[(8, 16), (16, 32)]),
    ],
    "rkd": lambda args: [CrossEntropy(), RKD("pool", "pool")],
    "similarity_preserving": lambda args: [CrossEntropy(), SimilarityPreserving("relu3", "relu3")],
    "ofd": lambda args: [
        CrossEntropy(),
        OFD(PRE_RELU, PRE_RELU, teacher_bns=["stage1.1", "stage2.1", "stage3.1"], student_channels=list(STUDENT_WIDTHS)),
    ],
}
LABELS = {
    "hinton_kd": "Hinton KD (T=4, α=0.9)",
    "fitnets": "FitNets (CE + 100·hint)",  # + the hint's layer and regressor (see label)
    "fitnets_two_stage": "FitNets two-stage (hint, then KD)",
    "attention_transfer": "attention transfer (β=1000)",
    "fsp": "FSP (1, 1×1 connector)",
    "rkd": "RKD (25 / 50)",
    "similarity_preserving": "similarity-preserving (γ=3000)",
    "ofd": "OFD (1e-3)",
    "born_again": "born-again (KL at T=1 + CE)",
    "born_again_ensemble": "born-again ensemble (generations 0 and 1)",
    "ce_ensemble": "control: CE student 0 and CE student 1 averaged",
    "mutual_learning": "deep mutual learning (2 peers)",
    "byot": "BYOT (T=3, α=0.1, λ=1e-6)",
}
# Rows that the born_again method's run also writes (they are not methods to select).
ROWS_OF = {"born_again": ("born_again_ensemble", "ce_ensemble")}
SELECTABLE = [name for name in LABELS if not any(name in rows for rows in ROWS_OF.values())]
# The rows --update may replace, and what each row is compared with besides the CE.
SECOND_BASELINE = {
    "fitnets_two_stage": "hinton_kd",  # its stage 2 is Hinton KD: does the hint stage add to it?
    "born_again_ensemble": "ce_ensemble",  # does the KL add anything to averaging two generations?
}


def label(name: str, entry: dict | None = None) -> str:
    """The row's name; FitNets' rows also say where their hint was, BYOT's where its heads were
    (recorded with each result)."""
    entry = entry or {}
    if entry.get("hint") is not None:
        return f"{LABELS[name][:-1]}; {entry['hint']})"
    if entry.get("heads") is not None:
        return f"{LABELS[name][:-1]}; heads at {entry['heads']})"
    return LABELS[name]


def fit(module: nn.Module, step: Callable[[], object], steps: int, lr: float, parameters=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Adam on ``parameters`` (default: all of ``module``'s), full batch. Returns the total loss
    before each step and the first step's losses (both read after training, so the loop has no
    host sync)."""
    optimizer = torch.optim.Adam(module.parameters() if parameters is None else parameters, lr=lr, weight_decay=5e-4)
    module.train()
    totals, first = [], None
    for _ in range(steps):
        optimizer.zero_grad()
        out = step()
        first = first or {"output": out.student_output, **{k: v.detach() for k, v in out.losses.items()}}
        totals.append(out.total.detach())
        out.total.backward()
        optimizer.step()
    return torch.stack(totals).tolist(), first


def first_step_ratio(first: dict, y: torch.Tensor) -> float:
    """The distilling methods' weighted loss (every loss but the separate CE) over the CE of the
    student's logits, at the first step."""
    task = F.cross_entropy(first["output"].detach(), y)
    method = sum(v for k, v in first.items() if k not in ("output", "ce"))
    return float(method / task)


def run_distiller(student: nn.Module, teacher: nn.Module, methods: list, x, y, data: Data, steps: int, lr: float, calibrated: bool) -> dict:
    distiller = Distiller(student, teacher, methods)
    weights = calibrate_weights(distiller, x, y, verbose=False) if calibrated else {m.name: m.weight for m in distiller.methods}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LossScaleWarning)
        totals, first = fit(distiller, lambda: distiller(x, y), steps, lr)
    distiller.remove_hooks()
    return {
        "accuracy": accuracy(student, data),
        "first_ratio": first_step_ratio(first, y),
        "weights": weights,
        "finite": all(map(math.isfinite, totals)),
        "warned": any(issubclass(w.category, LossScaleWarning) for w in caught),
    }


def run_fitnets_two_stage(student: nn.Module, teacher: nn.Module, x, y, data: Data, args, calibrated: bool) -> dict:
    """FitNets as the paper trains it (Romero et al. 2015, §2.3): stage 1 trains the student up to
    the guided layer (``hint_parameters``) and the regressor on the hint alone, no labels, weight 1;
    stage 2 trains the whole student with Hinton KD, exactly as the ``hinton_kd`` row (published
    or calibrated weights). Stage 1 is extra training (``args.steps`` full-batch steps on the
    student's stages up to the guided layer) on top of stage 2's ``args.steps``; the regressor is
    dropped after stage 1."""
    stage1 = Distiller(student, teacher, [fitnets_hint(args, weight=1.0)])
    guided = hint_parameters(student, args.hint_layer, x[:2])
    hint_totals, _ = fit(stage1, lambda: stage1(x), args.steps, args.lr, guided + list(stage1.methods.parameters()))
    stage1.remove_hooks()
    result = run_distiller(student, teacher, [HintonKD()], x, y, data, args.steps, args.lr, calibrated)
    result["hint_loss"] = [hint_totals[0], hint_totals[-1]]  # stage 1, first and last step
    result["finite"] = result["finite"] and all(map(math.isfinite, hint_totals))
    return result


def run_seed(data: Data, seed: int, args) -> dict:
    """Every selected method on this seed, each from the same initial student, paired with CE alone."""
    t0 = time.perf_counter()
    teacher = train_teacher(data, seed, args.teacher_steps)
    x, y, used = transfer_batch(data, args.per_class, args.unlabelled, seed)
    if args.split == "validation":
        data = validation_split(data, used)
    selected = set(args.methods)
    init = 1000 + seed

    def fresh_student() -> nn.Module:
        torch.manual_seed(init)  # the same initial student in every run of this seed
        return CNN()

    results = {"teacher": accuracy(teacher, data)}
    student = fresh_student()
    distiller = Distiller(student, teacher, [CrossEntropy()])
    totals, _ = fit(distiller, lambda: distiller(x, y), args.steps, args.lr)
    distiller.remove_hooks()
    results["ce"] = {"accuracy": accuracy(student, data), "finite": all(map(math.isfinite, totals))}
    ce_student = student

    hint = f"{args.hint_layer}, {'ConvReg' if args.hint_regressor == 'convreg' else '1×1 conv'}"
    for name, factory in METHODS.items():
        for weighting in ("default", "calibrated"):
            if name in selected:
                student = fresh_student()
                results[f"{name}/{weighting}"] = run_distiller(student, teacher, factory(args), x, y, data, args.steps, args.lr, weighting == "calibrated")
                if name == "fitnets":
                    results[f"{name}/{weighting}"]["hint"] = hint

    for weighting in ("default", "calibrated"):
        if "fitnets_two_stage" in selected:
            student = fresh_student()
            results[f"fitnets_two_stage/{weighting}"] = run_fitnets_two_stage(student, teacher, x, y, data, args, weighting == "calibrated")
            results[f"fitnets_two_stage/{weighting}"]["hint"] = hint

    # Born-again: the CE-trained student of this seed is generation 0; generation 1 has its
    # architecture and learns from it (KL at T = 1 plus the CE), as schemes.born_again builds it.
    # Rows: generation 1 alone, and the paper's final model, the ensemble of generations 0 and 1
    # (BornAgainEnsemble), with its control: generation 0 averaged with a second CE student from
    # generation 1's initial weights (what two generations give without the KL).
    def second_init() -> nn.Module:
        torch.manual_seed(3000 + seed)
        return CNN()

    generation_one = fresh_student if args.born_again_init == "same" else second_init
    for weighting in ("default", "calibrated") if "born_again" in selected else ():
        student = generation_one()
        methods = [HintonKD(temperature=1.0, alpha=1.0, name="born_again"), CrossEntropy()]
        results[f"born_again/{weighting}"] = run_distiller(student, ce_student, methods, x, y, data, args.steps, args.lr, weighting == "calibrated")
        results[f"born_again_ensemble/{weighting}"] = {"accuracy": accuracy(BornAgainEnsemble([ce_student, student]), data), "finite": results[f"born_again/{weighting}"]["finite"]}
    if "born_again" in selected:
        student = generation_one()
        distiller = Distiller(student, teacher, [CrossEntropy()])
        totals, _ = fit(distiller, lambda: distiller(x, y), args.steps, args.lr)
        distiller.remove_hooks()
        results["ce_ensemble/default"] = {"accuracy": accuracy(BornAgainEnsemble([ce_student, student]), data), "finite": all(map(math.isfinite, totals))}

    if "mutual_learning" in selected:
        student = fresh_student()
        torch.manual_seed(2000 + seed)
        dml = MutualLearning([student, CNN()])
        totals, _ = fit(dml, lambda: dml(x, y), args.steps, args.lr)
        results["mutual_learning/default"] = {"accuracy": accuracy(student, data), "finite": all(map(math.isfinite, totals))}

    for weighting in ("default", "calibrated") if "byot" in selected else ():
        student = fresh_student()
        heads = args.byot_heads
        byot = BYOT(student, stage_layers=heads, stage_channels=[BYOT_HEAD_CHANNELS[h] for h in heads], feature_layer="pool", feature_dim=16,
                    num_classes=10, head=args.byot_head, stage_strides=[BYOT_HEAD_STRIDES[h] for h in heads])
        if weighting == "calibrated":
            byot.calibrate(x, y, verbose=False)
        totals, first = fit(byot, lambda: byot(x, y), args.steps, args.lr)
        feature = sum(v for k, v in first.items() if k.endswith("/feature"))
        results[f"byot/{weighting}"] = {"accuracy": accuracy(student, data), "finite": all(map(math.isfinite, totals)),
                                        "heads": f"{', '.join(heads)}, {args.byot_head}", "weights": {"λ": byot.feature_weight},
                                        "first_ratio": float(feature / F.cross_entropy(first["output"].detach(), y))}
    results["seconds"] = time.perf_counter() - t0
    return results


def paired(per_seed: list[dict], key: str, baseline: str) -> dict:
    """Accuracy of ``key`` − accuracy of ``baseline`` per seed (pp): mean, sd, seeds better /
    worse, Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon

    diffs = [100 * (r[key]["accuracy"] - r[baseline]["accuracy"]) for r in per_seed]
    nonzero = [d for d in diffs if d != 0]
    return {
        "mean_diff_pp": statistics.mean(diffs),
        "sd_diff_pp": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "better": sum(d > 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
        "wilcoxon_p": float(wilcoxon(diffs).pvalue) if len(nonzero) >= 1 and len(diffs) >= 2 else float("nan"),
        "diffs_pp": diffs,
    }


def summarise(per_seed: list[dict]) -> dict:
    keys = [k for k in per_seed[0] if "/" in k]
    summary = {"ce": statistics.mean(r["ce"]["accuracy"] for r in per_seed), "teacher": statistics.mean(r["teacher"] for r in per_seed)}
    for key in keys:
        entry = {
            **paired(per_seed, key, "ce"),
            "accuracy": statistics.mean(r[key]["accuracy"] for r in per_seed),
            "finite": all(r[key]["finite"] for r in per_seed),
        }
        name, weighting = key.split("/")
        second = f"{SECOND_BASELINE.get(name)}/{weighting}"
        if second not in per_seed[0]:
            second = f"{SECOND_BASELINE.get(name)}/default"  # a control without weights
        if second in per_seed[0]:
            entry["vs"] = {"baseline": second, **paired(per_seed, key, second)}
        for what in ("hint", "heads"):
            if what in per_seed[0][key]:
                entry[what] = per_seed[0][key][what]
        if "first_ratio" in per_seed[0][key]:
            entry["first_ratio"] = statistics.median(r[key]["first_ratio"] for r in per_seed)
        if "warned" in per_seed[0][key]:
            entry["warned"] = sum(r[key]["warned"] for r in per_seed)
        if "weights" in per_seed[0][key]:
            entry["weights"] = {n: statistics.median(r[key]["weights"][n] for r in per_seed) for n in per_seed[0][key]["weights"]}
        summary[key] = entry
    return summary


def markdown(summary: dict, args, runs: list[dict]) -> str:
    split = "Test" if args.split == "test" else "Validation (training images outside the transfer batch, not the test split)"
    seeds = f"{args.seeds} seeds" + (f" (from seed {args.first_seed})" if args.first_seed else "")
    lines = [
        "# Distillation methods on scikit-learn's digits (issue 19)",
        "",
        f"Student CNN {'/'.join(map(str, STUDENT_WIDTHS))} channels, 16×16 inputs, {args.per_class} labelled images per class "
        f"plus {args.unlabelled} unlabelled training images (the distillation terms see all, the CE only the labelled), "
        f"{args.steps} full-batch Adam steps (lr {args.lr}); teacher CNN {'/'.join(map(str, TEACHER_WIDTHS))} trained once per seed "
        f"on the whole training split ({args.teacher_steps} minibatch steps). {seeds}; every run of a seed starts from the same student "
        f"and the same labelled images. {split} accuracy: teacher {100 * summary['teacher']:.1f} %, CE alone {100 * summary['ce']:.1f} %.",
        "",
        "Δ = accuracy with the method − accuracy with CE alone, in percentage points, mean ± sd over seeds; "
        "better / worse = seeds; p = Wilcoxon signed-rank test of the paired differences; "
        "loss/CE = the method's weighted loss over the CE at the first step (median over seeds); "
        "warned = seeds on which the distiller's first-step warning (> 10× the CE) fired. "
        "BYOT: its weight is λ, the one it has that depends on the scale (`BYOT.calibrate`), and loss/CE is its feature term "
        "over the deepest classifier's CE.",
        "",
        "| method | weights | Δ pp | better / worse | p | loss/CE at step 1 | warned | weight (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(LABELS)
    for name in names:
        for weighting in ("default", "calibrated"):
            key = f"{name}/{weighting}"
            if key not in summary:
                continue
            e = summary[key]
            ratio = f"{e['first_ratio']:.2f}" if "first_ratio" in e else "–"
            warned = str(e.get("warned", "–"))
            weights = ", ".join(f"{n} {w:.3g}" for n, w in e.get("weights", {}).items() if n != "ce") or "–"
            p = "–" if math.isnan(e["wilcoxon_p"]) else f"{e['wilcoxon_p']:.3f}"
            row_label = label(name, e) if weighting == "default" else ""
            finite = "" if e["finite"] else " (non-finite loss!)"
            lines.append(
                f"| {row_label} | {weighting} | {e['mean_diff_pp']:+.1f} ± {e['sd_diff_pp']:.1f}{finite} | {e['better']} / {e['worse']} | {p} | {ratio} | {warned} | {weights} |"
            )
    for name, weighting in [k.split("/") for k in summary if "/" in k and "vs" in summary[k]]:
        vs = summary[f"{name}/{weighting}"]["vs"]
        p = "–" if math.isnan(vs["wilcoxon_p"]) else f"{vs['wilcoxon_p']:.3f}"
        base_name, base_weighting = vs["baseline"].split("/")
        lines.append(f"\n{label(name, summary[f'{name}/{weighting}'])} [{weighting}] against {label(base_name)} [{base_weighting}] alone (paired): "
                     f"{vs['mean_diff_pp']:+.1f} ± {vs['sd_diff_pp']:.1f} pp, {vs['better']} / {vs['worse']}, p = {p}.")
    lines += ["", "Commands (each run's rows; `--update` replaces the rows it runs, after checking that the teacher's and CE's accuracies reproduce bit for bit):", ""]
    lines += [f"- `{run['command']}`: {run['methods']} ({run['minutes']:.1f} min, {run['threads']} threads, torch {run['torch']})" for run in runs]
    return "\n".join(lines) + "\n"


def merge(path: pathlib.Path, per_seed: list[dict], args) -> tuple[list[dict], list[dict]]:
    """The per-seed results stored in ``path`` with the rows of this run in place of theirs. Refuses
    unless the stored study had the same settings and this run reproduces its teacher and CE
    accuracies exactly, seed by seed (so the other rows are still paired with the same CE)."""
    stored = json.loads(path.read_text())
    same = ("seeds", "per_class", "unlabelled", "steps", "teacher_steps", "lr", "threads", "first_seed", "split")
    defaults = {"first_seed": "0", "split": "test"}  # studies stored before these options existed
    different = [k for k in same if stored["args"].get(k, defaults.get(k)) != str(getattr(args, k))]
    if different:
        listed = ", ".join(f"{k}={stored['args'].get(k)} (here {getattr(args, k)})" for k in different)
        raise SystemExit(f"--update: {path} was run with other settings: {listed}")
    for seed, (old, new) in enumerate(zip(stored["per_seed"], per_seed, strict=True), start=args.first_seed):
        for key in ("teacher", "ce"):
            if old[key] != new[key]:
                raise SystemExit(f"--update: seed {seed}: {key} {new[key]} here, {old[key]} in {path}: not reproduced, rerun the whole study")
        old.update({k: v for k, v in new.items() if "/" in k})
    return stored["per_seed"], stored.get("runs", [])


def plot(summary: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, w) for name in LABELS for w in ("default", "calibrated") if f"{name}/{w}" in summary]
    fig, ax = plt.subplots(figsize=(9.5, 0.42 * len(rows) + 1.2))
    for i, (name, weighting) in enumerate(rows):
        e = summary[f"{name}/{weighting}"]
        colour = "tab:red" if weighting == "default" else "tab:blue"
        y = len(rows) - 1 - i
        ax.scatter(e["diffs_pp"], [y] * len(e["diffs_pp"]), s=12, color=colour, alpha=0.5)
        ax.plot([e["mean_diff_pp"]], [y], marker="D", color=colour, markersize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{label(n, summary[f'{n}/{w}'])} [{w}]" for n, w in reversed(rows)], fontsize=8)
    ax.set_xlabel("test accuracy − CE alone (pp), per seed (dots) and mean (diamond)")
    ax.set_title(f"digits, student {'/'.join(map(str, STUDENT_WIDTHS))} ch: red = published weights, blue = calibrated", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="the study's seeds (the variants were chosen on 10 validation seeds)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--unlabelled", type=int, default=150, help="unlabelled training images in the transfer batch")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 seeds of the same study: a smoke run (about a minute of CPU)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    parser.add_argument("--methods", default=",".join(SELECTABLE), help=f"comma-separated subset of {','.join(SELECTABLE)} (CE alone always runs)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + seeds − 1 (variants are chosen on seeds outside the study's)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="measure on the test split, or on the training images outside each seed's transfer batch (to choose between variants)")
    # FitNets' hint: chosen on the validation split of seeds 100-109, by the calibrated one-stage
    # row's mean paired Δ (bench/results/fitnets_validation/README.md).
    parser.add_argument("--hint-layer", choices=tuple(HINT_CHANNELS), default="relu3", help="FitNets' guided and hint layer (the same stage of both)")
    parser.add_argument("--hint-regressor", choices=("conv", "convreg"), default="convreg", help="FitNets' regressor (see hint_regressor)")
    # BYOT's heads: chosen on the validation split of seeds 100-109 (bench/results/byot_validation/README.md).
    # Born-again's generation 1 starts from generation 0's initial weights or from new ones: chosen
    # on the same validation seeds (bench/results/born_again_validation/README.md).
    parser.add_argument("--born-again-init", choices=("same", "new"), default="new",
                        help="generation 1's initial weights: generation 0's (the study's pairing) or new ones (seed 3000 + seed)")
    parser.add_argument("--byot-heads", default="relu2", help=f"comma-separated shallow stages that get a BYOT head, from {list(BYOT_HEAD_CHANNELS)}")
    parser.add_argument("--byot-head", choices=BYOT_HEADS, default="pointwise", help="BYOT's head: the unofficial code's branch bottleneck, or a 1×1 conv")
    parser.add_argument("--update", action="store_true",
                        help="replace this run's rows in <out>/methods_digits.json (and its .md, .png), keeping the others; "
                        "refused unless the teacher's and CE's accuracies reproduce exactly")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in SELECTABLE]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected names from {SELECTABLE}")
    args.byot_heads = [h for h in args.byot_heads.split(",") if h]
    if not args.byot_heads or any(h not in BYOT_HEAD_CHANNELS for h in args.byot_heads):
        parser.error(f"--byot-heads: expected a comma-separated subset of {list(BYOT_HEAD_CHANNELS)}, got {args.byot_heads}")
    if args.quick:
        args.seeds = 2  # the same study on 2 seeds: shorter training would not show what the methods do
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    data = load_digits_16()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "methods_digits" + ("_quick" if args.quick else "") + ("_validation" if args.split == "validation" else "")
    partial = args.out / f"{stem}_partial.json"
    per_seed = []
    for seed in tqdm(range(args.first_seed, args.first_seed + args.seeds), desc="seeds", disable=args.quick):
        per_seed.append(run_seed(data, seed, args))
        partial.write_text(json.dumps(per_seed))  # progress of a long run
    partial.unlink()
    run = {
        "command": " ".join(["python"] + sys.argv) if argv is None else " ".join(["main(", *argv, ")"]),
        "methods": ", ".join(args.methods),
        "minutes": (time.perf_counter() - t0) / 60,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    stored_args, runs = {k: str(v) for k, v in vars(args).items()}, []
    if args.update:
        stored_args = json.loads((args.out / f"{stem}.json").read_text())["args"]
        per_seed, runs = merge(args.out / f"{stem}.json", per_seed, args)
    runs.append(run)
    summary = summarise(per_seed)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": stored_args, "runs": runs, "summary": summary, "per_seed": per_seed}, indent=1))
    table = markdown(summary, args, runs)
    (args.out / f"{stem}.md").write_text(table)
    plot(summary, args.out / f"{stem}.png")
    print(table)
    return summary


if __name__ == "__main__":
    main()
