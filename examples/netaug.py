"""NetAug on real data, offline: a tiny MobileNetV2 (width 0.35) on scikit-learn's digits.

The 8×8 digits (shipped with scikit-learn, no download) are upsampled to 16×16 and, in training,
shifted by up to 2 pixels. The same tiny MobileNetV2 is trained per seed twice with the same
recipe (SGD + Nesterov, cosine lr, CE with label smoothing 0.1): once plainly, once with NetAug
(Cai et al., ICLR 2022: base subnet + one sampled wider subnet per step, width ×{1, 1.8, 2.6},
expand ×{1, 1.6, 2.2, 2.8}, width augmentation off for the second half of the epochs, channels
sorted by L1 importance each augmented epoch, BN re-estimated before evaluation). The NetAug model
is evaluated as the exported plain base network. Prints and writes a table of test accuracies.

    python examples/netaug.py                  # the full run: minutes on 2 CPU cores
    python examples/netaug.py --synthetic      # random tensors, one tiny epoch: a smoke test (CI)
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from _common import spread, str_args, write_table_and_json
from kdkernels.distill import NetAug
from kdkernels.distill.netaug import make_divisible


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand (t > 1), 3×3 depthwise, 1×1 linear projection; a residual
    when the stride is 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# MobileNetV2's (expand t, channels c, repeats n, stride s), cut after the 64-channel stage for 16×16 inputs.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2)]


def tiny_mobilenet_v2(width: float = 0.35, classes: int = 10, in_channels: int = 1, last_channel: int = 1280) -> nn.Module:
    """MobileNetV2 at ``width`` (channels rounded to multiples of 8, as torchvision does), stem
    stride 1 for small images."""
    c = make_divisible(32 * width, 8)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
    for t, channels, n, s in SETTINGS:
        out = make_divisible(channels * width, 8)
        for i in range(n):
            layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
            c = out
    last = make_divisible(last_channel * width, 8)
    layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.0), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


def load_digits(size: int, synthetic: bool):
    if synthetic:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(96, 1, size, size, generator=g), torch.randint(0, 10, (96,), generator=g)
        return x[:64], y[:64], x[64:], y[64:]
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one fixed split for every seed
    test, train = order[: len(x) // 4], order[len(x) // 4 :]
    return x[train], y[train], x[test], y[test]


def shifted(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translations by up to ``pad`` pixels (zero padding + crop), per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def batches(n: int, batch: int, g: torch.Generator):
    order = torch.randperm(n, generator=g)
    return [order[i : i + batch] for i in range(0, n, batch)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def cosine_lr(optimizer, lr: float, step: int, total: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)


def train_one(method: str, data, args, seed: int, progress) -> tuple[float, float]:
    """Test accuracy and seconds of one run (``method``: ``"baseline"`` or ``"netaug"``)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = tiny_mobilenet_v2(args.width)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total, step = args.epochs * steps_per_epoch, 0
    start = time.perf_counter()
    if method == "netaug":
        netaug = NetAug(model, epochs=args.epochs, generator=torch.Generator().manual_seed(seed))
        optimizer = make_optimizer(netaug.parameters(), args.lr)
        for epoch in range(args.epochs):
            netaug.train()
            netaug.start_epoch(epoch)
            for idx in batches(len(x_train), args.batch, g):
                cosine_lr(optimizer, args.lr, step, total)
                netaug.train_step(shifted(x_train[idx], g), y_train[idx], optimizer)
                step += 1
                progress.update()
        netaug.reset_bn([x_train[idx] for idx in batches(len(x_train), args.batch, g)])
        model = netaug.export()
    else:
        optimizer = make_optimizer(model.parameters(), args.lr)
        for epoch in range(args.epochs):
            model.train()
            for idx in batches(len(x_train), args.batch, g):
                cosine_lr(optimizer, args.lr, step, total)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(shifted(x_train[idx], g)), y_train[idx], label_smoothing=0.1).backward()
                optimizer.step()
                step += 1
                progress.update()
    return accuracy(model, x_test, y_test), time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="random tensors, one short epoch (seconds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--size", type=int, default=16, help="side of the upsampled images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out/netaug"))
    args = parser.parse_args(argv)
    if args.synthetic:
        args.seeds, args.epochs, args.width, args.size = 1, 2, 0.25, 8
    torch.set_num_threads(args.threads)
    data = load_digits(args.size, args.synthetic)
    steps = args.seeds * 2 * args.epochs * math.ceil(len(data[0]) / args.batch)
    results = {"baseline": [], "netaug": []}
    seconds = {"baseline": 0.0, "netaug": 0.0}
    with tqdm(total=steps, desc="netaug example", unit="step") as progress:
        for seed in range(args.seeds):
            for method in results:
                acc, sec = train_one(method, data, args, seed, progress)
                results[method].append(acc)
                seconds[method] += sec
                progress.set_postfix({method: f"{acc:.3f}"})
    lines = [
        f"tiny MobileNetV2-{args.width:g} on {'synthetic data' if args.synthetic else f'digits {args.size}×{args.size}'}, "
        f"{args.epochs} epochs, {args.seeds} seeds",
        "",
        "| method | test accuracy (mean ± std) | per seed | train time |",
        "|---|---|---|---|",
    ]
    for method, accs in results.items():
        per_seed = ", ".join(f"{a:.4f}" for a in accs)
        lines.append(f"| {method} | {statistics.mean(accs):.4f} ± {spread(accs):.4f} | {per_seed} | {seconds[method]:.0f} s |")
    table = "\n".join(lines)
    write_table_and_json(args.out, "netaug_results", table, {"args": str_args(args), "accuracy": results, "seconds": seconds})
    return results


if __name__ == "__main__":
    main()
