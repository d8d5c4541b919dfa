"""NaN and ±inf follow the rules of ``kdkernels/ops/reference/__init__.py`` for every fused loss,
on every backend that runs here, in every layout (table in ``tests/fused_losses.py``; the losses
whose rules are written there)."""

import pytest
import torch

from tests.fused_losses import BACKEND_PARAMS, BY_NAME, LOSSES, element_at_position, first_masked_out, loss_and_grads, make_case

ALL = BACKEND_PARAMS
GRID = [(loss.name, layout) for loss in LOSSES if loss.nan_rules for layout in loss.layouts]
SOFTMAX_GRID = [(name, layout) for name, layout in GRID if BY_NAME[name].softmax]


def _run(loss, case, reduction, backend):
    return loss_and_grads(loss, case, reduction, backend, torch.float32)


def _case_with_value_at_position_0(name, layout, which, value):
    """The loss named ``name`` and a case of it whose input ``which`` (0: student, 1: teacher)
    holds ``value`` at one element of position 0."""
    loss = BY_NAME[name]
    case = make_case(loss, layout)
    case.inputs[which][element_at_position(case, 0)] = value
    return loss, case


def _close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2e-4, atol=2e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("poisoned", [0, 1], ids=["nan_student", "nan_teacher"])
@pytest.mark.parametrize("name,layout", GRID)
def test_nan_in_a_counted_position_is_nan_and_masked_positions_stay_zero(name, layout, poisoned, backend):
    loss, case = _case_with_value_at_position_0(name, layout, poisoned, float("nan"))
    masked = first_masked_out(case)
    if masked is not None:  # whatever a masked-out position holds, it stays out
        for k in (0, 1):
            case.inputs[k][element_at_position(case, masked)] = float("nan")
    out, grads = _run(loss, case, "none", backend)
    expected, expected_grads = loss_and_grads(loss, case, "none", None)
    assert out.reshape(-1)[0].isnan(), "the poisoned position's loss is not NaN"
    assert not out.reshape(-1)[1:].isnan().all() or out.numel() == 1
    _close(out, expected, "loss")
    for g, e in zip(grads, expected_grads):
        _close(g, e, "gradient")
    if masked is not None:
        assert out.reshape(-1)[masked] == 0
        where = element_at_position(case, masked)
        for g in grads:
            assert g[where] == 0
    if loss.softmax:  # the whole class vector of the poisoned position has NaN gradients
        row = list(element_at_position(case, 0))
        row[case.dim] = slice(None)
        assert grads[0][tuple(row)].isnan().all()
    for reduction in ("sum", "mean"):
        reduced, _ = _run(loss, case, reduction, backend)
        assert reduced.isnan(), reduction


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name,layout", SOFTMAX_GRID)
def test_minus_inf_teacher_is_an_excluded_class_exactly(name, layout, backend):
    loss = BY_NAME[name]
    case = make_case(loss, layout)
    s, t = case.inputs[:2]
    excluded = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    excluded.select(case.dim, 0).fill_(False)  # every position keeps some teacher mass
    t[excluded] = float("-inf")
    # the student says anything there: -inf, a huge value, an ordinary one
    s[excluded] = torch.tensor([float("-inf"), 1e30, 1.0]).repeat(excluded.sum().item() // 3 + 1)[: excluded.sum()]
    s[excluded & (s.abs() > 1e29)] = 30.0  # finite but far from the rest (1e30 / T overflows fp32 exp terms)
    out, grads = _run(loss, case, "none", backend)
    expected, expected_grads = loss_and_grads(loss, case, "none", None)
    assert torch.isfinite(out).all()
    _close(out, expected, "loss")
    _close(grads[0], expected_grads[0], "student gradient")
    _close(grads[1], expected_grads[1], "teacher gradient")
    assert (grads[1][excluded] == 0).all(), "an excluded class got a teacher gradient"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name,layout", SOFTMAX_GRID)
def test_minus_inf_student_where_the_teacher_has_mass_is_plus_inf(name, layout, backend):
    loss, case = _case_with_value_at_position_0(name, layout, 0, float("-inf"))
    out, grads = _run(loss, case, "none", backend)
    assert out.reshape(-1)[0] == float("inf")
    assert torch.isfinite(out.reshape(-1)[1:]).all()
    assert torch.isfinite(grads[0]).all(), "the student gradient T·(p_s − p_t) stays finite"
    expected, expected_grads = loss_and_grads(loss, case, "none", None)
    _close(out, expected, "loss")
    _close(grads[0], expected_grads[0], "student gradient")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name,layout", SOFTMAX_GRID)
def test_plus_inf_logit_makes_the_row_nan(name, layout, backend):
    loss, case = _case_with_value_at_position_0(name, layout, 0, float("inf"))
    out, _ = _run(loss, case, "none", backend)
    assert out.reshape(-1)[0].isnan()
    assert not out.reshape(-1)[1:].isnan().any()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("layout", BY_NAME["kd_loss"].layouts)
def test_identical_student_and_teacher_give_exactly_zero(layout, backend):
    loss = BY_NAME["kd_loss"]
    case = make_case(loss, layout)
    case.inputs[1] = case.inputs[0].clone(memory_format=torch.preserve_format) * 7
    case.inputs[0] = case.inputs[1].clone(memory_format=torch.preserve_format)
    out, grads = _run(loss, case, "none", backend)
    assert (out == 0).all(), out
    assert all(g.abs().max() < 1e-6 for g in grads)


@pytest.mark.parametrize("backend", ALL)
def test_identical_elementwise_inputs_give_exactly_zero(backend):
    x = torch.randn(5, 9).log_softmax(-1)
    margin = torch.full((5,), -1.0)
    import kdkernels
    import kdkernels.functional as KF

    with kdkernels.use_backend(backend):
        assert (KF.kl_div(x, x.clone(), reduction="none", log_target=True) == 0).all()
        assert (KF.margin_partial_l2(x.reshape(1, 5, 9), x.reshape(1, 5, 9).clone(), margin, "none") == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [1.0, 3.0, 20.0])
@pytest.mark.parametrize("name", ["kd_loss", "weighted_soft_ce"])
def test_one_class_gives_exactly_zero(name, temperature, backend):
    loss = BY_NAME[name]
    case = make_case(loss, "rows")
    s = torch.randn(6, 1) * 5
    case.inputs[0], case.inputs[1] = s, torch.randn(6, 1) * 5
    case.mask = torch.ones(6, dtype=torch.bool)
    case.kwargs["temperature"] = temperature
    if name == "weighted_soft_ce":
        case.inputs[2] = torch.ones(1)
    out, grads = _run(loss, case, "none", backend)
    assert (out == 0).all(), out
    assert (grads[0] == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.7])
@pytest.mark.parametrize("name,layout", [(n, lay) for n, lay in SOFTMAX_GRID if lay != "long"])
def test_large_finite_logits_are_never_nan(name, layout, temperature, backend):
    loss = BY_NAME[name]
    case = make_case(loss, layout)
    for k in (0, 1):
        case.inputs[k] = case.inputs[k] * 1e10
    case.kwargs["temperature"] = temperature
    out, grads = _run(loss, case, "none", backend)
    expected, expected_grads = loss_and_grads(loss, case, "none", None)
    assert torch.isfinite(expected).all()
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_invalid_targets_are_nan_like_torch(backend, log_target):
    import kdkernels
    import kdkernels.functional as KF
    import torch.nn.functional as F

    x = torch.randn(3, 5).log_softmax(-1)
    y = torch.rand(3, 5)
    y[0, 1] = -0.5 if not log_target else float("nan")
    y[1, 2] = float("nan")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    torch_loss = F.kl_div(xr, yr, reduction="none", log_target=log_target)
    torch_loss.sum().backward()
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    with kdkernels.use_backend(backend):
        ours = KF.kl_div(xa, ya, reduction="none", log_target=log_target)
        assert KF.kl_div(x, y, reduction="sum", log_target=log_target).isnan()
    ours.sum().backward()
    assert torch.equal(ours.isnan(), torch_loss.isnan())
    _close(ours, torch_loss, "loss")
    _close(xa.grad, xr.grad, "input gradient")
    assert torch.equal(ya.grad.isnan(), yr.grad.isnan() & (y != 0))


@pytest.mark.parametrize("backend", ALL)
def test_kl_div_documented_deviations_are_the_same_on_every_backend(backend):
    import kdkernels
    import kdkernels.functional as KF

    x = torch.tensor([[-1.0, -2.0, float("nan"), float("-inf")]], requires_grad=True)
    y = torch.tensor([[0.0, 0.5, 0.0, 0.0]], requires_grad=True)
    with kdkernels.use_backend(backend):
        loss = KF.kl_div(x, y, reduction="none")
        empty = KF.kl_div(torch.empty(0, 3), torch.empty(0, 3), reduction="sum")
    loss.sum().backward()
    assert y.grad[0, 0] == 0, "zero target: gradient 0 (torch: -inf)"
    assert y.grad[0, 2].isnan() and y.grad[0, 3].isnan(), "zero target, non-finite input: NaN"
    assert loss[0, 2].isnan() and loss[0, 3].isnan()
    assert empty == 0
