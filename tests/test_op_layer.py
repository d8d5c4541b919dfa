"""The op layer built from one declaration per fused loss (kdkernels.ops.fused_loss)."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import kdkernels
from kdkernels.functional import kd_loss
from kdkernels.ops.bounded_regression import BOUNDED_REGRESSION
from kdkernels.ops.divergences import DIVERGENCES
from kdkernels.ops.kd_loss import KD_LOSS
from kdkernels.ops.kl_div import KL_DIV
from kdkernels.ops.margin_partial_l2 import MARGIN_PARTIAL_L2
from kdkernels.ops.pairwise_similarity import PAIRWISE_SIMILARITY
from kdkernels.ops.rkd_angle import RKD_ANGLE
from kdkernels.ops.weighted_soft_ce import WEIGHTED_SOFT_CE

SPECS = [KD_LOSS, KL_DIV, WEIGHTED_SOFT_CE, MARGIN_PARTIAL_L2, BOUNDED_REGRESSION, PAIRWISE_SIMILARITY, RKD_ANGLE, DIVERGENCES]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_schemas_follow_from_the_declared_kernel(spec):
    op_schema = spec.op._opoverload._schema
    inputs = [p.name for p in spec.inputs]
    flags = [f"{n}_grad" for n in spec.differentiable]
    assert [a.name for a in op_schema.arguments] == inputs + ["reduction", "scale"] + flags + ["backend"]
    assert len(op_schema.returns) == 1 + len(spec.differentiable)
    # The extension's kernel op exists where the loss has a C++ kernel (divergences: Triton only).
    if kdkernels._extension.has_extension() and {"cpu", "cuda"} & set(spec.kernel_backends):
        kernel_schema = getattr(torch.ops.kdkernels, spec.kernel_name).default._schema
        expected = inputs + ["grad_scale"] + (["reduce"] if spec.kernel_reduces else []) + flags
        assert [a.name for a in kernel_schema.arguments] == expected


def _graph_ops(backend_name):
    """Operators in the forward graph AOTAutograd hands to the compiler for kd_loss."""
    seen = []

    def forward_compiler(gm, _example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiler = aot_autograd(fw_compiler=forward_compiler)
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9)
    with kdkernels.use_backend(backend_name):
        torch._dynamo.reset()
        torch.compile(lambda a, b: kd_loss(a, b, temperature=2.0), backend=compiler, fullgraph=True)(s, t)
    return seen


def test_compiler_sees_the_kernel_not_the_op():
    if "cpu" not in kdkernels.backends.available("cpu"):
        pytest.skip("the extension is not built")
    ops = _graph_ops("cpu")
    # The fused op is inlined into its body: the compiler gets the extension's kernel op and the
    # reduction, which is what lets Inductor see (and schedule) Triton kernels on a GPU.
    assert any("kdkernels.kd_loss_rows" in o for o in ops), ops
    assert not any(o.startswith("kdkernels.kd_loss.") for o in ops), ops


def test_interpreted_triton_keeps_the_op_whole():
    if "triton" not in kdkernels.backends.available("cpu"):
        pytest.skip("Triton's interpreter is not available")
    ops = _graph_ops("triton")
    # Interpreted Triton kernels cannot run on fake tensors: the op stays whole, its fake stands in.
    assert any(o.startswith("kdkernels.kd_loss.") for o in ops), ops


def test_torch_backend_is_the_twin_through_the_same_dispatch():
    s = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 2, dtype=torch.float64)
    with kdkernels.use_backend("torch"):
        loss = KD_LOSS(s, t, None, 1.5, reduction=1, scale=1.0)
    # An ordinary autograd graph (no custom op): differentiable to any order.
    assert "kd_loss" not in type(loss.grad_fn).__name__
    expected = KD_LOSS.twin(s, t, None, 1.5).sum()
    torch.testing.assert_close(loss, expected)


def test_asking_for_a_backend_without_a_kernel_says_so(monkeypatch):
    monkeypatch.setattr(kdkernels.backends, "why_unavailable", lambda name, device: None)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    with kdkernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="no cuda kernel yet"):
            RKD_ANGLE(s, t, reduction=1, scale=1.0)
