"""The op layer: torch.library ops (kernel ops per backend, one differentiable op per loss)."""
