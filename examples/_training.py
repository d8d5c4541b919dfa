"""What several examples' training loops do alike: the stream of shuffled minibatch indices and the
optional progress bar.

Not an example itself. An example imports it as a sibling module: ``python examples/<name>.py``
puts ``examples/`` first on ``sys.path``.
"""

from __future__ import annotations

import torch


def batches(count: int, batch: int, steps: int, seed: int):
    """``steps`` index tensors of ``batch`` samples out of ``count``: shuffled epochs (a fresh
    permutation from ``seed``'s generator whenever fewer than ``batch`` are left), back to back."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(count, generator=g)])
        yield order[:batch]
        order = order[batch:]


def progress(iterable, total: int, desc: str, quiet: bool):
    """``iterable`` behind a tqdm bar that clears when done, or as it is with ``quiet``."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)
