"""kdkernels.llm: pieces for distilling language models at scale.

:mod:`kdkernels.llm.topk_store` keeps a teacher's top-k token ids and log-probabilities on disk, so a
teacher runs over a corpus once and every student epoch reads compact, checksummed targets. :mod:`kdkernels.llm.losses` has the divergence
family (:func:`distill_loss`, TRL's :func:`generalized_jsd_loss`), :mod:`kdkernels.llm.modules` their
modules, :mod:`kdkernels.llm.hf` the Hugging Face ``Trainer`` integration (imported lazily).
"""

from kdkernels.llm.losses import distill_loss, generalized_jsd_loss
from kdkernels.llm.modules import DistillLoss, GeneralizedJSDLoss
from kdkernels.llm.topk_store import (
    CorruptStoreError,
    TopKBatch,
    TopKTeacherStore,
    TopKTeacherWriter,
    write_teacher_topk,
)

__all__ = [
    "distill_loss",
    "generalized_jsd_loss",
    "DistillLoss",
    "GeneralizedJSDLoss",
    "CorruptStoreError",
    "TopKBatch",
    "TopKTeacherStore",
    "TopKTeacherWriter",
    "write_teacher_topk",
]
