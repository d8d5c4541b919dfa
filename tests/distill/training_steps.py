"""A few optimiser steps on a loss, for the tests that check training lowers it."""

from __future__ import annotations

from typing import Callable

import torch


def loss_before_and_after(total: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int):
    """``(first, last)``: ``total()`` (a fresh forward returning the scalar loss) before the first
    of ``steps`` optimiser steps on it, detached, and after the last."""
    first = total().detach()
    for _ in range(steps):
        optimizer.zero_grad()
        total().backward()
        optimizer.step()
    return first, total()
