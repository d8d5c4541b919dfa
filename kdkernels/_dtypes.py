"""The precision losses are accumulated in."""

import torch


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 whatever the input dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
