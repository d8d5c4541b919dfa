"""One declaration per fused loss; the ops, fakes, autograd and backend dispatch follow from it.

A fused loss is a :class:`FusedLoss`. Its parts:

* **the kernel** (``kernel``): a function with annotations and no body, the contract every backend
  implements. Parameters, in order: the loss's inputs (tensors and constants; those that can get
  a gradient first), ``grad_scale`` (a one-element tensor in the accumulation dtype), optionally
  ``reduce`` (the kernel may then return partial sums over blocks instead of one loss per
  position), then one ``<input>_grad`` flag per input that can get a gradient, in the inputs'
  order. It returns ``(loss, *grads)``: the per-position losses (or partial sums) in the
  accumulation dtype and the gradients of ``grad_scale * sum(loss)`` (empty tensors when not
  asked). From this one signature come

  - the schema of the extension's op ``kdkernels::<kernel>`` (``csrc/cpu_dispatch.cpp`` and
    ``csrc/cuda/<name>_bindings.cpp`` register its CPU and CUDA implementations; C++ declares no
    schema), and its fake implementation;
  - the name of the Triton launcher, ``kdkernels.ops.triton.<name>.<kernel>``, same parameters.

* **the op** ``kdkernels::<name>(inputs..., int reduction, float scale, bool <input>_grad...,
  str backend) -> (loss, *grads)``: a ``torch.library.triton_op`` that runs the backend's kernel
  and reduces. Its body is traceable, so it is its own fake implementation, and under
  ``torch.compile`` AOTAutograd inlines it: with the Triton backend Inductor sees the Triton
  kernels themselves (``wrap_triton``; on an H200 its generated code launches them:
  ``test_inductor_compiles_the_triton_kernels_themselves``), with ``cpu``/``cuda`` the extension's
  op.
* **the twin** (``twin``): the per-position loss in differentiable torch operations on the same
  inputs. It is the ``torch`` backend, and it gives the gradients that the precomputed ones
  cannot (double backward, forward AD, functorch; see :mod:`kdkernels.ops._gradients`).

:meth:`FusedLoss.__call__` is the only place that turns a backend name into code: ``torch`` runs
the twin, every other backend the op.

Adding a fused loss: CONTRIBUTING.md lists the files.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Callable

import torch
from torch import Tensor

from kdkernels import _extension, backends
from kdkernels._dtypes import accumulation_dtype
from kdkernels.ops import _gradients
from kdkernels.ops._reduction import NONE, grad_scale_and_divisor, reduce_differentiable, reduce_positions

_GRAD_SUFFIX = "_grad"


@dataclasses.dataclass(frozen=True)
class Positions:
    """Where a fused loss's per-position losses lie, as functions of its first input ``x`` (the
    kernel's view of it).

    Attributes:
        shape: ``shape(x)`` -> the shape of the per-position loss (what the kernel returns without
            ``reduce``, and the op's loss for ``reduction`` NONE); None for an elementwise loss,
            which has the shape and strides of ``x``.
        count: ``count(x)`` -> how many positions there are (what an unmasked ``mean`` divides by).
        expand: turns a per-position ``grad_output`` into one that broadcasts against the
            gradients of the inputs.
    """

    shape: Callable[[Tensor], tuple] | None
    count: Callable[[Tensor], int]
    expand: Callable[[Tensor], Tensor]


#: One position per class vector of (outer, classes, inner) views: the loss is (outer, inner),
#: and a per-position ``grad_output`` broadcasts across the classes.
CLASS_ROWS = Positions(
    shape=lambda x: (x.shape[0], x.shape[2]),
    count=lambda x: x.shape[0] * x.shape[2],
    expand=lambda g: g.unsqueeze(1),
)

#: One position per element: the loss has the first input's shape and strides.
ELEMENTS = Positions(shape=None, count=lambda x: x.numel(), expand=lambda g: g)


def leading_index(trailing_dims: int) -> Positions:
    """One position per index of the first dimension (a row, a batch element, an anchor) of an
    input with ``trailing_dims`` more dimensions, across which a per-position ``grad_output``
    broadcasts."""
    return Positions(
        shape=lambda x: (x.shape[0],),
        count=lambda x: x.shape[0],
        expand=lambda g: g.reshape(g.shape + (1,) * trailing_dims),
    )


@dataclasses.dataclass(frozen=True)
class FusedLoss:
    """The declaration of one fused loss (see the module docstring).

    Attributes:
        name: the op is ``kdkernels::<name>``; its Triton kernels live in
            ``kdkernels/ops/triton/<name>.py``.
        kernel: the kernel's signature (a function with annotations; its body is never run).
        twin: ``twin(*inputs)`` -> the per-position loss as differentiable torch operations, in the
            accumulation dtype (the ``torch`` backend and higher-order autograd).
        positions: where the per-position losses lie in the first input (:class:`Positions`:
            :data:`CLASS_ROWS`, :data:`ELEMENTS` or :func:`leading_index`). A ``mean`` divides
            by their count, or by the count of True in the input named ``mask`` if there is one.
        dtype_inputs: names of the inputs whose dtypes set the accumulation dtype (default: the
            inputs that can get a gradient).
        contiguous_grads: the kernels return contiguous gradients (else: the inputs' strides).
        kernel_backends: the backends with a kernel for this loss. Where the default choice for
            the device has none, the next one that can run is used (at last ``torch``); asking for
            one explicitly (``use_backend``) raises.
    """

    name: str
    kernel: Callable
    twin: Callable
    positions: Positions
    dtype_inputs: tuple[str, ...] | None = None
    contiguous_grads: bool = False
    kernel_backends: tuple[str, ...] = ("triton", "cpu", "cuda")

    # ------------------------------------------------------------------ the signature, parsed
    @functools.cached_property
    def kernel_name(self) -> str:
        return self.kernel.__name__

    @functools.cached_property  # parsed once: the ops call these on every step
    def _kernel_params(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.kernel).parameters.values())

    @functools.cached_property
    def inputs(self) -> list[inspect.Parameter]:
        """The loss's inputs: the kernel's parameters before ``grad_scale``."""
        params = self._kernel_params
        return params[: [p.name for p in params].index("grad_scale")]

    @functools.cached_property
    def differentiable(self) -> list[str]:
        """The inputs that can get a gradient (one ``<input>_grad`` flag each), in order."""
        return [p.name[: -len(_GRAD_SUFFIX)] for p in self._kernel_params if p.name.endswith(_GRAD_SUFFIX)]

    @functools.cached_property
    def kernel_reduces(self) -> bool:
        return any(p.name == "reduce" for p in self._kernel_params)

    def __post_init__(self) -> None:
        names = [p.name for p in self.inputs]
        if names[: len(self.differentiable)] != self.differentiable:
            raise TypeError(f"{self.name}: the inputs that get gradients must come first, in the order of their flags")
        # Register everything once, at import (frozen dataclass: bypass __setattr__).
        object.__setattr__(self, "op", self._define_op())
        if _extension.has_extension() and {"cpu", "cuda"} & set(self.kernel_backends):
            self._define_kernel_op()

    # ------------------------------------------------------------------ ops
    def _define_kernel_op(self) -> None:
        qualname = f"kdkernels::{self.kernel_name}"
        schema = torch.library.infer_schema(self.kernel, mutates_args=())
        torch.library.define(qualname, schema)
        torch.library.register_fake(qualname)(self._kernel_fake)

    def _split_kernel_args(self, args) -> tuple[list, bool, list[bool]]:
        n = len(self.inputs)
        inputs = list(args[:n])
        rest = list(args[n + 1 :])  # after grad_scale
        reduce = bool(rest.pop(0)) if self.kernel_reduces else False
        return inputs, reduce, rest

    @functools.cached_property
    def _dtype_positions(self) -> list[int]:
        names = [p.name for p in self.inputs]
        return [names.index(n) for n in (self.differentiable if self.dtype_inputs is None else self.dtype_inputs)]

    @functools.cached_property
    def _mask_position(self) -> int | None:
        names = [p.name for p in self.inputs]
        return names.index("mask") if "mask" in names else None

    def counted(self, inputs: list) -> tuple[int, Tensor | None]:
        """``(positions, mask)``: how many positions a ``mean`` divides by, and the bool mask that
        selects them (None: all of them count)."""
        mask = None if self._mask_position is None else inputs[self._mask_position]
        return self.positions.count(inputs[0]), mask

    def accumulation_dtype(self, inputs: list) -> torch.dtype:
        return accumulation_dtype(*(inputs[k] for k in self._dtype_positions))

    def _kernel_fake(self, *args):
        inputs, reduce, flags = self._split_kernel_args(args)
        first = inputs[0]
        if reduce:  # how many partial sums is a backend detail; callers only sum them
            shape = (torch.library.get_ctx().new_dynamic_size(),)
            loss = first.new_empty(shape, dtype=self.accumulation_dtype(inputs))
        else:
            loss = self._per_position_buffer(inputs)
        return (loss, *(self._gradient_buffer(x, wanted) for x, wanted in zip(inputs, flags)))

    def _per_position_buffer(self, inputs: list) -> Tensor:
        dtype = self.accumulation_dtype(inputs)
        if self.positions.shape is None:  # elementwise: the first input's shape and strides
            return torch.empty_like(inputs[0], dtype=dtype)
        return inputs[0].new_empty(self.positions.shape(inputs[0]), dtype=dtype)

    def _gradient_buffer(self, x: Tensor, wanted: bool) -> Tensor:
        if wanted and self.contiguous_grads:
            return x.new_empty(x.shape)
        return _gradients.gradient_buffer(x, wanted)

    def _split_op_args(self, args) -> tuple[list, int, float, list[bool], str]:
        """``(inputs, reduction, scale, grad flags, backend)`` of the op's arguments."""
        n = len(self.inputs)
        return list(args[:n]), args[n], args[n + 1], list(args[n + 2 : -1]), args[-1]

    def _op_fake(self, *args):
        inputs, reduction, _scale, flags, _backend = self._split_op_args(args)
        if reduction == NONE:
            loss = self._per_position_buffer(inputs)
        else:
            loss = inputs[0].new_empty((), dtype=self.accumulation_dtype(inputs))
        return (loss, *(self._gradient_buffer(x, wanted) for x, wanted in zip(inputs, flags)))

    def _op_signature(self) -> inspect.Signature:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params = [inspect.Parameter(p.name, kind, annotation=p.annotation) for p in self.inputs]
        params += [inspect.Parameter("reduction", kind, annotation=int), inspect.Parameter("scale", kind, annotation=float)]
        params += [inspect.Parameter(f"{n}{_GRAD_SUFFIX}", kind, annotation=bool) for n in self.differentiable]
        params += [inspect.Parameter("backend", kind, annotation=str)]
        returns = tuple[(Tensor,) * (1 + len(self.differentiable))]
        return inspect.Signature(params, return_annotation=returns)

    def _define_op(self):
        spec = self

        def fused(*args):
            inputs, reduction, scale, flags, backend = spec._split_op_args(args)
            positions, mask = spec.counted(inputs)
            grad_scale, divisor = grad_scale_and_divisor(
                reduction, scale, positions, mask, inputs[0].device, spec.accumulation_dtype(inputs)
            )
            kernel_args = [*inputs, grad_scale]
            if spec.kernel_reduces:
                kernel_args.append(reduction != NONE)
            loss, *grads = spec.kernel_for(backend)(*kernel_args, *flags)
            return (reduce_positions(loss, reduction, scale, divisor), *grads)

        fused.__name__ = self.name
        fused.__doc__ = f"The fused op ``kdkernels::{self.name}`` (declared in kdkernels/ops/{self.name}.py)."
        fused.__signature__ = self._op_signature()
        op = torch.library.triton_op(f"kdkernels::{self.name}", fused, mutates_args=())
        # triton_op makes the body the fake; but a kernel that returns partial sums creates an
        # unbacked size inside it, which an op's fake may not hide. The body still runs in
        # tracing (AOTAutograd inlines it), where such intermediate sizes are allowed.
        op.register_fake(self._op_fake)
        _inline_when_traced(op, fused)
        n_grads = len(self.differentiable)
        n_args = len(fused.__signature__.parameters)

        def backward(ctx, grad_loss, *_grads):
            grads = _gradients.take_gradients(ctx, op, grad_loss, spec.positions.expand, spec.reduced_twin)
            return (*grads, *([None] * (n_args - n_grads)))

        _gradients.register_autograd(op, backward, self.reduced_twin)
        return op

    def kernel_for(self, backend: str) -> Callable:
        """The kernel of ``backend``: the extension's op or the Triton launcher."""
        if backend == "triton":
            module = importlib.import_module(f"kdkernels.ops.triton.{self.name}")
            return getattr(module, self.kernel_name)
        if backend in ("cpu", "cuda"):
            return getattr(torch.ops.kdkernels, self.kernel_name)
        raise ValueError(f"backend: kdkernels::{self.name} has no kernel for backend {backend!r}")

    # ------------------------------------------------------------------ the twin, reduced
    def reduced_twin(self, *args):
        """The op's loss (reduced) from the op's own arguments, in differentiable operations."""
        inputs, reduction, scale, _flags, _backend = self._split_op_args(args)
        positions, mask = self.counted(inputs)
        return reduce_differentiable(self.twin(*inputs), reduction, scale, positions, mask)

    # ------------------------------------------------------------------ the dispatch
    def __call__(self, *inputs, reduction: int, scale: float = 1.0) -> Tensor:
        """The reduced loss on the backend :func:`kdkernels.backends.resolve` picks for the inputs'
        device: ``torch`` runs the twin; the others the op, which also computes the gradients
        of the inputs that require grad (when grad mode is on)."""
        device = inputs[0].device
        backend = backends.resolve(device, self.kernel_backends + ("torch",))
        grad_enabled = torch.is_grad_enabled()
        flags = [grad_enabled and inputs[k].requires_grad for k in range(len(self.differentiable))]
        args = (*inputs, reduction, scale, *flags, backend)
        if backend == "torch":
            return self.reduced_twin(*args)
        return self.op(*args)[0]


def _inline_when_traced(op, body: Callable) -> None:
    """Under AOTAutograd (``torch.compile``) replace ``op`` by its body, so that the compiler sees
    the kernels; but keep it whole when the body would launch interpreted Triton kernels
    (``TRITON_INTERPRET=1``, no GPU), which cannot run on fake tensors: the op's fake stands in.

    This is ``triton_op``'s own decomposition rule with that one exception.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def decompose(mode, func, types, args, kwargs):
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented
        if args[-1] == "triton" and backends.triton_interpreted():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return body(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, decompose)

