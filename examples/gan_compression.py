"""GAN Compression's distillation on a paired image-to-image task, offline (Li et al., CVPR 2020).

Data (pix2pix style, generated here): the input is a one-hot label map of shapes (background,
disc, square, triangle); the target is a rendered image of it: each class has its colour, shaded
darker towards its edges, with soft shadows on the background. The target is a local function of
the label map, so a convolutional generator can learn it.

Models: pix2pix ResNet generators (reflection pad, 7×7 conv, two stride-2 downsamplings, residual
blocks, two transposed-conv upsamplings, instance norm, tanh). The teacher (ngf 32) is trained
pix2pix-style (λ_recon = 100 · L1 + hinge cGAN against a PatchGAN). The narrower student (ngf 8)
is then trained twice per seed, from the same initial weights and for the same steps:

    without distillation   cGAN + λ_recon L1                       (pix2pix on the small generator)
    with distillation      cGAN + λ_recon L1 + λ_distill Σ_k MSE(f_k(G'_k(x)), G_k(x))

with GAN Compression's defaults (λ_recon = 100, λ_distill = 1, hinge, D Adam 2e-4, β₁ = 0.5) on
the last downsampling ReLU and the outputs of residual blocks 3 and 6 (``model.9``, ``model.12``,
``model.15``). Reports L1, PSNR and SSIM on a test set (torchmetrics; images in [0, 1]), and
writes ``results.json``, ``table.md`` and ``grid.png`` (input, target, teacher, both students)
under ``--out``.

    python examples/gan_compression.py                 # the full default run (minutes on 2 cores)
    python examples/gan_compression.py --synthetic     # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_run_flags, json_args, save_figure, spread, write_results
from _training import batches, progress
from kdkernels.distill import AdversarialTrainer, Distiller, GANCompressionDistillation, generator_parameters
from kdkernels.distill.discriminators import PatchDiscriminator
from kdkernels.distill.methods.gan_compression import discriminator_gan_loss, generator_gan_loss

CLASS_COLOURS = torch.tensor([[0.55, 0.75, 0.45], [0.85, 0.25, 0.2], [0.2, 0.35, 0.8], [0.95, 0.75, 0.15]])
LABEL_PALETTE = torch.tensor([[0.15, 0.15, 0.15], [0.95, 0.95, 0.95], [0.6, 0.6, 0.6], [0.35, 0.35, 0.35]])  # grid display only
BLOCKS = 6
MAPPING_LAYERS = ["model.9", "model.12", "model.15"]  # last downsampling ReLU, residual blocks 3 and 6


# --- data ---------------------------------------------------------------------------------------


def make_pairs(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 4, size, size) one-hot label maps and (count, 3, size, size) target images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    labels = torch.zeros(count, size, size, dtype=torch.long)
    for n in range(count):
        for _ in range(int(u(1) * 3) + 1):
            kind = int(u(1) * 3) + 1
            r = size * (0.12 + 0.14 * u(1))
            cy, cx = r + (size - 2 * r) * u(1), r + (size - 2 * r) * u(1)
            dy, dx = ys - cy, xs - cx
            if kind == 1:
                mask = dy**2 + dx**2 <= r**2
            elif kind == 2:
                mask = (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
            else:
                mask = (dy <= r * 0.6) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.62)
            labels[n][mask] = kind
    one_hot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    # Rendering: class colour, darker near a region's edge (a blurred copy of its own mask), and
    # a soft shadow of the shapes on the background.
    blur = lambda t, k: F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="replicate"), k, stride=1)  # noqa: E731
    inside = (blur(one_hot, 5) * one_hot).sum(1, keepdim=True)  # 1 deep inside, ~0.5 at edges
    colour = torch.einsum("bchw,cd->bdhw", one_hot, CLASS_COLOURS)
    shadow = blur(1 - one_hot[:, :1], 7) * one_hot[:, :1]
    image = colour * (0.45 + 0.55 * inside) * (1 - 0.6 * shadow)
    return one_hot, image.clamp(0, 1) * 2 - 1


# --- models -------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """pix2pix's ResnetGenerator (instance norm, no dropout); ``model.9`` is the last downsampling
    ReLU and ``model.{9 + k}`` the output of residual block k."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3, ngf: int = 32, blocks: int = BLOCKS) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResidualBlock(4 * ngf) for _ in range(blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def make_discriminator(d_channels: int) -> nn.Module:
    return PatchDiscriminator(4 + 3, base_channels=d_channels, layers=2)


def train_teacher(x, y, steps: int, batch: int, ngf: int, d_channels: int, quiet: bool) -> nn.Module:
    """pix2pix: 100 · L1 + hinge cGAN, D on [input, image]; both Adam 2e-4, β₁ = 0.5."""
    torch.manual_seed(0)
    teacher, critic = ResnetGenerator(ngf=ngf), make_discriminator(d_channels)
    opt_g = torch.optim.Adam(teacher.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for idx in progress(batches(len(x), batch, steps, seed=0), steps, "teacher", quiet):
        fake = teacher(x[idx])
        opt_d.zero_grad(set_to_none=True)
        d_fake, d_real = critic(torch.cat([x[idx], fake.detach()], 1)), critic(torch.cat([x[idx], y[idx]], 1))
        (0.5 * (discriminator_gan_loss(d_fake, False, "hinge") + discriminator_gan_loss(d_real, True, "hinge"))).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        for p in critic.parameters():
            p.requires_grad_(False)
        loss = generator_gan_loss(critic(torch.cat([x[idx], fake], 1)), "hinge") + 100.0 * F.l1_loss(fake, y[idx])
        loss.backward()
        for p in critic.parameters():
            p.requires_grad_(True)
        opt_g.step()
    return teacher.eval()


def train_student(distill: bool, teacher, x, y, steps: int, batch: int, seed: int, ngf: int, teacher_ngf: int, d_channels: int, quiet: bool) -> nn.Module:
    torch.manual_seed(1000 + seed)  # the same initial student (and discriminator) with and without distillation
    student = ResnetGenerator(ngf=ngf)
    method = GANCompressionDistillation(
        MAPPING_LAYERS, MAPPING_LAYERS, student_channels=4 * ngf, teacher_channels=4 * teacher_ngf,
        discriminator=make_discriminator(d_channels), distill_weight=1.0 if distill else 0.0,
    )
    distiller = Distiller(student, teacher, [method])
    optimizer = torch.optim.Adam(generator_parameters(distiller), lr=2e-4, betas=(0.5, 0.999))
    trainer = AdversarialTrainer(distiller, optimizer)
    distiller.train()
    label = "with distillation" if distill else "without distillation"
    for idx in progress(batches(len(x), batch, steps, seed=seed), steps, f"student {label} (seed {seed})", quiet):
        trainer.step(x[idx], y[idx])
    distiller.remove_hooks()
    return student.eval()


@torch.no_grad()
def generate(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = (prediction + 1) / 2, (target + 1) / 2  # [0, 1]
    return {
        "l1": F.l1_loss(p, t).item(),
        "psnr": peak_signal_noise_ratio(p, t, data_range=1.0).item(),
        "ssim": structural_similarity_index_measure(p, t, data_range=1.0).item(),
    }


def save_grid(path: Path, x, y, outputs: dict[str, torch.Tensor], count: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["input (labels)", "target"] + list(outputs)
    fig, axes = plt.subplots(count, len(columns), figsize=(1.7 * len(columns), 1.7 * count), squeeze=False)
    for row in range(count):
        panels = [torch.einsum("chw,cd->hwd", x[row], LABEL_PALETTE)]
        panels += [((img[row] + 1) / 2).permute(1, 2, 0) for img in [y] + list(outputs.values())]
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel.clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser, seeds=2, out="examples/out/gan_compression")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=600)
    parser.add_argument("--test-pairs", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher-ngf", type=int, default=32)
    parser.add_argument("--student-ngf", type=int, default=8)
    parser.add_argument("--d-channels", type=int, default=32)
    args = parser.parse_args(argv)
    if args.synthetic:
        args.seeds, args.size, args.train_pairs, args.test_pairs = 1, 16, 8, 6
        args.teacher_steps, args.student_steps, args.batch, args.teacher_ngf, args.student_ngf, args.d_channels = 2, 2, 4, 8, 4, 8
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    train_x, train_y = make_pairs(args.train_pairs, args.size, seed=1)
    test_x, test_y = make_pairs(args.test_pairs, args.size, seed=2)
    teacher = train_teacher(train_x, train_y, args.teacher_steps, args.batch, args.teacher_ngf, args.d_channels, args.quiet)
    teacher_out = generate(teacher, test_x)
    results = {"teacher": metrics(teacher_out, test_y), "students": {"without distillation": [], "with distillation": []}}
    shown = {f"teacher (ngf {args.teacher_ngf})": teacher_out}
    for seed in range(args.seeds):
        for distill, key in ((False, "without distillation"), (True, "with distillation")):
            student = train_student(distill, teacher, train_x, train_y, args.student_steps, args.batch, seed, args.student_ngf, args.teacher_ngf, args.d_channels, args.quiet)
            out = generate(student, test_x)
            results["students"][key].append(metrics(out, test_y))
            if seed == 0:
                shown[f"student {key}"] = out
    results["seconds"] = time.time() - start
    results["parameters"] = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in ResnetGenerator(ngf=args.student_ngf).parameters()),
    }
    results["args"] = json_args(args)

    def cell(runs: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        return f"{format(statistics.mean(values), fmt)} ± {format(spread(values), fmt)}"

    rows = [f"| teacher (ngf {args.teacher_ngf}, {results['parameters']['teacher'] / 1e6:.2f} M) | {results['teacher']['l1']:.4f} | {results['teacher']['psnr']:.2f} | {results['teacher']['ssim']:.3f} |"]
    for key, runs in results["students"].items():
        rows.append(f"| student (ngf {args.student_ngf}, {results['parameters']['student'] / 1e6:.3f} M) {key} | {cell(runs, 'l1', '.4f')} | {cell(runs, 'psnr', '.2f')} | {cell(runs, 'ssim', '.3f')} |")
    table = "| generator | test L1 ↓ | PSNR dB ↑ | SSIM ↑ |\n|---|---|---|---|\n" + "\n".join(rows)
    write_results(args.out, results, table)
    save_grid(args.out / "grid.png", test_x, test_y, shown, count=min(6, len(test_x)))
    return results


if __name__ == "__main__":
    main()
