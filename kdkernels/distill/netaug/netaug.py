"""NetAug training: Cai et al., "Network Augmentation for Tiny Deep Learning" (ICLR 2022); code
mit-han-lab/tinyml ``netaug/train.py`` (``train_one_epoch``, ``train``) and ``configs/netaug.yaml``.

Per step, with the base network W_base inside an augmented supernet [W_base, W_aug]:

    L = L(W_base) + α · L([W_base, W_aug])

computed as two forward/backward passes whose gradients add up (the official code: base subnet
``"min"``, backward under DDP ``no_sync``; then one randomly sampled augmented subnet, backward;
then one optimiser step), so α = 1 is the official, implicit weight.
"""

from __future__ import annotations

import contextlib
import math
from numbers import Real
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.netaug.supernet import Supernet

EPOCH_MODES = ("default", "min_w")


class NetAugStep(NamedTuple):
    """What :meth:`NetAug.train_step` returns: the base network's output and the (detached)
    losses ``{"base": L(W_base), "augmented": α·L([W_base, W_aug])}``; the widths of the sampled
    subnet are in ``widths``."""

    output: Any
    losses: dict[str, torch.Tensor]
    widths: dict[str, int]


def _check_number(name: str, value, *, minimum: float = 0.0, integer: bool = False):
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value >= minimum
    if ok and integer and int(value) != value:
        ok = False
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"NetAug: {name}: expected {kind} >= {minimum:g}, got {value!r}")
    return int(value) if integer else float(value)


class NetAug(nn.Module):
    """Trains a tiny network inside wider ones that share its weights.

    Paper: Cai et al., ICLR 2022. Loss per step: ``L(W_base) + α·L([W_base, W_aug])`` with α = 1
    (``aug_weight``; the official code's implicit weight: the two gradients are accumulated) and
    ``L`` the CE with label smoothing 0.1 (override with ``loss_fn``). The augmented term is a
    second full task loss, so the gradient on the base weights is the sum of two task-loss
    gradients (at α = 1 about twice that of plain training); α was not tuned in the paper's code,
    whose recipe is ImageNet at 160 px, base_lr 0.025 per GPU, batch 128, wd 4e-5, 150 + 5
    warm-up epochs.

    Args:
        model: the base network (MobileNetV2-style; see :class:`Supernet`), or a ready ``Supernet``.
        epochs: the number of training epochs, warm-up included (official 155).
        width_mults: official ``(1.0, 1.8, 2.6)`` (MobileNetV2-0.35, TinyMobileNetV2).
        expand_mults: official ``(1.0, 1.6, 2.2, 2.8)``.
        stop_width_aug_epochs: width augmentation stops for the last K epochs; expand ratios stay
            random to the end (official 75 of 155; default ``epochs // 2``, "the second half").
        aug_weight: α (default 1).
        label_smoothing: of the default loss (official 0.1).
        sort_channels: sort the inner channels of the inverted blocks by L1 importance at the start
            of every epoch that augments widths (official ``sort_channel: true``).
        loss_fn: ``loss_fn(output, target)``; default CE with ``label_smoothing``.
        generator: draws the augmented subnets; under DDP seed it alike on every rank.
        blocks, keep_width: passed to :class:`Supernet`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        epochs: int,
        width_mults: Sequence[float] = (1.0, 1.8, 2.6),
        expand_mults: Sequence[float] = (1.0, 1.6, 2.2, 2.8),
        stop_width_aug_epochs: int | None = None,
        aug_weight: float = 1.0,
        label_smoothing: float = 0.1,
        sort_channels: bool = True,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        blocks: Mapping[str, bool] | None = None,
        keep_width: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.epochs = _check_number("epochs", epochs, minimum=1, integer=True)
        if stop_width_aug_epochs is None:
            stop_width_aug_epochs = self.epochs // 2
        self.stop_width_aug_epochs = _check_number("stop_width_aug_epochs", stop_width_aug_epochs, integer=True)
        if self.stop_width_aug_epochs > self.epochs:
            raise ValueError(f"NetAug: stop_width_aug_epochs: {stop_width_aug_epochs} is more than epochs={epochs}")
        self.aug_weight = _check_number("aug_weight", aug_weight)
        self.label_smoothing = _check_number("label_smoothing", label_smoothing)
        if self.label_smoothing > 1:
            raise ValueError(f"NetAug: label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"NetAug: loss_fn: expected a callable (output, target) -> loss, got {type(loss_fn).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"NetAug: generator: expected a torch.Generator, got {type(generator).__name__}")
        if isinstance(model, Supernet):
            self.supernet = model
        else:
            self.supernet = Supernet(model, width_mults=width_mults, expand_mults=expand_mults, blocks=blocks, keep_width=keep_width)
        self.sort = bool(sort_channels)
        self.loss_fn = loss_fn
        self.generator = generator
        self.epoch_mode = "default"

    def forward(self, *args, **kwargs):
        """The active configuration (the base network outside :meth:`train_step`)."""
        return self.supernet(*args, **kwargs)

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        return F.cross_entropy(output, target, label_smoothing=self.label_smoothing)

    # --- schedule -----------------------------------------------------------------------------------

    def mode(self, epoch: int) -> str:
        """``"default"`` (widths and expand ratios random) or ``"min_w"`` (base widths, random
        expand ratios) for 0-based ``epoch``: ``"min_w"`` once ``epochs − epoch ≤ stop_width_aug_epochs``."""
        epoch = _check_number("epoch", epoch, integer=True)
        if epoch >= self.epochs:
            raise ValueError(f"NetAug: epoch: expected 0 <= epoch < epochs={self.epochs}, got {epoch}")
        return "min_w" if self.epochs - epoch <= self.stop_width_aug_epochs else "default"

    def start_epoch(self, epoch: int) -> str:
        """Call at the start of every epoch: sets the augmentation mode and, in ``"default"``
        epochs with ``sort_channels``, sorts the channels. Returns the mode."""
        self.epoch_mode = self.mode(epoch)
        if self.sort and self.epoch_mode == "default":
            self.supernet.sort_channels()
        return self.epoch_mode

    # --- one step -----------------------------------------------------------------------------------

    def train_step(self, x, target: torch.Tensor, optimizer: torch.optim.Optimizer, *, ddp: nn.Module | None = None) -> NetAugStep:
        """Zero the gradients; base forward/backward; one augmented subnet forward/backward; one
        ``optimizer.step()``. Under DDP pass the wrapper, ``DDP(netaug)``, as ``ddp``: the forwards
        go through it and the first backward runs under ``ddp.no_sync()``, so the gradients are
        all-reduced once, after both passes. The base configuration is active afterwards."""
        model = self if ddp is None else ddp
        if ddp is not None and getattr(ddp, "module", None) is not self:
            raise ValueError("NetAug: ddp: expected the DistributedDataParallel wrapper of this NetAug (DDP(netaug))")
        optimizer.zero_grad(set_to_none=True)
        self.supernet.set_active("min")
        sync = ddp.no_sync() if ddp is not None else contextlib.nullcontext()
        with sync:
            output = model(x)
            base = self.loss(output, target)
            base.backward()
        mode = "random" if self.epoch_mode == "default" else self.epoch_mode
        widths = self.supernet.set_active(mode, generator=self.generator)
        try:
            augmented = self.aug_weight * self.loss(model(x), target)
            augmented.backward()
        finally:
            self.supernet.set_active("min")
        optimizer.step()
        return NetAugStep(output, {"base": base.detach(), "augmented": augmented.detach()}, widths)

    # --- evaluation and export ----------------------------------------------------------------------

    def reset_bn(self, batches: Iterable, forward=None) -> int:
        """Re-estimate the base network's BN statistics on ``batches`` (official: before every
        evaluation, on a 16k-image training subset). See :meth:`Supernet.reset_bn`."""
        self.supernet.set_active("min")
        return self.supernet.reset_bn(batches, forward)

    def export(self) -> nn.Module:
        """The base network as a plain module (see :meth:`Supernet.export`)."""
        return self.supernet.export()
