r"""Distillation losses for language models: the divergence family with temperature, sparse top-k
teachers, and the conventions of Hugging Face / TRL users.

**Kernels.** A dense teacher runs through the fused op ``kdkernels::divergences`` (CPU C++,
Triton and CUDA C++), a top-k teacher through ``kdkernels::sparse_divergences`` (CPU C++, Triton
and CUDA C++). Both implement the float64-exact reference
:mod:`kdkernels.ops.reference.divergences` (plain PyTorch, differentiable), which is also their
``torch`` backend and the source of higher-order gradients.

Formulas (``p = softmax(z / T)``; the reference distribution of each divergence is stated in
:mod:`kdkernels.ops.reference.divergences`):

* ``forward_kl``: KL(p_t ‖ p_s); ``reverse_kl``: KL(p_s ‖ p_t);
* ``jsd``: β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m), m = β p_t + (1−β) p_s — TRL's convention: β = 0 is
  KL(p_t ‖ p_s), β = 1 is KL(p_s ‖ p_t) (special-cased, as TRL);
* ``skew_forward_kl``: KL(p_t ‖ β p_t + (1−β) p_s); ``skew_reverse_kl``: KL(p_s ‖ β p_s + (1−β) p_t)
  (DistiLLM's skew KLs, α = ``beta``);
* ``tvd``: ½ Σ |p_t − p_s|;

each times T² when ``scale_by_t2``.
"""

from __future__ import annotations

from numbers import Real

import torch

from kdkernels._validation import check_int, check_mask, check_reduction, check_temperature, check_tensor
from kdkernels.ops._reduction import NONE, SUM, reduction_code
from kdkernels.ops.divergences import DIVERGENCES as DIVERGENCES_OP
from kdkernels.ops.sparse_divergences import SPARSE_DIVERGENCES as SPARSE_DIVERGENCES_OP
from kdkernels.ops.reference.divergences import (
    DIVERGENCES,
    REDUCTIONS,
    TAILS,
    TEACHER_VALUES,
)

IGNORE_INDEX = -100

_INDEX_CHECKS = ("sync", "async", "off")


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, Real):
        raise TypeError(f"beta: expected a real number in [0, 1], got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"beta: expected a number in [0, 1], got {beta}")
    return beta


def _pair(value, name: str) -> tuple[float | None, float | None]:
    """A float for both models or a ``(student, teacher)`` pair; each finite and > 0, or None."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name}: expected a number or a (student, teacher) pair, got {value!r}")
    out = []
    for item in pair:
        out.append(None if item is None else check_temperature(item, name))
    return out[0], out[1]


def _check_indices(indices: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, limit: int, how: str) -> None:
    """Ids in [0, limit) and no id twice in a row of k, at the positions that count (in ``mask``
    and with some teacher value above −inf: padding rows, e.g. a :class:`TopKBatch`'s, hold
    anything).

    Repeats are found by sorting each row of k and comparing neighbours (O(k log k) per position,
    no (…, V) tensor). On CPU the checks read the data directly (no synchronisation exists).
    On an accelerator, ``"sync"`` folds all checks into one boolean and reads it once (one host
    synchronisation per call), ``"async"`` raises through ``torch._assert_async`` without any
    synchronisation (the error then surfaces as a device-side assertion at the next sync, not as
    a ValueError), ``"off"`` skips them (for inputs checked once, e.g. a verified store). Under
    ``torch.compile`` ``"sync"`` acts as ``"async"``, so that ``fullgraph=True`` holds.
    """
    if how == "off" or indices.numel() == 0:
        return
    rows = values.amax(-1) != float("-inf")
    if mask is not None:
        rows = rows & mask
    rows = rows.unsqueeze(-1)
    out_of_range = ((indices < 0) | (indices >= limit)) & rows
    sorted_ids = indices.sort(-1).values
    repeated = (sorted_ids[..., 1:] == sorted_ids[..., :-1]) & rows
    # Under torch.compile a data-dependent branch would break the graph: the compiled code asserts
    # on the device instead (an error at the next synchronisation, as "async").
    if (indices.device.type != "cpu" and how == "async") or torch.compiler.is_compiling():
        torch._assert_async(~(out_of_range.any() | repeated.any()), "teacher_topk: indices out of range or repeated")
        return
    if bool(out_of_range.any()):
        bad = indices[out_of_range]
        raise ValueError(
            f"teacher_topk: indices must lie in [0, {limit}) (the compared vocabulary), got values in "
            f"[{int(bad.min())}, {int(bad.max())}] outside it"
        )
    if bool(repeated.any()):
        position = repeated.any(-1).nonzero()[0].tolist()
        raise ValueError(f"teacher_topk: indices repeat a class id within one position (first at position {tuple(position)})")


def _validate(
    student_logits, teacher_logits, teacher_topk, divergence, beta, temperature, scale_by_t2, tail, teacher_values,
    stored_temperature, mask, labels, ignore_index, reduction, num_items_in_batch, vocab_size, softcap, logit_scale,
    check_indices,
) -> dict:
    check_tensor(student_logits, "student_logits")
    if student_logits.dim() < 1:
        raise ValueError("student_logits: expected at least one dimension (the vocabulary, last), got a 0-d tensor")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    beta = _check_beta(beta)
    temperature = check_temperature(temperature)
    stored_temperature = check_temperature(stored_temperature, "stored_temperature")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2: expected a bool, got {type(scale_by_t2).__name__}")
    check_reduction(reduction, REDUCTIONS)
    if not isinstance(tail, str) or tail not in TAILS:
        raise ValueError(f"tail: expected one of {TAILS}, got {tail!r}")
    if not isinstance(teacher_values, str) or teacher_values not in TEACHER_VALUES:
        raise ValueError(f"teacher_values: expected one of {TEACHER_VALUES}, got {teacher_values!r}")
    if check_indices not in _INDEX_CHECKS:
        raise ValueError(f"check_indices: expected one of {_INDEX_CHECKS}, got {check_indices!r}")
    softcap = _pair(softcap, "softcap")
    logit_scale = _pair(logit_scale, "logit_scale")

    positions = tuple(student_logits.shape[:-1])
    student_vocab = student_logits.shape[-1]
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("teacher_logits / teacher_topk: pass exactly one of them (dense logits, or (indices, values))")

    if vocab_size is not None:
        check_int(vocab_size, "vocab_size")
        if vocab_size < 1 or vocab_size > student_vocab:
            raise ValueError(f"vocab_size: expected 1 ≤ vocab_size ≤ {student_vocab} (the student's vocabulary), got {vocab_size}")
    compared = vocab_size if vocab_size is not None else student_vocab
    if compared == 0:
        raise ValueError(f"student_logits: the vocabulary dimension has size 0 in shape {tuple(student_logits.shape)}")

    if teacher_logits is not None:
        check_tensor(teacher_logits, "teacher_logits")
        if tuple(teacher_logits.shape[:-1]) != positions:
            raise ValueError(
                f"teacher_logits: expected leading shape {positions} to match student_logits, got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.device != student_logits.device:
            raise ValueError(f"teacher_logits: expected device {student_logits.device} to match student_logits, got {teacher_logits.device}")
        teacher_vocab = teacher_logits.shape[-1]
        if vocab_size is None and teacher_vocab != student_vocab:
            raise ValueError(
                f"teacher_logits: vocabulary of {teacher_vocab} classes differs from the student's {student_vocab}; "
                "pass vocab_size= to compare only the shared leading classes"
            )
        if vocab_size is not None and vocab_size > teacher_vocab:
            raise ValueError(f"vocab_size: expected ≤ {teacher_vocab} (the teacher's vocabulary), got {vocab_size}")
        if tail != "renormalize" or teacher_values != "logits":
            # Both only mean something for a sparse teacher; a silent no-op would hide a mistake.
            if tail != "renormalize":
                raise ValueError("tail: only applies to a sparse teacher (teacher_topk); dense teacher_logits have no tail")
            raise ValueError("teacher_values: only applies to teacher_topk; teacher_logits are logits")
        topk = None
    else:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError(f"teacher_topk: expected an (indices, values) pair, got {type(teacher_topk).__name__}")
        indices, values = teacher_topk
        check_tensor(indices, "teacher_topk indices", floating=False)
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.uint16, torch.int8):
            raise TypeError(f"teacher_topk: indices must be an integer tensor, got {indices.dtype}")
        check_tensor(values, "teacher_topk values")
        if tuple(indices.shape[:-1]) != positions or indices.dim() != student_logits.dim():
            raise ValueError(
                f"teacher_topk: indices of shape {tuple(indices.shape)} do not match the student's positions {positions} + (k,)"
            )
        if values.shape != indices.shape:
            raise ValueError(f"teacher_topk: values of shape {tuple(values.shape)} must match indices {tuple(indices.shape)}")
        for tensor, what in ((indices, "indices"), (values, "values")):
            if tensor.device != student_logits.device:
                raise ValueError(f"teacher_topk: {what} on {tensor.device}, expected student_logits' device {student_logits.device}")
        k = indices.shape[-1]
        if k < 1:
            raise ValueError("teacher_topk: k = 0 classes per position; expected k ≥ 1")
        if k > compared:
            raise ValueError(f"teacher_topk: k = {k} exceeds the compared vocabulary of {compared} classes")
        if tail == "tail_bucket" and teacher_values != "logprobs":
            raise ValueError(
                "tail: 'tail_bucket' needs teacher_values='logprobs' (log-probabilities over the full vocabulary); "
                "the missing mass of top-k logits is unknown"
            )
        topk = (indices.long(), values)

    if labels is not None:
        check_tensor(labels, "labels", floating=False)
        if tuple(labels.shape) != positions:
            raise ValueError(f"labels: expected shape {positions} (the logits' positions), got {tuple(labels.shape)}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels: expected device {student_logits.device}, got {labels.device}")
        check_int(ignore_index, "ignore_index")
    check_mask(mask, positions, student_logits.device)
    counted = mask
    if labels is not None:
        counted = labels != ignore_index if counted is None else counted & (labels != ignore_index)

    if teacher_topk is not None:
        _check_indices(topk[0], topk[1], counted, compared, check_indices)

    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool:
                raise ValueError(f"num_items_in_batch: expected a one-element number tensor, got shape {tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, Real):
            raise TypeError(f"num_items_in_batch: expected an int or a one-element tensor, got {type(num_items_in_batch).__name__}")
        elif not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch: expected > 0, got {num_items_in_batch}")
        if reduction == "none":
            raise ValueError("num_items_in_batch: has no meaning with reduction='none' (per-position losses)")

    return dict(
        teacher_topk=topk,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        tail=tail,
        teacher_values=teacher_values,
        stored_temperature=stored_temperature,
        mask=counted,
        vocab_size=vocab_size,
        softcap=softcap,
        logit_scale=logit_scale,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    tail: str = "renormalize",
    teacher_values: str = "logits",
    stored_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float | None, float | None] | None = None,
    check_indices: str = "sync",
    process_group=None,
) -> torch.Tensor:
    r"""Distillation divergence between a student and a (dense or top-k) teacher, per position.

    **Kernels.** A dense teacher runs through the fused op ``kdkernels::divergences``: the CPU C++
    and Triton kernels (the shared online-softmax row walkers, softcap / scale inside, the gradient
    computed in the forward; extra memory = the gradients), and the CUDA C++ kernel (``cuda``
    backend: the default on a GPU without Triton). With ``process_group``, logits sharded along the
    vocabulary go through :func:`kdkernels.llm.vocab_parallel_distill_loss` (PyTorch operations). A top-k teacher runs through the fused op ``kdkernels::sparse_divergences`` (CPU C++,
    Triton and CUDA C++ kernels): one pass over the student's V logits per position
    (none for ``renormalize``), nothing of size (…, V) for the teacher; the extra memory is the
    student's gradient plus O(N·k). ``values`` get a gradient too when they require one.

    Args:
        student_logits: (…, V) logits, vocabulary last (e.g. (batch, seq, V) of a causal LM, already
            aligned with the teacher: position i of both predicts the same token).
        teacher_logits: (…, V_t) dense teacher logits; or
        teacher_topk: ``(indices (…, k) int, values (…, k))``: the teacher's top-k class ids and
            their logits (``teacher_values="logits"``) or full-vocabulary log-probabilities
            (``"logprobs"``, as :class:`kdkernels.llm.TopKTeacherStore` yields; computed at
            ``stored_temperature``, re-tempered to ``temperature``). Padding rows whose values
            are all −inf are not counted.
        divergence: ``forward_kl`` KL(p_t‖p_s) | ``reverse_kl`` KL(p_s‖p_t) | ``jsd`` (TRL's β) |
            ``skew_forward_kl`` KL(p_t‖βp_t+(1−β)p_s) | ``skew_reverse_kl`` KL(p_s‖βp_s+(1−β)p_t) | ``tvd``.
        beta: β ∈ [0, 1] of ``jsd`` and the skew divergences (ignored by the others).
        temperature: T > 0; ``scale_by_t2`` multiplies the loss by T².
        tail: sparse teacher only: ``"renormalize"`` (both conditioned on the k classes) or
            ``"tail_bucket"`` (a (k+1)-th bucket with the remaining mass of each model; log-prob values).
        mask: (…) bool, True = position counts. ``labels`` (…) int with ``ignore_index`` (−100)
            at ignored positions further restricts it (labels aligned with the logits: for a causal
            LM pass the shifted labels).
        reduction: ``none`` | ``sum`` | ``mean`` (÷ counted positions) | ``batchmean`` (÷ size(0)).
        num_items_in_batch: if given, the loss is ``sum / num_items_in_batch`` (HF ``Trainer``'s global
            token count over the accumulated micro-batches and ranks), whatever ``reduction`` says
            (except ``none``, which it rejects).
        vocab_size: compare only the first ``vocab_size`` classes (padded vocabularies).
        softcap / logit_scale: ``cap·tanh(z·scale / cap)`` of the raw logits (−inf kept), a float for
            both models or a ``(student, teacher)`` pair; not applied to log-prob values.
        check_indices: ``"sync"`` (default; on CPU direct checks, on an accelerator one host sync),
            ``"async"`` (``torch._assert_async``, no sync) or ``"off"``.
        process_group: the logits are this rank's slice of the vocabulary, split over the ranks of
            this ``torch.distributed`` group (a tensor-parallel LM head): the loss is the whole
            vocabulary's, identical on every rank, the gradient this rank's slice's
            (:func:`kdkernels.llm.vocab_parallel_distill_loss`; dense teacher, no ``vocab_size``).

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or the positions' shape for ``none``.

    Raises:
        ValueError / TypeError naming the argument, before any computation: k > V, ids out of range
        or repeated, β outside [0, 1], T ≤ 0, shapes, dtypes, devices.
    """
    if process_group is not None:
        if teacher_topk is not None or vocab_size is not None:
            raise ValueError("process_group: vocabulary-parallel logits take a dense teacher_logits shard and no vocab_size")
        from kdkernels.llm.vocab_parallel import vocab_parallel_distill_loss

        return vocab_parallel_distill_loss(
            student_logits, teacher_logits, process_group=process_group, divergence=divergence, beta=beta,
            temperature=temperature, scale_by_t2=scale_by_t2, mask=mask, labels=labels, ignore_index=ignore_index,
            reduction=reduction, num_items_in_batch=num_items_in_batch, softcap=softcap, logit_scale=logit_scale,
        )
    kwargs = _validate(
        student_logits, teacher_logits, teacher_topk, divergence, beta, temperature, scale_by_t2, tail, teacher_values,
        stored_temperature, mask, labels, ignore_index, reduction, num_items_in_batch, vocab_size, softcap, logit_scale,
        check_indices,
    )
    if kwargs["teacher_topk"] is None:
        return _dense_distill_loss(student_logits, teacher_logits, **kwargs)
    return _sparse_distill_loss(student_logits, **kwargs)


def _reduction_and_divisor(reduction, num_items_in_batch, positions_shape):
    """``(op reduction code, scale, tensor divisor or None)`` of a reduction, with HF's
    ``num_items_in_batch`` (sum ÷ it) taking precedence."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return SUM, 1.0, num_items_in_batch
        return SUM, 1.0 / float(num_items_in_batch), None
    code, scale = reduction_code(reduction, positions_shape[0] if positions_shape else 1)
    return code, scale, None


def _dense_distill_loss(
    student_logits, teacher_logits, *, divergence, beta, temperature, scale_by_t2, mask, vocab_size, softcap,
    logit_scale, reduction, num_items_in_batch, **_sparse_only,
):
    """A dense teacher through the fused op (:data:`kdkernels.ops.divergences.DIVERGENCES`):
    Triton where it runs; elsewhere the same formula as the reference, through the op's twin."""
    s, t = student_logits, teacher_logits
    if vocab_size is not None:  # the shared leading classes: a strided view, no copy
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    positions_shape = tuple(s.shape[:-1])
    if reduction == "mean" and num_items_in_batch is None:
        # "mean" divides by the positions that count, and a teacher row of −inf only has none:
        # fold that into the mask (one read of the teacher; the other reductions need none).
        has_mass = t.amax(-1) != float("-inf")
        mask = has_mass if mask is None else mask & has_mass
    classes = s.shape[-1]
    # (positions, classes, 1) views; reshape copies only a layout that cannot be flattened.
    s3, t3 = s.reshape(-1, classes).unsqueeze(-1), t.reshape(-1, classes).unsqueeze(-1)
    mask2 = None if mask is None else mask.reshape(-1, 1)
    code, scale, divisor = _reduction_and_divisor(reduction, num_items_in_batch, positions_shape)
    loss = DIVERGENCES_OP(
        s3, t3, mask2, divergence, beta, temperature, scale_by_t2, *softcap, *logit_scale, reduction=code, scale=scale
    )
    if divisor is not None:
        loss = loss / divisor.to(device=loss.device, dtype=loss.dtype)
    return loss.reshape(positions_shape) if code == NONE else loss


def _sparse_distill_loss(
    student_logits, *, teacher_topk, divergence, beta, temperature, scale_by_t2, tail, teacher_values,
    stored_temperature, mask, vocab_size, softcap, logit_scale, reduction, num_items_in_batch,
):
    """A top-k teacher through the fused op (:data:`kdkernels.ops.sparse_divergences.SPARSE_DIVERGENCES`):
    the CPU or Triton kernel, else its twin (the reference). Nothing of size (…, V) is made for the
    teacher; the student's gradient is the only (…, V) buffer."""
    indices, values = teacher_topk
    s = student_logits if vocab_size is None else student_logits[..., :vocab_size]  # a view
    positions_shape = tuple(s.shape[:-1])
    if reduction == "mean" and num_items_in_batch is None:
        # "mean" divides by the positions that count; a row of k −inf values has no teacher mass
        # (the logit transforms keep −inf and NaN): fold that into the mask, O(N·k).
        has_mass = values.amax(-1) != float("-inf")
        mask = has_mass if mask is None else mask & has_mass
    classes, k = s.shape[-1], indices.shape[-1]
    # (positions, ·, 1) views; reshape copies only a layout that cannot be flattened.
    s3 = s.reshape(-1, classes).unsqueeze(-1)
    v3 = values.reshape(-1, k).unsqueeze(-1)
    i3 = indices.reshape(-1, k).unsqueeze(-1)
    mask2 = None if mask is None else mask.reshape(-1, 1)
    code, scale, divisor = _reduction_and_divisor(reduction, num_items_in_batch, positions_shape)
    loss = SPARSE_DIVERGENCES_OP(
        s3, v3, i3, mask2, divergence, beta, temperature, scale_by_t2, tail, teacher_values, stored_temperature,
        *softcap, *logit_scale, reduction=code, scale=scale,
    )
    if divisor is not None:
        loss = loss / divisor.to(device=loss.device, dtype=loss.dtype)
    return loss.reshape(positions_shape) if code == NONE else loss


def generalized_jsd_loss(
    student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None
):
    r"""Drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` (same signature, β convention and reductions).

    β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m), m = β p_t + (1−β) p_s, p = softmax(z / T), no T² factor;
    β = 0 → KL(p_t ‖ p_s), β = 1 → KL(p_s ‖ p_t). ``labels`` (…) with −100 = ignored. Reductions as
    TRL (trl 1.16.0): ``batchmean`` = sum ÷ counted positions (with labels; clamped ≥ 1) or ÷ size(0)
    (without); ``sum``; ``mean`` = mean over the *elements* (counted positions × V) of the pointwise
    terms; anything else returns the pointwise (…, V) terms, of the counted positions only when
    labels are given (TRL's ``jsd[mask]``). ``num_items_in_batch`` (added in TRL 1.x): when given,
    the loss is the sum ÷ it, whatever ``reduction`` says (TRL's gradient-accumulation fix). The
    pointwise terms are the reference's per-class summands (computed here in float32 / float64).
    """
    check_tensor(student_logits, "student_logits")
    check_tensor(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)} to match student_logits, got {tuple(teacher_logits.shape)}")
    beta = _check_beta(beta)
    temperature = check_temperature(temperature)
    mask = None
    if labels is not None:
        check_tensor(labels, "labels", floating=False)
        if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
        mask = labels != IGNORE_INDEX
    if num_items_in_batch is not None:
        total = distill_loss(
            student_logits, teacher_logits, divergence="jsd", beta=beta, temperature=temperature,
            scale_by_t2=False, mask=mask, reduction="sum",
        )
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction in ("batchmean", "sum"):
        per_position = distill_loss(
            student_logits, teacher_logits, divergence="jsd", beta=beta, temperature=temperature,
            scale_by_t2=False, mask=mask, reduction="none",
        )
        total = per_position.sum()
        if reduction == "sum":
            return total
        denominator = mask.sum().clamp_min(1) if mask is not None else max(per_position.shape[0] if per_position.dim() else 1, 1)
        return total / denominator
    pointwise = jsd_pointwise(student_logits, teacher_logits, beta, temperature)
    if mask is not None:
        pointwise = pointwise[mask]
    return pointwise.mean() if reduction == "mean" else pointwise


def jsd_pointwise(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """The per-class summands of the generalized JSD (TRL's ``reduction="none"``), (…, V)."""
    from kdkernels._dtypes import accumulation_dtype
    from kdkernels.ops.reference.divergences import NEG_INF, log_mixture

    dtype = accumulation_dtype(student_logits, teacher_logits)
    log_p_s = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_p_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)

    def terms(log_x, log_y):
        support = log_x != NEG_INF
        lx = torch.where(support, log_x, 0.0)
        return lx.exp() * (lx - torch.where(support, log_y, 0.0))

    if beta == 0:
        return terms(log_p_t, log_p_s)
    if beta == 1:
        return terms(log_p_s, log_p_t)
    log_m = log_mixture(log_p_t, log_p_s, beta)
    return beta * terms(log_p_t, log_m) + (1 - beta) * terms(log_p_s, log_m)
