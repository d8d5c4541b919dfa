"""kdkernels.llm: pieces for distilling language models at scale.

:mod:`kdkernels.llm.topk_store` keeps a teacher's top-k token ids and log-probabilities on disk, so a
teacher runs over a corpus once and every student epoch reads compact, checksummed targets. :mod:`kdkernels.llm.losses` has the divergence
family (:func:`distill_loss`, TRL's :func:`generalized_jsd_loss`), :mod:`kdkernels.llm.fused_linear` the same
from hidden states and LM heads without the logits (:func:`fused_linear_distill_loss`), :mod:`kdkernels.llm.vocab_parallel` the same over
logits sharded along the vocabulary across ranks, :mod:`kdkernels.llm.modules` their
modules, :mod:`kdkernels.llm.hf` the Hugging Face ``Trainer`` integration (imported lazily).
"""

from kdkernels.llm.fused_linear import fused_linear_distill_loss
from kdkernels.llm.losses import distill_loss, generalized_jsd_loss
from kdkernels.llm.modules import DistillLoss, FusedLinearDistillLoss, GeneralizedJSDLoss
from kdkernels.llm.vocab_parallel import vocab_parallel_distill_loss

# The store (numpy, file I/O) loads on first use: ``import kdkernels`` pulls in the losses
# (``kdkernels.functional.distill_loss``) and should not need more.
_STORE_NAMES = ("CorruptStoreError", "TopKBatch", "TopKTeacherStore", "TopKTeacherWriter", "write_teacher_topk")


def __getattr__(name: str):
    if name in _STORE_NAMES:
        from kdkernels.llm import topk_store

        return getattr(topk_store, name)
    raise AttributeError(f"module 'kdkernels.llm' has no attribute {name!r}")

__all__ = [
    "distill_loss",
    "fused_linear_distill_loss",
    "vocab_parallel_distill_loss",
    "generalized_jsd_loss",
    "DistillLoss",
    "FusedLinearDistillLoss",
    "GeneralizedJSDLoss",
    "CorruptStoreError",
    "TopKBatch",
    "TopKTeacherStore",
    "TopKTeacherWriter",
    "write_teacher_topk",
]
