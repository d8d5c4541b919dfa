"""One table of the five fused losses, for the tests that apply to all of them (NaN/inf rules,
higher-order autograd, float64 precision, version counters).

Each :class:`FusedLoss` knows how to make inputs in each of its layouts, how to call the public
function, and the float64 reference (``kdkernels.ops.reference``, where the non-finite rules are
written down). A :class:`Case` is one set of inputs: the differentiable tensors, the constants, and
where its positions / classes are, so a test can put a NaN or an inf at a chosen place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import kdkernels
from tests.conftest import backend_params
import kdkernels.functional as KF
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference
from kdkernels.ops.reference.kd_loss import kd_loss_reference
from kdkernels.ops.reference.kl_div import kl_div_reference
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_reference
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_reference

# Backends to run on this machine (Triton through the interpreter without a GPU).
BACKENDS = [b for b in ("cpu", "triton", "torch") if b in kdkernels.backends.available("cpu")]
# The same as pytest params, with the backends that cannot run here as skips that say why.
BACKEND_PARAMS = backend_params("cpu", ("cpu", "triton", "torch"))
FUSED_BACKEND_PARAMS = backend_params("cpu", ("cpu", "triton"))
# Long rows: more classes than the kernels' class block (CPU 2048, Triton's resident rows 4096).
LONG = 4100


@dataclasses.dataclass
class Case:
    inputs: list  # differentiable tensors first (student[, teacher] / input, target), then constants
    n_diff: int  # how many of ``inputs`` get gradients
    dim: int  # the class / channel dimension ("element" losses: -1)
    mask: torch.Tensor | None  # positions shape, or None where the loss takes no mask
    kwargs: dict  # other arguments (temperature, margin, ...)

    def with_dtype(self, dtype) -> "Case":
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in self.inputs[:2]] + self.inputs[2:]
        return dataclasses.replace(self, inputs=inputs)

    def leaves(self, dtype=None) -> list:
        """Fresh leaf copies of the inputs (layout kept), differentiable ones requiring grad."""
        out = []
        for k, x in enumerate(self.inputs):
            y = x.detach().clone(memory_format=torch.preserve_format)
            if dtype is not None and y.is_floating_point():
                y = y.to(dtype, memory_format=torch.preserve_format)
            if k < self.n_diff:
                y.requires_grad_()
            out.append(y)
        return out


@dataclasses.dataclass
class FusedLoss:
    name: str
    layouts: tuple  # names understood by ``make``
    make: Callable[[str], Case]
    call: Callable  # call(inputs, case, reduction) -> loss (the public function)
    reference: Callable  # reference(inputs, case, reduction) -> float64 loss
    softmax: bool  # a position is a whole class vector (kd_loss, weighted_soft_ce)
    has_mask: bool


def _logits(layout: str, g: torch.Generator):
    """(student, teacher, dim, positions shape) of a softmax loss in ``layout``."""
    def r(*shape):
        return torch.randn(*shape, generator=g) * 2

    if layout == "rows":
        return r(4, 7), r(4, 7), -1
    if layout == "short":
        return r(3, 2), r(3, 2), -1
    if layout == "long":
        return r(2, LONG), r(2, LONG), -1
    if layout == "strided":  # classes with stride 4 (a transposed view)
        return r(7, 4).t(), r(7, 4).t(), -1
    if layout == "nchw":
        return r(2, 5, 3, 2), r(2, 5, 3, 2), 1
    if layout == "channels_last":
        s, t = r(2, 5, 3, 2), r(2, 5, 3, 2)
        return s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last), 1
    raise ValueError(layout)


def _positions_shape(x: torch.Tensor, dim: int) -> tuple:
    dim %= x.dim()
    return tuple(x.shape[:dim]) + tuple(x.shape[dim + 1 :])


def _softmax_case(layout: str, g: torch.Generator, **kwargs) -> Case:
    s, t, dim = _logits(layout, g)
    mask = torch.rand(_positions_shape(s, dim), generator=g) > 0.3
    mask.view(-1)[0] = True
    return Case([s, t], 2, dim, mask, kwargs)


def _kd_call(inputs, case, reduction):
    s, t = inputs[:2]
    return KF.kd_loss(s, t, case.kwargs["temperature"], reduction, case.dim, case.mask)


def _kd_reference(inputs, case, reduction):
    s, t = inputs[:2]
    return kd_loss_reference(s, t, case.kwargs["temperature"], reduction, case.dim, case.mask)


def _wsce_case(layout, g):
    case = _softmax_case(layout, g, temperature=2.0)
    classes = case.inputs[0].shape[case.dim]
    case.inputs.append(torch.rand(classes, generator=g) + 0.5)  # class weights, a constant
    return case


def _wsce_call(inputs, case, reduction):
    s, t, w = inputs
    return KF.weighted_soft_ce(s, t, w.to(s.dtype), case.kwargs["temperature"], reduction, case.dim, case.mask)


def _wsce_reference(inputs, case, reduction):
    s, t, w = inputs
    return weighted_soft_ce_reference(s, t, w.double(), case.kwargs["temperature"], reduction, case.dim, case.mask)


def _kl_case(layout, g):
    if layout == "strided":
        x, y = torch.randn(7, 4, generator=g).t(), torch.rand(7, 4, generator=g).t()
    else:
        shape = {"rows": (4, 7), "short": (3,), "long": (2, LONG)}[layout]
        x, y = torch.randn(*shape, generator=g), torch.rand(*shape, generator=g)
    y[..., 0] = 0.0  # an exactly-zero target: our documented gradient convention
    return Case([x.log_softmax(-1) if x.dim() > 1 else x, y], 2, -1, None, {})


def _kl_call(inputs, case, reduction):
    return KF.kl_div(inputs[0], inputs[1], reduction=reduction)


def _kl_reference(inputs, case, reduction):
    return kl_div_reference(inputs[0], inputs[1], reduction)


def _margin_case(layout, g):
    if layout in ("nchw", "channels_last"):
        s, t, dim = torch.randn(2, 5, 3, 2, generator=g), torch.randn(2, 5, 3, 2, generator=g), 1
        if layout == "channels_last":
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    elif layout == "tokens":  # (N, L, C), channels last in memory
        s, t, dim = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g), -1
    elif layout == "long":  # more elements than a kernel block
        s, t, dim = torch.randn(2, 3, 40, 40, generator=g), torch.randn(2, 3, 40, 40, generator=g), 1
    else:
        raise ValueError(layout)
    margin = -torch.rand(s.shape[dim], generator=g)
    return Case([s, t, margin], 1, dim, None, {})


def _margin_call(inputs, case, reduction):
    s, t, m = inputs
    return KF.margin_partial_l2(s, t, m, reduction, case.dim)


def _margin_reference(inputs, case, reduction):
    s, t, m = inputs
    return margin_partial_l2_reference(s, t, m.double(), reduction, case.dim)


def _bounded_case(layout, g):
    rows, k = {"rows": (6, 4), "short": (3, 1), "long": (3, 4 * 81)}[layout]
    s, t, y = (torch.randn(rows, k, generator=g) for _ in range(3))
    mask = torch.rand(rows, generator=g) > 0.3
    mask[0] = True
    return Case([s, t, y], 1, -1, mask, {"margin": 0.5})


def _bounded_call(inputs, case, reduction):
    s, t, y = inputs
    return KF.bounded_regression(s, t, y, case.kwargs["margin"], reduction, case.mask)


def _bounded_reference(inputs, case, reduction):
    s, t, y = inputs
    return bounded_regression_reference(s, t, y, case.kwargs["margin"], reduction, case.mask)


LOSSES = [
    FusedLoss("kd_loss", ("rows", "short", "long", "strided", "nchw", "channels_last"),
              lambda layout, g: _softmax_case(layout, g, temperature=3.0), _kd_call, _kd_reference, True, True),
    FusedLoss("weighted_soft_ce", ("rows", "short", "long", "strided", "nchw", "channels_last"),
              _wsce_case, _wsce_call, _wsce_reference, True, True),
    FusedLoss("kl_div", ("rows", "short", "long", "strided"), _kl_case, _kl_call, _kl_reference, False, False),
    FusedLoss("margin_partial_l2", ("nchw", "channels_last", "tokens", "long"),
              _margin_case, _margin_call, _margin_reference, False, False),
    FusedLoss("bounded_regression", ("rows", "short", "long"),
              _bounded_case, _bounded_call, _bounded_reference, False, True),
]
BY_NAME = {loss.name: loss for loss in LOSSES}


def make_case(loss: FusedLoss, layout: str, seed: int = 0) -> Case:
    return loss.make(layout, torch.Generator().manual_seed(seed))


def loss_and_grads(loss: FusedLoss, case: Case, reduction: str, backend: str | None, dtype=None):
    """Loss and the gradients of ``sum(loss · w)`` (fixed weights w) w.r.t. the differentiable
    inputs, through ``backend`` (None: the float64 reference)."""
    leaves = case.leaves(torch.float64 if backend is None else dtype)
    if backend is None:
        out = loss.reference(leaves, case, reduction)
    else:
        with kdkernels.use_backend(backend):
            out = loss.call(leaves, case, reduction)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((torch.where(w != 0, out * w, 0)).sum(), leaves[: case.n_diff], allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return out.detach(), [g.detach() for g in grads]


def element_at_position(case: Case, flat_position: int) -> tuple:
    """Index (of the inputs' shape) of class / coordinate 0 at a position given by its flat index
    in the positions shape (rows for bounded_regression, elements for elementwise losses)."""
    x = case.inputs[0]
    if case.mask is None:  # elementwise losses: the position is the element
        return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_position), x.shape))
    dim = case.dim % x.dim()
    pos = [int(i) for i in torch.unravel_index(torch.tensor(flat_position), case.mask.shape)]
    return tuple(pos[:dim] + [0] + pos[dim:])


def first_masked_out(case: Case) -> int | None:
    if case.mask is None or case.mask.all():
        return None
    return int((~case.mask).reshape(-1).nonzero()[0])
