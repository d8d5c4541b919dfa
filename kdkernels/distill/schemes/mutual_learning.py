"""Deep mutual learning: Zhang et al., "Deep Mutual Learning" (CVPR 2018); code
YingZhangDUT/Deep-Mutual-Learning ``train_models.py``.

K peers learn together; peer k's loss is

    L_k = CE(y, p_k) + c · Σ_{l≠k} KL(p_l ‖ p_k),      p = softmax(z) (T = 1)

with the peers' predictions detached (the official code updates only net k's variables for L_k).
c = 1 is the official code (``peer_reduction="sum"``, default); c = 1/(K−1) is the paper
(``"mean"``). Every peer is updated.

Deviation: all peers are updated from one forward pass (``total = Σ_k L_k``, one backward; the
gradients of L_k reach only peer k, so one optimiser over all peers or one per peer give the same
step). The paper's Algorithm 1 and the official loop recompute predictions after each peer's
update.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill.distiller import DistillOutput, total_loss
from kdkernels.functional.kd_loss import kd_loss

PEER_REDUCTIONS = ("sum", "mean")


def mutual_learning_losses(
    logits: Sequence[torch.Tensor], target: torch.Tensor, peer_reduction: str = "sum", label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """``{"peer{k}/ce": CE_k, "peer{k}/kl": c·Σ_{l≠k} KL(p_l ‖ p_k)}`` for (B, C) logits of K peers."""
    scale = 1.0 if peer_reduction == "sum" else 1.0 / (len(logits) - 1)
    losses = {}
    for k, z_k in enumerate(logits):
        losses[f"peer{k}/ce"] = F.cross_entropy(z_k, target, label_smoothing=label_smoothing)
        kl = 0.0
        for l, z_l in enumerate(logits):
            if l != k:
                kl = kl + kd_loss(z_k, z_l.detach(), 1.0, reduction="batchmean")
        losses[f"peer{k}/kl"] = scale * kl
    return losses


class MutualLearning(nn.Module):
    """K ≥ 2 peers trained together; ``parameters()`` covers them all.

    Args:
        peers: the models; each returns (B, C) logits.
        peer_reduction (keyword-only, as the rest): ``"sum"`` (official code, default) or ``"mean"`` (paper, 1/(K−1)).
        label_smoothing: of the CE (the official code's flag, default 0).
    """

    def __init__(self, peers: Sequence[nn.Module], *, peer_reduction: str = "sum", label_smoothing: float = 0.0) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"peers: mutual learning needs at least 2 peers, got {len(peers)}")
        if peer_reduction not in PEER_REDUCTIONS:
            raise ValueError(f"peer_reduction: expected one of {PEER_REDUCTIONS}, got {peer_reduction!r}")
        self.peers = nn.ModuleList(peers)
        self.peer_reduction, self.label_smoothing = peer_reduction, float(label_smoothing)

    def forward(self, x: Any, target: torch.Tensor, **kwargs: Any) -> DistillOutput:
        """``student_output`` is the list of the peers' logits."""
        logits = [peer(x, **kwargs) for peer in self.peers]
        losses = mutual_learning_losses(logits, target, self.peer_reduction, self.label_smoothing)
        return DistillOutput(logits, losses, total_loss(losses))
