"""Knowledge distillation on real data, offline: scikit-learn's digits (8×8 images, shipped with
scikit-learn, no download).

A large MLP teacher is trained on the full training split; the same small MLP student is then
trained on a few labelled images only, once with the labels alone and once with Hinton KD from
the teacher (T = 4, α = 0.9), for several seeds. Prints a table of test accuracies.

    python examples/digits_kd.py --seeds 5 --train-per-class 5
    python examples/digits_kd.py --synthetic          # smoke run (1 seed, 20 steps), a few seconds

The digits ship with scikit-learn, so even ``--synthetic`` uses the real data; it only shortens
the run (the flag name is the one every example uses for its offline smoke run).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from kdkernels.distill import CrossEntropy, Distiller, HintonKD


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.4, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def mlp(hidden: int, depth: int = 1) -> nn.Module:
    layers, width = [], 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def few_per_class(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten() for c in range(10)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def fit(distiller: Distiller, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> None:
    """Full-batch Adam on the distiller's total loss."""
    optimizer = torch.optim.Adam(distiller.parameters(), lr=lr, weight_decay=1e-4)
    distiller.train()
    for _ in range(steps):
        optimizer.zero_grad()
        distiller(x, y).total.backward()
        optimizer.step()


def train_teacher(data: Digits, seed: int = 0, steps: int = 300) -> nn.Module:
    torch.manual_seed(seed)
    teacher = mlp(256, depth=2)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(data.x_train), data.y_train).backward()
        optimizer.step()
    return teacher


def compare(
    seeds: int = 5,
    train_per_class: int = 5,
    temperature: float = 4.0,
    alpha: float = 0.9,
    student_hidden: int = 32,
    steps: int = 300,
    data: Digits | None = None,
) -> dict[str, list[float]]:
    """Test accuracies of the teacher, and of the student without / with KD, one entry per seed."""
    data = data or load_digits_split()
    teacher = train_teacher(data)
    results = {"teacher": [accuracy(teacher, data.x_test, data.y_test)], "student": [], "student_kd": []}
    for seed in range(seeds):
        idx = few_per_class(data.y_train, train_per_class, seed)
        x, y = data.x_train[idx], data.y_train[idx]
        for key, methods in (("student", [CrossEntropy()]), ("student_kd", [HintonKD(temperature=temperature, alpha=alpha)])):
            torch.manual_seed(1000 + seed)  # the same initial student for both runs
            student = mlp(student_hidden)
            distiller = Distiller(student, teacher, methods)
            fit(distiller, x, y, steps)
            distiller.remove_hooks()
            results[key].append(accuracy(student, data.x_test, data.y_test))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps per student")
    parser.add_argument("--synthetic", action="store_true", help="smoke run: 1 seed, 20 steps")
    args = parser.parse_args()
    if args.synthetic:
        args.seeds, args.steps = 1, 20
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    r = compare(args.seeds, args.train_per_class, args.temperature, args.alpha, steps=args.steps)
    print(f"teacher (MLP 64-256-256-10, full training split): {100 * r['teacher'][0]:.1f}%")
    print(f"student (MLP 64-32-10) on {args.train_per_class} labelled images per class:")
    print(f"{'seed':>6} {'labels only':>12} {'with KD':>10}")
    for seed, (a, b) in enumerate(zip(r["student"], r["student_kd"])):
        print(f"{seed:>6} {100 * a:>11.1f}% {100 * b:>9.1f}%")
    mean = statistics.mean
    print(f"{'mean':>6} {100 * mean(r['student']):>11.1f}% {100 * mean(r['student_kd']):>9.1f}%")


if __name__ == "__main__":
    main()
