"""One bad-input contract for the seven fused losses, functional and ``nn`` forms alike.

A mistake (a class dimension of size 0, a nested tensor, an out-of-range temperature or margin,
a wrong shape, dtype or device, an unknown reduction) raises a ``ValueError`` / ``TypeError``
whose message starts with the name of the argument at fault, before any kdkernels op runs, on
every backend. The checks read shapes, not data (no host synchronisation on the hot path: see
``test_fused_loss_contract.py``), so they run on meta tensors.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kdkernels
import kdkernels.functional as KF
import kdkernels.nn as kdnn
from tests.conftest import backend_params
from tests.helpers import RecordOps

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
    "pairwise_similarity": Loss(
        "pairwise_similarity",
        KF.pairwise_similarity_loss,
        kdnn.PairwiseSimilarityLoss,
        lambda: dict(student_feat=torch.randn(2, 4, 3, 3), teacher_feat=torch.randn(2, 6, 3, 3)),
    ),
    "rkd_angle": Loss(
        "rkd_angle",
        KF.rkd_angle_loss,
        kdnn.RKDAngleLoss,
        lambda: dict(student_emb=torch.randn(6, 4), teacher_emb=torch.randn(6, 5)),
    ),
}

# the (first, second) tensor arguments of each loss
TENSORS = {
    "kd_loss": ("student_logits", "teacher_logits"),
    "kl_div": ("input", "target"),
    "weighted_soft_ce": ("student_logits", "teacher_logits"),
    "margin_partial_l2": ("student", "teacher"),
    "bounded_regression": ("student", "teacher"),
    "pairwise_similarity": ("student_feat", "teacher_feat"),
    "rkd_angle": ("student_emb", "teacher_emb"),
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


def bad(loss, case, overrides, error, argument, forms=("functional", "module")):
    for form in forms:
        BAD.append(pytest.param(loss, overrides, error, argument, form, id=f"{loss}-{case}-{form}"))


FUNCTIONAL = ("functional",)  # the module takes the argument in its constructor, checked there


for loss, (first, second) in TENSORS.items():
    bad(loss, f"{first}-nested", {first: lambda kw, a=first: legacy_nested(kw[a])}, TypeError, first)
    bad(loss, f"{first}-nested-jagged", {first: lambda kw, a=first: jagged_nested(kw[a])}, TypeError, first)
    bad(loss, f"{second}-nested", {second: lambda kw, a=second: legacy_nested(kw[a])}, TypeError, second)
    for name in (first, second):
        bad(loss, f"{name}-integer", {name: lambda kw, a=name: kw[a].int()}, TypeError, name)
        bad(loss, f"{name}-a-list", {name: lambda kw, a=name: kw[a].tolist()}, TypeError, name)
        bad(loss, f"{name}-sparse", {name: lambda kw, a=name: kw[a].to_sparse()}, TypeError, name)
    bad(loss, f"{first}-complex", {first: lambda kw, a=first: kw[a].to(torch.complex64)}, TypeError, first)
    bad(loss, f"{second}-other-device", {second: lambda kw, a=second: kw[a].to("meta")}, ValueError, second)
    if loss != "rkd_angle":  # (the mean over all triples: no reduction argument)
        bad(loss, "reduction-unknown", {"reduction": "avg"}, ValueError, "reduction")
        bad(loss, "reduction-not-a-string", {"reduction": None}, ValueError, "reduction")
for loss in ("kd_loss", "weighted_soft_ce", "margin_partial_l2", "bounded_regression", "pairwise_similarity"):
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
    bad(loss, "mask-other-device", {"mask": torch.ones(4, dtype=torch.bool, device="meta")}, ValueError, "mask")
    nested_mask = torch.nested.nested_tensor([torch.ones(2, dtype=torch.bool)] * 2, layout=torch.jagged)
    bad(loss, "mask-nested", {"mask": nested_mask}, TypeError, "mask")

bad("weighted_soft_ce", "class_weight-wrong-shape", {"class_weight": torch.ones(9)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-nan", {"class_weight": torch.tensor([math.nan] + [1.0] * 9)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-negative", {"class_weight": -torch.ones(10)}, ValueError, "class_weight")
nested_weight = {"class_weight": lambda kw: jagged_nested(kw["class_weight"].reshape(2, 5))}
bad("weighted_soft_ce", "class_weight-nested", nested_weight, TypeError, "class_weight")
bad("weighted_soft_ce", "class_weight-2d", {"class_weight": torch.ones(2, 5)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-inf", {"class_weight": torch.full((10,), math.inf)}, ValueError, "class_weight")
bad("weighted_soft_ce", "class_weight-integer", {"class_weight": torch.ones(10, dtype=torch.long)}, TypeError, "class_weight")
bad("weighted_soft_ce", "class_weight-a-list", {"class_weight": [1.0] * 10}, TypeError, "class_weight")
bad("weighted_soft_ce", "class_weight-other-device", {"class_weight": torch.ones(10, device="meta")}, ValueError, "class_weight", FUNCTIONAL)
bad("weighted_soft_ce", "class_weight-requires-grad", {"class_weight": torch.ones(10, requires_grad=True)}, ValueError, "class_weight", FUNCTIONAL)

bad("kl_div", "log_target-not-a-bool", {"log_target": "yes"}, TypeError, "log_target")

bad("margin_partial_l2", "margin-nan", {"margin": torch.tensor([0.0, math.nan, -1.0])}, ValueError, "margin")
bad("margin_partial_l2", "margin-inf", {"margin": torch.tensor([0.0, -math.inf, -1.0])}, ValueError, "margin")
bad("margin_partial_l2", "margin-wrong-shape", {"margin": torch.zeros(4)}, ValueError, "margin")
bad("margin_partial_l2", "margin-nested", {"margin": lambda kw: jagged_nested(kw["margin"].reshape(1, 3))}, TypeError, "margin")
bad("margin_partial_l2", "margin-2d", {"margin": torch.zeros(3, 1)}, ValueError, "margin", FUNCTIONAL)
bad("margin_partial_l2", "margin-integer", {"margin": torch.zeros(3, dtype=torch.long)}, TypeError, "margin")
bad("margin_partial_l2", "margin-a-list", {"margin": [0.0, 0.0, 0.0]}, TypeError, "margin")
bad("margin_partial_l2", "margin-other-device", {"margin": torch.zeros(3, device="meta")}, ValueError, "margin", FUNCTIONAL)
bad("margin_partial_l2", "channel_dim-out-of-range", {"channel_dim": 4}, ValueError, "channel_dim")
bad("margin_partial_l2", "channel_dim-float", {"channel_dim": 1.0}, TypeError, "channel_dim")
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
bad("bounded_regression", "mask-per-coordinate", {"mask": torch.ones(6, 4, dtype=torch.bool)}, ValueError, "mask")
bad("bounded_regression", "mask-other-device", {"mask": torch.ones(6, dtype=torch.bool, device="meta")}, ValueError, "mask")
bad("bounded_regression", "target-other-device", {"target": lambda kw: kw["target"].to("meta")}, ValueError, "target")
bad("bounded_regression", "teacher-batch-mismatch", {"teacher": lambda kw: kw["teacher"][:5]}, ValueError, "teacher")
scalars = {"student": torch.tensor(1.0), "teacher": torch.tensor(1.0), "target": torch.tensor(1.0)}
bad("bounded_regression", "student-0d", scalars, ValueError, "student")

# relational losses: (B, C, H, W) maps or (B, N, C) nodes; (B, D) embeddings
bad("pairwise_similarity", "student_feat-2d", {"student_feat": lambda kw: kw["student_feat"][:, :, 0, 0]}, ValueError, "student_feat")
bad("pairwise_similarity", "teacher_feat-5d", {"teacher_feat": lambda kw: kw["teacher_feat"].unsqueeze(0)}, ValueError, "teacher_feat")
bad("pairwise_similarity", "teacher_feat-nodes-for-maps", {"teacher_feat": lambda kw: kw["teacher_feat"].flatten(2)}, ValueError, "teacher_feat")
bad("pairwise_similarity", "teacher_feat-batch-mismatch", {"teacher_feat": lambda kw: kw["teacher_feat"][:1]}, ValueError, "teacher_feat")
nodes = {"student_feat": torch.randn(2, 9, 4), "teacher_feat": torch.randn(2, 5, 6)}
bad("pairwise_similarity", "teacher_feat-nodes-mismatch", nodes, ValueError, "teacher_feat")
bad("pairwise_similarity", "student_feat-empty", {"student_feat": lambda kw: kw["student_feat"][:0], "teacher_feat": lambda kw: kw["teacher_feat"][:0]}, ValueError, "student_feat")
bad("pairwise_similarity", "teacher_feat-no-channels", {"teacher_feat": lambda kw: kw["teacher_feat"][:, :0]}, ValueError, "teacher_feat")
bad("pairwise_similarity", "reduction-batchmean", {"reduction": "batchmean"}, ValueError, "reduction")
bad("rkd_angle", "student_emb-3d", {"student_emb": lambda kw: kw["student_emb"].unsqueeze(0)}, ValueError, "student_emb")
bad("rkd_angle", "teacher_emb-1d", {"teacher_emb": lambda kw: kw["teacher_emb"][0]}, ValueError, "teacher_emb")
bad("rkd_angle", "teacher_emb-batch-mismatch", {"teacher_emb": lambda kw: kw["teacher_emb"][:5]}, ValueError, "teacher_emb")
bad("rkd_angle", "student_emb-empty-batch", {"student_emb": lambda kw: kw["student_emb"][:0], "teacher_emb": lambda kw: kw["teacher_emb"][:0]}, ValueError, "student_emb")
bad("rkd_angle", "teacher_emb-empty-width", {"teacher_emb": lambda kw: kw["teacher_emb"][:, :0]}, ValueError, "teacher_emb")


def _arguments(loss: Loss, overrides: dict) -> dict:
    kwargs = loss.valid()
    for key, value in overrides.items():
        kwargs[key] = value(kwargs) if callable(value) and not isinstance(value, torch.Tensor) else value
    return kwargs


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("loss,overrides,error,argument,form", BAD)
def test_bad_input_names_the_argument_before_any_kernel(loss, overrides, error, argument, form, backend):
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


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"pairwise_similarity", "rkd_angle"}))
def test_empty_batch_is_not_a_mistake(loss):
    # an empty batch is fine (the sum of nothing); only an empty class dimension is rejected
    # (the relational losses reject an empty batch: they compare samples with one another)
    spec = LOSSES[loss]
    per_class = ("class_weight", "margin")  # one value per class / channel, not per sample
    kwargs = {k: v[:0] if isinstance(v, torch.Tensor) and k not in per_class else v for k, v in spec.valid().items()}
    assert spec.call_functional(kwargs).shape == ()


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_checks_run_on_meta_tensors(loss):
    # meta tensors have no data: any check that reads a value would raise here
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in LOSSES[loss].valid().items()}
    with kdkernels.use_backend("torch"):
        assert LOSSES[loss].call_functional(kwargs).device.type == "meta"
