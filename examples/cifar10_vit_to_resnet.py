"""CIFAR-10: distil a ViT-B/16 teacher into a ResNet-34 student with Hinton KD.

1. Teacher: timm's ``vit_base_patch16_224`` (ImageNet weights) with a new 10-class head; only the
   head is fine-tuned (the backbone is frozen), on CIFAR-10 upsampled to 224×224.
2. Student: torchvision's ``resnet34`` (from scratch, CIFAR stem: 3×3 conv, no max-pool), trained on
   α·T²·KL(teacher ‖ student) + (1−α)·CE through ``kdkernels.distill.Distiller``.

Writes ``accuracy.csv`` (test accuracy per epoch) and ``accuracy.png`` to ``--out-dir``.

    pip install timm torchvision tqdm matplotlib
    python examples/cifar10_vit_to_resnet.py --epochs 30 --temperature 4 --alpha 0.9
    python examples/cifar10_vit_to_resnet.py --synthetic --epochs 1     # offline smoke run

``--synthetic`` uses random tensors of CIFAR's shape and no pretrained weights, so nothing is
downloaded (timm and torchvision must still be installed).
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import Distiller, HintonKD

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Preprocess(nn.Module):
    """[0, 1] images → the model's input: optional resize, then per-channel normalisation."""

    def __init__(self, mean, std, size: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def build_teacher(pretrained: bool) -> nn.Module:
    import timm
    import timm.data

    vit = timm.create_model("vit_base_patch16_224", pretrained=pretrained, num_classes=10)  # new 10-class head
    config = timm.data.resolve_data_config({}, model=vit)
    for p in vit.parameters():
        p.requires_grad_(False)
    for p in vit.get_classifier().parameters():
        p.requires_grad_(True)
    return nn.Sequential(Preprocess(config["mean"], config["std"], size=config["input_size"][-1]), vit)


def build_student() -> nn.Module:
    import torchvision

    resnet = torchvision.models.resnet34(weights=None, num_classes=10)
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # 32×32 inputs
    resnet.maxpool = nn.Identity()
    return nn.Sequential(Preprocess(CIFAR_MEAN, CIFAR_STD), resnet)


def build_loaders(args) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    from torch.utils.data import DataLoader, TensorDataset

    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = args.synthetic_size
        train = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
        test = TensorDataset(torch.rand(n // 2, 3, 32, 32, generator=g), torch.randint(0, 10, (n // 2,), generator=g))
    else:
        import torchvision
        import torchvision.transforms as T

        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
        train = torchvision.datasets.CIFAR10(args.data_dir, train=True, download=True, transform=augment)
        test = torchvision.datasets.CIFAR10(args.data_dir, train=False, download=True, transform=T.ToTensor())
    kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.device.type == "cuda")
    return DataLoader(train, shuffle=True, drop_last=True, **kwargs), DataLoader(test, shuffle=False, **kwargs)


def autocast(args):
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)


@torch.no_grad()
def evaluate(model: nn.Module, loader, args) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=args.device)
    total = 0
    for x, y in loader:
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        with autocast(args):
            correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    return correct.item() / max(total, 1)


def finetune_teacher_head(teacher: nn.Module, train_loader, args) -> None:
    from tqdm import tqdm

    head = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head, lr=args.teacher_lr, weight_decay=1e-4)
    teacher.eval()  # frozen backbone: no dropout / drop-path; only the head learns
    for epoch in range(args.teacher_epochs):
        for x, y in tqdm(train_loader, desc=f"teacher head {epoch + 1}/{args.teacher_epochs}", leave=False):
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            with autocast(args):
                loss = F.cross_entropy(teacher(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in head:
        p.requires_grad_(False)


def train_student(student: nn.Module, teacher: nn.Module, train_loader, test_loader, args, teacher_acc: float) -> list[dict]:
    from tqdm import tqdm

    distiller = Distiller(student, teacher, [HintonKD(temperature=args.temperature, alpha=args.alpha)]).to(args.device)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    rows = []
    for epoch in range(1, args.epochs + 1):
        distiller.train()  # the student trains; the teacher stays in eval mode
        sums, steps, start = {}, 0, time.time()
        bar = tqdm(train_loader, desc=f"student {epoch}/{args.epochs}", leave=False)
        for x, y in bar:
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            with autocast(args):
                out = distiller(x, y)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            scheduler.step()
            for name, value in out.losses.items():  # stays on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach()
            steps += 1
            if steps % args.log_every == 0:
                bar.set_postfix({k: f"{v.item() / steps:.3f}" for k, v in sums.items()})
        acc = evaluate(student, test_loader, args)
        row = {"epoch": epoch, "test_acc": acc, "teacher_acc": teacher_acc, "seconds": time.time() - start}
        row.update({f"train_{k.replace('/', '_')}": v.item() / max(steps, 1) for k, v in sums.items()})
        rows.append(row)
        print(f"epoch {epoch}: student test accuracy {100 * acc:.2f}% (teacher {100 * teacher_acc:.2f}%)")
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [100 * r["test_acc"] for r in rows], marker="o", label="ResNet-34 student (KD)")
    ax.axhline(100 * rows[0]["teacher_acc"], color="gray", linestyle="--", label="ViT-B/16 teacher (head fine-tuned)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default="./runs/cifar10_vit_to_resnet")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(), help="bf16 autocast")
    p.add_argument("--teacher-checkpoint", default=None, help="load the fine-tuned teacher from here if it exists, else save it there")
    p.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped data, no pretrained weights: runs offline")
    p.add_argument("--synthetic-size", type=int, default=256)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    os.makedirs(args.out_dir, exist_ok=True)
    train_loader, test_loader = build_loaders(args)

    teacher = build_teacher(pretrained=not args.synthetic).to(args.device)
    if args.teacher_checkpoint and os.path.exists(args.teacher_checkpoint):
        teacher.load_state_dict(torch.load(args.teacher_checkpoint, map_location=args.device))
        for p in teacher.parameters():
            p.requires_grad_(False)
    else:
        finetune_teacher_head(teacher, train_loader, args)
        if args.teacher_checkpoint:
            torch.save(teacher.state_dict(), args.teacher_checkpoint)
    teacher_acc = evaluate(teacher, test_loader, args)
    print(f"teacher test accuracy: {100 * teacher_acc:.2f}%")

    student = build_student().to(args.device)
    rows = train_student(student, teacher, train_loader, test_loader, args, teacher_acc)
    write_csv(rows, os.path.join(args.out_dir, "accuracy.csv"))
    plot(rows, os.path.join(args.out_dir, "accuracy.png"))
    print(f"wrote {args.out_dir}/accuracy.csv and accuracy.png")
    return rows


if __name__ == "__main__":
    main()
