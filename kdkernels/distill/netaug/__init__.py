"""NetAug (Cai et al., ICLR 2022): dynamic-width layers, the supernet built from an existing
model, and the two-pass training step with its schedule."""

from kdkernels.distill.netaug.dynamic_layers import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear
from kdkernels.distill.netaug.netaug import NetAug, NetAugStep
from kdkernels.distill.netaug.supernet import Supernet, make_divisible

__all__ = ["DynamicBatchNorm2d", "DynamicConv2d", "DynamicLinear", "NetAug", "NetAugStep", "Supernet", "make_divisible"]
