"""One bad-input contract for the five fused losses, functional and ``nn`` forms alike.

A mistake (a class dimension of size 0, a nested tensor, an out-of-range temperature or margin,
a wrong shape, dtype or device, an unknown reduction) raises a ``ValueError`` / ``TypeError``
whose message starts with the name of the argument at fault, before any kdkernels op runs, on
every backend. And the checks read shapes, not data: no host synchronisation on the hot path.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
import kdkernels.functional as KF
import kdkernels.nn as kdnn
from tests.conftest import backend_params

BACKENDS = [name for name in ("cpu", "torch") if name in kdkernels.backends.available("cpu")]
BACKEND_PARAMS = backend_params("cpu", ("cpu", "torch"))  # one that cannot run: a skip with the reason


@dataclass(frozen=True)
class Loss:
    name: str
    functional: Callable
    module: type
    valid: Callable[[], dict]  # keyword arguments of a valid call

    def call_functional(self, kwargs):
        return self.functional(**kwargs)

    def call_module(self, kwargs):
        """Constructor arguments go to the constructor, the rest to ``forward``."""
        constructor = inspect.signature(self.module.__init__).parameters
        init = {k: v for k, v in kwargs.items() if k in constructor}
        forward = {k: v for k, v in kwargs.items() if k not in constructor}
        return self.module(**init)(**forward)


def _logits():
    return dict(student_logits=torch.randn(4, 10), teacher_logits=torch.randn(4, 10))


LOSSES = {
    "kd_loss": Loss(
        "kd_loss", KF.kd_loss, kdnn.KDLoss, lambda: dict(_logits(), temperature=2.0, mask=torch.ones(4, dtype=torch.bool))
    ),
    "kl_div": Loss(
        "kl_div",
        KF.kl_div,
        kdnn.KLDivLoss,
        lambda: dict(input=torch.randn(4, 10).log_softmax(-1), target=torch.rand(4, 10), reduction="batchmean"),
    ),
    "weighted_soft_ce": Loss(
        "weighted_soft_ce",
        KF.weighted_soft_ce,
        kdnn.WeightedSoftCELoss,
        lambda: dict(_logits(), class_weight=torch.ones(10), temperature=2.0, mask=torch.ones(4, dtype=torch.bool)),
    ),
    "margin_partial_l2": Loss(
        "margin_partial_l2",
        KF.margin_partial_l2,
        kdnn.MarginPartialL2Loss,
        lambda: dict(student=torch.randn(2, 3, 4, 4), teacher=torch.randn(2, 3, 4, 4), margin=-torch.rand(3)),
    ),
    "bounded_regression": Loss(
        "bounded_regression",
        KF.bounded_regression,
        kdnn.BoundedRegressionLoss,
        lambda: dict(
            student=torch.randn(6, 4), teacher=torch.randn(6, 4), target=torch.randn(6, 4), margin=0.1, mask=torch.ones(6, dtype=torch.bool)
        ),
    ),
}

# the (first, second) tensor arguments of each loss
TENSORS = {
    "kd_loss": ("student_logits", "teacher_logits"),
    "kl_div": ("input", "target"),
    "weighted_soft_ce": ("student_logits", "teacher_logits"),
    "margin_partial_l2": ("student", "teacher"),
    "bounded_regression": ("student", "teacher"),
}


def legacy_nested(x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "The PyTorch API of nested tensors is in prototype stage"
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor(list(x.unbind(0)))


def jagged_nested(x: torch.Tensor) -> torch.Tensor:
    return torch.nested.nested_tensor(list(x.unbind(0)), layout=torch.jagged)


def empty_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.narrow(dim, 0, 0)


# (loss, case name, {argument: bad value, or a function of the valid arguments}, error, argument named)
BAD = []


def bad(loss, case, overrides, error, argument):
    BAD.append(pytest.param(loss, overrides, error, argument, id=f"{loss}-{case}"))


for loss, (first, second) in TENSORS.items():
    bad(loss, f"{first}-nested", {first: lambda kw, a=first: legacy_nested(kw[a])}, TypeError, first)
    bad(loss, f"{first}-nested-jagged", {first: lambda kw, a=first: jagged_nested(kw[a])}, TypeError, first)
    bad(loss, f"{second}-nested", {second: lambda kw, a=second: legacy_nested(kw[a])}, TypeError, second)
    bad(loss, f"{first}-integer", {first: lambda kw, a=first: kw[a].long()}, TypeError, first)
    bad(loss, f"{first}-complex", {first: lambda kw, a=first: kw[a].to(torch.complex64)}, TypeError, first)
    bad(loss, f"{first}-a-list", {first: lambda kw, a=first: kw[a].tolist()}, TypeError, first)
    bad(loss, f"{second}-sparse", {second: lambda kw, a=second: kw[a].to_sparse()}, TypeError, second)
    bad(loss, f"{second}-other-device", {second: lambda kw, a=second: kw[a].to("meta")}, ValueError, second)
    bad(loss, "reduction-unknown", {"reduction": "avg"}, ValueError, "reduction")
    bad(loss, "reduction-not-a-string", {"reduction": None}, ValueError, "reduction")
for loss in ("kd_loss", "weighted_soft_ce", "margin_partial_l2", "bounded_regression"):
    first, second = TENSORS[loss]
    bad(loss, f"{second}-wrong-shape", {second: lambda kw, a=second: kw[a][..., :-1]}, ValueError, second)
bad("kl_div", "target-does-not-broadcast", {"target": lambda kw: kw["target"][:, :3]}, ValueError, "target")

# V = 0: a softmax over no classes; a feature without channels, a box without coordinates
for loss in ("kd_loss", "weighted_soft_ce"):
    bad(
        loss,
        "classes-0",
        {
            "student_logits": lambda kw: empty_dim(kw["student_logits"], 1),
            "teacher_logits": lambda kw: empty_dim(kw["teacher_logits"], 1),
            **({"class_weight": None} if loss == "weighted_soft_ce" else {}),
        },
        ValueError,
        "student_logits",
    )
    dense = {
        "student_logits": torch.randn(2, 0, 3),
        "teacher_logits": torch.randn(2, 0, 3),
        "dim": 1,
        "mask": torch.ones(2, 3, dtype=torch.bool),
        **({"class_weight": None} if loss == "weighted_soft_ce" else {}),
    }
    bad(loss, "classes-0-dim1", dense, ValueError, "student_logits")
bad(
    "margin_partial_l2",
    "channels-0",
    {"student": torch.randn(2, 0, 4, 4), "teacher": torch.randn(2, 0, 4, 4), "margin": torch.zeros(0)},
    ValueError,
    "student|margin",  # the module checks its margins first, in __init__
)
no_coordinates = {"student": torch.randn(6, 0), "teacher": torch.randn(6, 0), "target": torch.randn(6, 0)}
bad("bounded_regression", "coordinates-0", no_coordinates, ValueError, "student")

# temperatures: a finite T > 0 whose inverse and square are finite
for loss in ("kd_loss", "weighted_soft_ce"):
    for case, value, error in [
        ("nan", math.nan, ValueError),
        ("inf", math.inf, ValueError),
        ("minus-inf", -math.inf, ValueError),
        ("zero", 0.0, ValueError),
        ("negative", -2.0, ValueError),
        ("square-overflows", 1e200, ValueError),
        ("inverse-overflows", 5e-324, ValueError),
        ("bool", True, TypeError),
        ("string", "4", TypeError),
        ("tensor", torch.tensor(4.0), TypeError),
        ("none", None, TypeError),
    ]:
        bad(loss, f"temperature-{case}", {"temperature": value}, error, "temperature")
    bad(loss, "dim-out-of-range", {"dim": 2}, ValueError, "dim")
    bad(loss, "dim-float", {"dim": -1.0}, TypeError, "dim")
    bad(loss, "mask-wrong-shape", {"mask": torch.ones(5, dtype=torch.bool)}, ValueError, "mask")
    bad(loss, "mask-float", {"mask": torch.ones(4)}, TypeError, "mask")
    nested_mask = torch.nested.nested_tensor([torch.ones(2, dtype=torch.bool)] * 2, layout=torch.jagged)
    bad(loss, "mask-nested", {"mask": nested_mask}, TypeError, "mask")

bad("weighted_soft_ce", "class_weight-wrong-shape", {"class_weight": torch.ones(9)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-nan", {"class_weight": torch.tensor([math.nan] + [1.0] * 9)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-negative", {"class_weight": -torch.ones(10)}, ValueError, "class_weight")
nested_weight = {"class_weight": lambda kw: jagged_nested(kw["class_weight"].reshape(2, 5))}
bad("weighted_soft_ce", "class_weight-nested", nested_weight, TypeError, "class_weight")

bad("kl_div", "log_target-not-a-bool", {"log_target": "yes"}, TypeError, "log_target")

bad("margin_partial_l2", "margin-nan", {"margin": torch.tensor([0.0, math.nan, -1.0])}, ValueError, "margin")
bad("margin_partial_l2", "margin-inf", {"margin": torch.tensor([0.0, -math.inf, -1.0])}, ValueError, "margin")
bad("margin_partial_l2", "margin-wrong-shape", {"margin": torch.zeros(4)}, ValueError, "margin")
bad("margin_partial_l2", "margin-nested", {"margin": lambda kw: jagged_nested(kw["margin"].reshape(1, 3))}, TypeError, "margin")
bad("margin_partial_l2", "channel_dim-out-of-range", {"channel_dim": 4}, ValueError, "channel_dim")
bad("margin_partial_l2", "student-0d", {"student": torch.tensor(1.0), "teacher": torch.tensor(1.0)}, ValueError, "student")

for case, value, error in [
    ("nan", math.nan, ValueError),
    ("inf", math.inf, ValueError),
    ("minus-inf", -math.inf, ValueError),
    ("bool", False, TypeError),
    ("string", "0.1", TypeError),
    ("tensor", torch.tensor(0.1), TypeError),
]:
    bad("bounded_regression", f"margin-{case}", {"margin": value}, error, "margin")
bad("bounded_regression", "target-wrong-shape", {"target": torch.randn(6, 3)}, ValueError, "target")
bad("bounded_regression", "target-nested", {"target": lambda kw: legacy_nested(kw["target"])}, TypeError, "target")
bad("bounded_regression", "mask-wrong-shape", {"mask": torch.ones(6, 4, dtype=torch.bool)}, ValueError, "mask")
bad("bounded_regression", "mask-float", {"mask": torch.ones(6)}, TypeError, "mask")
scalars = {"student": torch.tensor(1.0), "teacher": torch.tensor(1.0), "target": torch.tensor(1.0)}
bad("bounded_regression", "student-0d", scalars, ValueError, "student")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _arguments(loss: Loss, overrides: dict) -> dict:
    kwargs = loss.valid()
    for key, value in overrides.items():
        kwargs[key] = value(kwargs) if callable(value) and not isinstance(value, torch.Tensor) else value
    return kwargs


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("loss,overrides,error,argument", BAD)
def test_bad_input_names_the_argument_before_any_kernel(loss, overrides, error, argument, backend, form):
    spec = LOSSES[loss]
    kwargs = _arguments(spec, overrides)
    call = spec.call_functional if form == "functional" else spec.call_module
    with kdkernels.use_backend(backend), RecordOps() as record:
        with pytest.raises(error, match=rf"^({argument}): "):
            call(kwargs)
    kernels = [op for op in record.ops if op.namespace == "kdkernels"]
    assert not kernels, f"a kernel ran before the error: {kernels}"


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_valid_baseline_call_works(loss, form):
    # the table's mutations start from a call that is valid: only the mutation is at fault
    spec = LOSSES[loss]
    call = spec.call_functional if form == "functional" else spec.call_module
    assert torch.isfinite(call(spec.valid())).all()
    if "cpu" in BACKENDS:  # and the recorder above does see a kernel when one runs
        with kdkernels.use_backend("cpu"), RecordOps() as record:
            call(spec.valid())
        assert any(op.namespace == "kdkernels" for op in record.ops)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_empty_batch_is_not_a_mistake(loss):
    # an empty batch is fine (the sum of nothing); only an empty class dimension is rejected
    spec = LOSSES[loss]
    per_class = ("class_weight", "margin")  # one value per class / channel, not per sample
    kwargs = {k: v[:0] if isinstance(v, torch.Tensor) and k not in per_class else v for k, v in spec.valid().items()}
    assert spec.call_functional(kwargs).shape == ()


# The validation reads shapes, dtypes and devices only: no value of a tensor reaches the host.
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("loss", ["kd_loss", "kl_div", "bounded_regression"])
def test_forward_reads_no_tensor_value_on_the_host(loss, backend):
    # (weighted_soft_ce and margin_partial_l2 check their CPU weights' values, which is free on a
    # CPU; on other devices they skip it, see test_checks_run_on_meta_tensors)
    kwargs = LOSSES[loss].valid()
    with kdkernels.use_backend(backend), RecordOps() as record:
        LOSSES[loss].call_functional(kwargs)
    synced = [op for op in record.ops if op._schema.name in HOST_SYNC_OPS]
    assert not synced, synced


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_checks_run_on_meta_tensors(loss):
    # meta tensors have no data: any check that reads a value would raise here
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in LOSSES[loss].valid().items()}
    with kdkernels.use_backend("torch"):
        assert LOSSES[loss].call_functional(kwargs).device.type == "meta"
