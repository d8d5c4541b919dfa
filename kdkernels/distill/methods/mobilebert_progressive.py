"""MobileBERT's progressive layer-wise knowledge transfer schedule (stage 1): Sun et al., ACL 2020;
code google-research ``mobilebert/distill_util.py`` (``layer_wise_learning_rate``,
``get_background_lr``), ``optimization.py`` (``LAMBOptimizer``) and ``run_pretraining.py``.

The T stage-1 steps are cut into L phases of P = T // L steps. At global step s (the number of
optimiser steps already taken, as TensorFlow's ``global_step``), layer ℓ (0-based) has the phase
multiplier

    m_ℓ(s) = 0 if s ≤ ℓP,    1 if ℓP < s ≤ (ℓ+1)P,    0.1 otherwise

(``tf.train.piecewise_constant`` with boundaries [ℓP, (ℓ+1)P] and values [0, 1, 0.1]: the
boundaries belong to the left interval). Layer ℓ's transfer losses count only while m_ℓ = 1
(the binary gate); its parameters learn at ``lr · 3 · b(s) · m_ℓ(s)``, so layers below the
current one keep learning at a tenth of the rate and layers above it are frozen. Everything
outside the encoder layers (embeddings, heads) gets learning rate 0 in stage 1. b(s) is the
official periodic warm-up ``min(0.1·(1 − t/P)^½ + 0.9, 10·t/P)`` with t = s mod P.

Deviation: the official LAMB also resets a layer's Adam moments while its multiplier is 0; a
PyTorch optimiser with lr 0 keeps its moments.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Iterable, Sequence

import torch
from torch import nn

from kdkernels.distill.method import check_same_shape
from kdkernels.distill.methods.mobilebert import (
    attention_transfer_loss,
    check_gates,
    feature_map_transfer_loss,
    gated_layer_mean,
    mean_variance_transfer_loss,
)

PHASE_VALUES = (0.0, 1.0, 0.1)  # before, during, after a layer's phase


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"LayerwiseTransferSchedule: {name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


class LayerwiseTransferSchedule:
    """Per-step layer gates and learning-rate multipliers of MobileBERT's progressive transfer.

    Args:
        num_layers: L, the number of transferred layers.
        total_steps: T, the stage-1 steps (official 240000 distillation steps, L = 24); the phase
            length is ``T // L`` and must be at least 1.
        lr_scale: the factor on the per-layer multiplier (official 3).
        background_warmup: apply the official periodic warm-up b(s) inside every phase (default
            True); False gives ``lr_scale · m_ℓ(s)``.
    """

    def __init__(self, *, num_layers: int, total_steps: int, lr_scale: float = 3.0, background_warmup: bool = True) -> None:
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        if self.total_steps < self.num_layers:
            raise ValueError(
                f"LayerwiseTransferSchedule: total_steps: {total_steps} steps cannot give each of the {num_layers} layers a phase"
            )
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not math.isfinite(lr_scale) or lr_scale < 0:
            raise ValueError(f"LayerwiseTransferSchedule: lr_scale: expected a finite number >= 0, got {lr_scale!r}")
        self.lr_scale = float(lr_scale)
        self.background_warmup = bool(background_warmup)
        self.steps_per_phase = self.total_steps // self.num_layers

    def _step(self, step) -> int:
        return _check_int("step", step, 0)

    def phase(self, step: int) -> int:
        """The layer whose phase holds ``step`` (−1 before the first phase, L once all are done)."""
        step = self._step(step)
        return -1 if step == 0 else min((step - 1) // self.steps_per_phase, self.num_layers)

    def phase_multipliers(self, step: int) -> list[float]:
        """m_ℓ(s) ∈ {0, 1, 0.1} for every layer."""
        step, p = self._step(step), self.steps_per_phase
        return [PHASE_VALUES[0] if step <= l * p else PHASE_VALUES[1] if step <= (l + 1) * p else PHASE_VALUES[2] for l in range(self.num_layers)]

    def loss_gates(self, step: int) -> list[float]:
        """1 for the layer in its phase, 0 for the others (the official binary gate m > 0.5)."""
        return [1.0 if m > 0.5 else 0.0 for m in self.phase_multipliers(step)]

    def background(self, step: int) -> float:
        """The official periodic warm-up b(s) (1 with ``background_warmup=False``)."""
        step, p = self._step(step), self.steps_per_phase
        if not self.background_warmup or p <= 1:
            return 1.0
        t = (step % p) / p
        return min(0.1 * math.sqrt(1.0 - t) + 0.9, 10.0 * t)

    def lr_multipliers(self, step: int) -> list[float]:
        """``lr_scale · b(s) · m_ℓ(s)`` for every layer; the rest of the model gets 0."""
        scale = self.lr_scale * self.background(step)
        return [scale * m for m in self.phase_multipliers(step)]

    # --- wiring to a PyTorch optimiser and to the gated methods ---------------------------------------

    def param_groups(self, model: nn.Module, layer_prefix: str, lr: float) -> list[dict]:
        """Optimiser parameter groups: one per layer ``{layer_prefix}.{ℓ}`` (``"layer": ℓ``) and
        one for everything else (``"layer": None``), each with ``"base_lr": lr``."""
        layers = {}
        rest = []
        prefix = layer_prefix + "."
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                if index.isdigit():
                    layers.setdefault(int(index), []).append(param)
                    continue
            rest.append(param)
        found = sorted(layers)
        if found != list(range(self.num_layers)):
            raise ValueError(
                f"LayerwiseTransferSchedule: layer_prefix: expected parameters under {layer_prefix}.0 … "
                f"{layer_prefix}.{self.num_layers - 1}, found layers {found}"
            )
        groups = [{"params": layers[l], "layer": l, "lr": 0.0, "base_lr": lr} for l in found]
        if rest:
            groups.append({"params": rest, "layer": None, "lr": 0.0, "base_lr": lr})
        return groups

    def apply(self, step: int, *, optimizer: torch.optim.Optimizer | None = None, methods: Iterable = ()) -> None:
        """Set ``optimizer``'s group learning rates (groups from :meth:`param_groups`) and the
        ``layer_gates`` of the gated MobileBERT methods for global step ``step``."""
        if optimizer is not None:
            lr_mult = self.lr_multipliers(step)
            for group in optimizer.param_groups:
                if "layer" not in group or "base_lr" not in group:
                    raise ValueError("LayerwiseTransferSchedule: optimizer: its parameter groups must come from param_groups()")
                group["lr"] = 0.0 if group["layer"] is None else group["base_lr"] * lr_mult[group["layer"]]
        gates = self.loss_gates(step)
        for method in methods:
            method.set_layer_gates(gates)


def progressive_transfer_losses(
    student_hiddens: Sequence[torch.Tensor],
    teacher_hiddens: Sequence[torch.Tensor],
    student_scores: Sequence[torch.Tensor],
    teacher_scores: Sequence[torch.Tensor],
    gates: Sequence[float],
    *,
    hidden_weight: float = 100.0,
    attention_weight: float = 1.0,
    mean_weight: float = 5000.0,
    variance_weight: float = 5.0,
) -> dict[str, torch.Tensor]:
    """The stage-1 total as named parts, each Σ_ℓ g_ℓ·loss_ℓ / L times its README factor:
    ``feature_map`` (100), ``attention`` (1), ``mean`` (5000), ``variance`` (5). There is no MLM
    term in this stage. Inputs: per-layer hidden states (B, S, H) and pre-softmax attention
    scores (B, heads, S, S) of student and teacher (empty score lists: no attention term)."""
    layers = len(student_hiddens)
    if not layers or len(teacher_hiddens) != layers or len(student_scores) != len(teacher_scores) or len(student_scores) not in (0, layers):
        raise ValueError(
            f"progressive_transfer_losses: expected L student and L teacher hidden states and L (or 0) score tensors per side, got "
            f"{len(student_hiddens)}, {len(teacher_hiddens)}, {len(student_scores)}, {len(teacher_scores)}"
        )
    gates = check_gates("progressive_transfer_losses", gates, layers)
    for s, t in zip(student_hiddens, teacher_hiddens):
        check_same_shape("progressive_transfer_losses", "hidden states", s, t, "student and teacher share the inter-block width")
    for s, t in zip(student_scores, teacher_scores):
        check_same_shape("progressive_transfer_losses", "attention scores", s, t, "same heads and sequence length")
    moments = [mean_variance_transfer_loss(s, t) for s, t in zip(student_hiddens, teacher_hiddens)]
    losses = {"feature_map": hidden_weight * gated_layer_mean([feature_map_transfer_loss(s, t) for s, t in zip(student_hiddens, teacher_hiddens)], gates)}
    if student_scores:
        losses["attention"] = attention_weight * gated_layer_mean([attention_transfer_loss(s, t) for s, t in zip(student_scores, teacher_scores)], gates)
    losses["mean"] = mean_weight * gated_layer_mean([m for m, _ in moments], gates)
    losses["variance"] = variance_weight * gated_layer_mean([v for _, v in moments], gates)
    return losses
