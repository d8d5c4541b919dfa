"""The op layer: one declaration per fused loss (``kdkernels/ops/<loss>.py``, a
:class:`kdkernels.ops.fused_loss.FusedLoss`), from which its torch.library ops, fakes, autograd
and backend dispatch follow; the references in ``reference/``, the Triton kernels in ``triton/``."""
