"""CIFAR-10: distil a ViT teacher into a ResNet student with Hinton KD (kdkernels.distill).

1. Teacher: a Vision Transformer. Trained from scratch, or -- when pretrained weights are given --
   only its new 10-class head is fine-tuned (backbone frozen).
2. Student: a ResNet trained from scratch on α·T²·KL(teacher ‖ student) + (1−α)·CE through
   ``kdkernels.distill.Distiller`` (the KL term is the fused ``kd_loss``).

Models, by ``--models``:

* ``transformers`` (default when timm / torchvision do not import, e.g. on a CPU machine set up by
  the README): ``ViTForImageClassification`` and ``ResNetForImageClassification`` built from
  configs, offline. ``--size small`` (default on CPU): a 6-layer ViT on 4×4 patches of the 32×32
  images and a narrow 4-stage basic-block ResNet; ``--size base`` (default on GPU): ViT-B/16 at
  224×224 and ResNet-34. ``--teacher-weights NAME_OR_DIR`` loads a pretrained ViT with
  ``from_pretrained`` (e.g. google/vit-base-patch16-224 with ``--size base``; needs the hub or a
  local copy).
* ``timm`` (default where timm and torchvision import, i.e. on a CUDA machine with their CUDA
  wheels): timm's ``vit_base_patch16_224`` with ImageNet weights and torchvision's ``resnet34``.

Data: the standard ``cifar-10-batches-py`` folder (the pickles of
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked) under ``--data-dir``, read here
without torchvision; ``--download`` fetches and unpacks it. ``--synthetic`` uses random images of
CIFAR's shape instead and no pretrained weights: nothing is read or downloaded, and it runs in
seconds on CPU.

    pip install "torch==2.13.0" transformers tqdm matplotlib        # keeps the installed CPU torch
    python examples/cifar10_vit_to_resnet.py --synthetic             # offline smoke run, seconds
    python examples/cifar10_vit_to_resnet.py --download --epochs 30  # real run: use a GPU

Writes ``accuracy.csv`` (test accuracy per epoch) and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import pickle
import tarfile
import time
import urllib.request

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import Distiller, HintonKD

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_DIR = "cifar-10-batches-py"


# ------------------------------------------------------------------------------------------------
# data


def load_cifar10(data_dir: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (test images, labels) from the python pickles; images uint8 (N, 3, 32, 32)."""
    root = os.path.join(data_dir, CIFAR_DIR)
    if not os.path.isdir(root):
        raise SystemExit(
            f"{root} not found: download {CIFAR_URL} and unpack it in {data_dir} (or pass --download), "
            "or run with --synthetic"
        )

    def read(names):
        images, labels = [], []
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.long))
        return torch.cat(images), torch.cat(labels)

    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def download_cifar10(data_dir: str) -> None:
    if os.path.isdir(os.path.join(data_dir, CIFAR_DIR)):
        return
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    print(f"downloading {CIFAR_URL} (163 MB)")
    urllib.request.urlretrieve(CIFAR_URL, archive)
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(data_dir, filter="data")
        except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters
            tar.extractall(data_dir)
    os.remove(archive)


def synthetic_cifar10(n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def make(m):
        return torch.randint(0, 256, (m, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (m,), generator=g)

    return make(n), make(max(n // 2, 1))


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, generator: torch.Generator):
    """Float batches in [0, 1]; for training shuffled, with CIFAR's random 4-pixel crop and flip."""
    order = torch.randperm(len(images), generator=generator) if train else torch.arange(len(images))
    stop = len(images) - len(images) % batch_size if train and len(images) >= batch_size else len(images)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx].float().div_(255)
        if train:
            padded = F.pad(x, (4, 4, 4, 4))
            dx, dy = torch.randint(0, 9, (2, len(idx)), generator=generator).tolist()
            x = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(len(idx))])
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
        yield x, labels[idx]


def num_batches(n: int, batch_size: int, train: bool) -> int:
    return max(n // batch_size, 1) if train else (n + batch_size - 1) // batch_size


# ------------------------------------------------------------------------------------------------
# models


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


class Logits(nn.Module):
    """A transformers image classifier as a module that maps images to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (CUDA-only wheels fail on import on a CPU torch, not just ImportError)
        return False
    return True


def build_teacher(args) -> tuple[nn.Module, bool]:
    """The ViT teacher and whether it starts from pretrained weights (then only its head trains)."""
    if args.models == "timm":
        import timm
        import timm.data

        vit = timm.create_model("vit_base_patch16_224", pretrained=not args.synthetic, num_classes=10)
        config = timm.data.resolve_data_config({}, model=vit)
        return nn.Sequential(Preprocess(config["mean"], config["std"], size=config["input_size"][-1]), vit), not args.synthetic

    from transformers import ViTConfig, ViTForImageClassification

    if args.teacher_weights and not args.synthetic:
        vit = ViTForImageClassification.from_pretrained(args.teacher_weights, num_labels=10, ignore_mismatched_sizes=True)
        size = vit.config.image_size
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the google/vit-* image processors' normalisation
        return nn.Sequential(Preprocess(mean, std, size=size), Logits(vit)), True
    if args.size == "base":  # ViT-B/16
        config = ViTConfig(image_size=224, patch_size=16, num_labels=10)
    else:  # a ViT-Tiny-like encoder on the 32×32 images: 64 patches of 4×4
        config = ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                           intermediate_size=768, num_labels=10)
    vit = ViTForImageClassification(config)
    return nn.Sequential(Preprocess(CIFAR_MEAN, CIFAR_STD, size=config.image_size), Logits(vit)), False


def build_student(args) -> nn.Module:
    if args.models == "timm":
        import torchvision

        resnet = torchvision.models.resnet34(weights=None, num_classes=10)
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # 32×32 inputs
        resnet.maxpool = nn.Identity()
        return nn.Sequential(Preprocess(CIFAR_MEAN, CIFAR_STD), resnet)

    from transformers import ResNetConfig, ResNetForImageClassification

    if args.size == "base":  # ResNet-34
        config = ResNetConfig(layer_type="basic", embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3], num_labels=10)
    else:  # a narrow ResNet-10
        config = ResNetConfig(layer_type="basic", embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10)
    resnet = ResNetForImageClassification(config)
    # CIFAR stem, as in the timm path: a 3×3 stride-1 convolution and no max-pool on 32×32 inputs.
    embedder = resnet.resnet.embedder
    embedder.embedder.convolution = nn.Conv2d(3, config.embedding_size, kernel_size=3, stride=1, padding=1, bias=False)
    embedder.pooler = nn.Identity()
    return nn.Sequential(Preprocess(CIFAR_MEAN, CIFAR_STD), Logits(resnet))


# ------------------------------------------------------------------------------------------------
# training


def autocast(args):
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)


@torch.no_grad()
def evaluate(model: nn.Module, data, args) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=args.device)
    images, labels = data
    for x, y in batches(images, labels, args.batch_size, train=False, generator=torch.Generator()):
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        with autocast(args):
            correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(len(labels), 1)


def train_teacher(teacher: nn.Module, pretrained: bool, train, args) -> None:
    """Pretrained: fine-tune the new head only (backbone frozen, eval mode). Else: train it all."""
    from tqdm import tqdm

    if pretrained:
        head = teacher[1].get_classifier() if args.models == "timm" else teacher[1].model.classifier
        for p in teacher.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        teacher.eval()
    else:
        teacher.train()
    params = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.teacher_lr, weight_decay=0.05 if not pretrained else 1e-4)
    steps = args.teacher_epochs * num_batches(len(train[1]), args.batch_size, True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.teacher_lr, total_steps=max(steps, 1))
    g = torch.Generator().manual_seed(1)
    for epoch in range(args.teacher_epochs):
        bar = tqdm(batches(*train, args.batch_size, True, g), total=num_batches(len(train[1]), args.batch_size, True),
                   desc=f"teacher {epoch + 1}/{args.teacher_epochs}", leave=False)
        for x, y in bar:
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            with autocast(args):
                loss = F.cross_entropy(teacher(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    for p in teacher.parameters():
        p.requires_grad_(False)


def train_student(student: nn.Module, teacher: nn.Module, train, test, args, teacher_acc: float) -> list[dict]:
    from tqdm import tqdm

    distiller = Distiller(student, teacher, [HintonKD(temperature=args.temperature, alpha=args.alpha)]).to(args.device)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_epoch = num_batches(len(train[1]), args.batch_size, True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * per_epoch)
    g = torch.Generator().manual_seed(2)
    rows = []
    for epoch in range(1, args.epochs + 1):
        distiller.train()  # the student trains; the teacher stays in eval mode
        sums, steps, start = {}, 0, time.time()
        bar = tqdm(batches(*train, args.batch_size, True, g), total=per_epoch, desc=f"student {epoch}/{args.epochs}", leave=False)
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
        acc = evaluate(student, test, args)
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


def plot(rows: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [100 * r["test_acc"] for r in rows], marker="o", label="ResNet student (KD)")
    ax.axhline(100 * rows[0]["teacher_acc"], color="gray", linestyle="--", label="ViT teacher")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("CIFAR-10 test accuracy (%)" + (" — synthetic data" if args.synthetic else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="./data", help=f"folder that holds {CIFAR_DIR}/")
    p.add_argument("--download", action="store_true", help=f"fetch {CIFAR_URL} into --data-dir if it is not there")
    p.add_argument("--out", default=os.path.join(here, "out", "cifar10_vit_to_resnet"), help="output folder (default: ignored by git)")
    p.add_argument("--models", choices=["auto", "transformers", "timm"], default="auto",
                   help="auto: timm + torchvision where they import, else transformers")
    p.add_argument("--size", choices=["small", "base"], default=None, help="transformers models (default: base on GPU, small on CPU)")
    p.add_argument("--teacher-weights", default=None, help="transformers: pretrained ViT (hub name or folder) for the teacher")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: 2 for a pretrained teacher (head only), 10 from scratch")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images (default: all 50000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cuda, help="bf16 autocast (default on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped data, small models, 1 epoch: offline, seconds")
    p.add_argument("--synthetic-size", type=int, default=128)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.models == "auto":
        args.models = "timm" if timm_available() else "transformers"
    if args.synthetic:
        args.size = "small"
        args.epochs = min(args.epochs, 1)
        args.teacher_epochs = 1
        args.batch_size = min(args.batch_size, 32)
        args.log_every = 1
    args.size = args.size or ("base" if args.device.type == "cuda" else "small")
    if args.teacher_epochs is None:
        args.teacher_epochs = 2 if (args.models == "timm" or args.teacher_weights) else 10
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.synthetic:
        train, test = synthetic_cifar10(args.synthetic_size)
    else:
        if args.download:
            download_cifar10(args.data_dir)
        train, test = load_cifar10(args.data_dir)
    if args.train_size:
        train = (train[0][: args.train_size], train[1][: args.train_size])
    print(f"models: {args.models}" + (f" ({args.size})" if args.models == "transformers" else "")
          + f"; {len(train[1])} training / {len(test[1])} test images{' (synthetic)' if args.synthetic else ''}; {args.device}")

    teacher, pretrained = build_teacher(args)
    teacher = teacher.to(args.device)
    train_teacher(teacher, pretrained, train, args)
    teacher_acc = evaluate(teacher, test, args)
    print(f"teacher test accuracy: {100 * teacher_acc:.2f}%")

    student = build_student(args).to(args.device)
    rows = train_student(student, teacher, train, test, args, teacher_acc)
    write_csv(rows, os.path.join(args.out, "accuracy.csv"))
    plot(rows, os.path.join(args.out, "accuracy.png"), args)
    print(f"wrote {args.out}/accuracy.csv and accuracy.png")
    return rows


if __name__ == "__main__":
    main()
