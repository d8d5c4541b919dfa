"""kdkernels: fused knowledge-distillation losses (Triton, CUDA, CPU) and a thin distiller framework.

Public API:
    kdkernels.functional  -- loss functions (kd_loss, kl_div, ...)
    kdkernels.nn          -- the matching nn.Module losses (KDLoss, KLDivLoss, ...)
    kdkernels.backends    -- available(device), use_backend(name)
    kdkernels.ofd_margin  -- the Overhaul-of-Feature-Distillation margins from a teacher BN
    kdkernels.distill     -- feature capture, methods, Distiller
"""

from kdkernels import backends, functional, nn
from kdkernels.backends import use_backend
from kdkernels.ofd_margin import ofd_margin, ofd_margin_from_affine

__version__ = "0.1.0"

__all__ = ["backends", "functional", "nn", "ofd_margin", "ofd_margin_from_affine", "use_backend", "__version__"]
