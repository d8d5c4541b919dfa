"""One table of the seven fused losses, for the tests that apply to all of them (the contract in
``test_fused_loss_contract.py``, NaN/inf rules, higher-order autograd, version counters).

Each :class:`LossRow` knows its declaration (``kdkernels.ops.<name>``'s :class:`FusedLoss`), how to
make inputs in each of its layouts, how to call the public function, and the float64 reference
(``kdkernels.ops.reference``, where the non-finite rules are written down). A :class:`Case` is one
set of inputs: the differentiable tensors, the constants, and where its positions / classes are,
so a test can put a NaN or an inf at a chosen place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import kdkernels
from tests.conftest import backend_params
import kdkernels.functional as KF
from kdkernels.ops.bounded_regression import BOUNDED_REGRESSION
from kdkernels.ops.fused_loss import FusedLoss
from kdkernels.ops.kd_loss import KD_LOSS
from kdkernels.ops.kl_div import KL_DIV
from kdkernels.ops.margin_partial_l2 import MARGIN_PARTIAL_L2
from kdkernels.ops.pairwise_similarity import PAIRWISE_SIMILARITY
from kdkernels.ops.reference.bounded_regression import bounded_regression_reference
from kdkernels.ops.reference.kd_loss import kd_loss_reference
from kdkernels.ops.reference.kl_div import kl_div_reference
from kdkernels.ops.reference.margin_partial_l2 import margin_partial_l2_reference
from kdkernels.ops.reference.pairwise_similarity import pairwise_similarity_reference
from kdkernels.ops.reference.rkd_angle import rkd_angle_reference
from kdkernels.ops.reference.weighted_soft_ce import weighted_soft_ce_reference
from kdkernels.ops.rkd_angle import RKD_ANGLE
from kdkernels.ops.weighted_soft_ce import WEIGHTED_SOFT_CE

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

    def rounded(self, dtypes) -> "Case":
        """The same case with every floating input rounded to its dtype in ``dtypes`` (one dtype,
        or one per input) and kept in float64: the reference then sees what a kernel sees."""
        dtypes = _per_input(dtypes, len(self.inputs))
        inputs = [x.to(d).double() if x.is_floating_point() else x for x, d in zip(self.inputs, dtypes)]
        return dataclasses.replace(self, inputs=inputs)

    def leaves(self, dtype=None) -> list:
        """Fresh leaf copies of the inputs (layout kept), differentiable ones requiring grad;
        ``dtype``: one for every floating input, or a list with one per input."""
        out = []
        for k, (x, d) in enumerate(zip(self.inputs, _per_input(dtype, len(self.inputs)))):
            y = x.detach().clone(memory_format=torch.preserve_format)
            if d is not None and y.is_floating_point():
                y = y.to(d, memory_format=torch.preserve_format)
            if k < self.n_diff:
                y.requires_grad_()
            out.append(y)
        return out


def _per_input(dtype, n: int) -> list:
    return list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * n


@dataclasses.dataclass
class LossRow:
    name: str
    spec: FusedLoss  # the declaration: ``.op``, ``.kernel_name``, ``.inputs``, ``.differentiable``
    layouts: tuple  # names understood by ``make``, each a different path through the kernels
    make: Callable[[str], Case]  # also understands ``large`` and ``tiny``
    call: Callable  # call(inputs, case, reduction) -> loss (the public function)
    reference: Callable  # reference(inputs, case, reduction) -> float64 loss
    softmax: bool  # a position is a whole class vector (kd_loss, weighted_soft_ce)
    has_mask: bool
    reductions: tuple = ("none", "sum", "mean", "batchmean")  # those the public function takes
    # The non-finite rules of kdkernels/ops/reference/__init__.py are written for this loss.
    nan_rules: bool = True
    # Why torch.autograd.gradcheck cannot hold (None: it must).
    no_gradcheck: str | None = None
    # Why the forward reads a tensor value on the host (None: it must not).
    host_reads: str | None = None
    # The loss has the inputs' dtype, as torch's (else: fp32, fp64 for fp64 inputs).
    keeps_input_dtype: bool = False
    # Layouts for the dtype clause (None: the first and the last).
    dtype_layouts: tuple | None = None
    # Scratch memory the CPU kernels may hold besides the gradient, per thread (bytes, of a case).
    workspace: Callable[[Case], int] = lambda case: 0


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
    if layout == "large":  # rows split over threads / programs, classes over several blocks
        return r(16, 3000), r(16, 3000), -1
    if layout == "tiny":  # gradcheck
        return r(3, 4, 2), r(3, 4, 2), 1
    if layout == "strided":  # classes with stride 4 (a transposed view)
        return r(7, 4).t(), r(7, 4).t(), -1
    if layout == "nchw":
        return r(2, 5, 3, 2), r(2, 5, 3, 2), 1
    if layout == "dim0":  # classes outermost
        return r(5, 3, 2), r(5, 3, 2), 0
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
    return KF.weighted_soft_ce(s, t, w, case.kwargs["temperature"], reduction, case.dim, case.mask)


def _wsce_reference(inputs, case, reduction):
    s, t, w = inputs
    return weighted_soft_ce_reference(s, t, w.double(), case.kwargs["temperature"], reduction, case.dim, case.mask)


def _kl_case(layout, g):
    if layout == "tiny":  # no exact zero target: the loss is smooth there (gradcheck)
        x, y = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g) + 0.1
        return Case([x.log_softmax(-1), y], 2, -1, None, {})
    if layout == "strided":
        x, y = torch.randn(7, 4, generator=g).t(), torch.rand(7, 4, generator=g).t()
    else:
        shape = {"rows": (4, 7), "short": (3,), "long": (2, LONG), "large": (50, 4000)}[layout]
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
    elif layout == "large":  # several chunks of partial sums
        s, t, dim = torch.randn(3, 5, 37, 41, generator=g), torch.randn(3, 5, 37, 41, generator=g), 1
    elif layout == "tiny":  # away from the S = T kink (gradcheck)
        s, t, dim = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g), 1
        s = torch.where((s - t).abs() < 0.05, s + 0.1, s)
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
    rows, k = {"rows": (6, 4), "short": (3, 1), "long": (3, 4 * 81), "large": (2100, 4), "tiny": (4, 3)}[layout]
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


def _pairwise_case(layout, g):
    # (B, Cs, H, W) maps or (B, N, C) nodes; the channel counts differ
    b, cs, ct, h, w = {"BCHW": (2, 5, 7, 3, 4), "BNC": (2, 6, 3, 5, 7), "large": (2, 8, 6, 10, 10), "tiny": (1, 3, 2, 2, 2)}[layout]
    s, t = torch.randn(b, cs, h, w, generator=g), torch.randn(b, ct, h, w, generator=g)
    if layout != "BCHW":  # the maps' pixels as nodes: a (B, N, C) view, channels strided
        s, t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
    if layout == "large":  # contiguous nodes, as the kernels write their gradients
        s, t = s.contiguous(), t.contiguous()
    return Case([s, t], 2, -1, None, {})


def _pairwise_call(inputs, case, reduction):
    return KF.pairwise_similarity_loss(inputs[0], inputs[1], reduction)


def _nodes(x):
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def _pairwise_reference(inputs, case, reduction):
    return pairwise_similarity_reference(_nodes(inputs[0]), _nodes(inputs[1]), reduction)


def _rkd_case(layout, g):
    # (B, Ds) and (B, Dt) embeddings: equal widths, B above one Triton tile with differing widths
    b, ds, dt = {"rows": (7, 8, 8), "tiles": (37, 5, 19), "large": (40, 8, 6), "tiny": (4, 3, 2)}[layout]
    return Case([torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)], 2, -1, None, {})


def _rkd_call(inputs, case, reduction):
    return KF.rkd_angle_loss(inputs[0], inputs[1])


def _rkd_reference(inputs, case, reduction):
    return rkd_angle_reference(inputs[0], inputs[1])


SOFTMAX_LAYOUTS = ("rows", "short", "long", "strided", "nchw", "dim0", "channels_last")
LOSSES = [
    LossRow("kd_loss", KD_LOSS, SOFTMAX_LAYOUTS, lambda layout, g: _softmax_case(layout, g, temperature=3.0),
            _kd_call, _kd_reference, True, True),
    LossRow("weighted_soft_ce", WEIGHTED_SOFT_CE, SOFTMAX_LAYOUTS, _wsce_case, _wsce_call, _wsce_reference, True, True,
            host_reads="checks the values of CPU class weights (free on a CPU; skipped on other devices)"),
    LossRow("kl_div", KL_DIV, ("rows", "short", "long", "strided"), _kl_case, _kl_call, _kl_reference, False, False,
            keeps_input_dtype=True),
    LossRow("margin_partial_l2", MARGIN_PARTIAL_L2, ("nchw", "channels_last", "tokens", "long"),
            _margin_case, _margin_call, _margin_reference, False, False, dtype_layouts=("nchw", "channels_last", "tokens"),
            host_reads="checks the values of CPU margins (free on a CPU; skipped on other devices)"),
    LossRow("bounded_regression", BOUNDED_REGRESSION, ("rows", "short", "long"),
            _bounded_case, _bounded_call, _bounded_reference, False, True),
    LossRow("pairwise_similarity", PAIRWISE_SIMILARITY, ("BCHW", "BNC"), _pairwise_case, _pairwise_call,
            _pairwise_reference, False, False, reductions=("none", "sum", "mean"), nan_rules=False,
            # a tile of student and of teacher similarities, at most 256×256 fp32 (the C++ tile)
            workspace=lambda case: 2 * 4 * min(case.inputs[0].shape[1] if case.inputs[0].dim() == 3
                                               else case.inputs[0][0, 0].numel(), 256) ** 2,
            no_gradcheck="the norms are detached (the official formula): the gradient is by design not the "
            "derivative of the value; parity with float64 autograd of the formula stands in"),
    LossRow("rkd_angle", RKD_ANGLE, ("rows", "tiles"), _rkd_case, _rkd_call, _rkd_reference, False, False,
            reductions=("mean",), nan_rules=False, dtype_layouts=("rows",)),
]
BY_NAME = {loss.name: loss for loss in LOSSES}


def make_case(loss: LossRow, layout: str, seed: int = 0) -> Case:
    return loss.make(layout, torch.Generator().manual_seed(seed))


def loss_and_grads(loss: LossRow, case: Case, reduction: str, backend: str | None, dtype=None):
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
