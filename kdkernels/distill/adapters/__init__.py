"""Task adapters: pull tensors out of unmodified third-party models (forward hooks only)."""

from kdkernels.distill.adapters.huggingface_bert import BertFeatures

__all__ = ["BertFeatures"]
