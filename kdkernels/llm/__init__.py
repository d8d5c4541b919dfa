"""kdkernels.llm: pieces for distilling language models at scale.

:mod:`kdkernels.llm.topk_store` keeps a teacher's top-k token ids and log-probabilities on disk, so a
teacher runs over a corpus once and every student epoch reads compact, checksummed targets.
"""

from kdkernels.llm.topk_store import (
    CorruptStoreError,
    TopKBatch,
    TopKTeacherStore,
    TopKTeacherWriter,
    write_teacher_topk,
)

__all__ = ["CorruptStoreError", "TopKBatch", "TopKTeacherStore", "TopKTeacherWriter", "write_teacher_topk"]
