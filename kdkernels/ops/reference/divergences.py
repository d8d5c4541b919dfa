r"""Reference divergences for LLM distillation: the readable, differentiable spec of
:func:`kdkernels.llm.distill_loss` (and of the fused kernels that will implement it).

Notation: ``p_t`` is the teacher's distribution, ``p_s`` the student's, both ``softmax(z / T)``
of (capped, scaled, leading-vocabulary) logits at temperature ``T``, per position. "Reference"
below means the distribution the expectation is taken under (the first argument of the KL).

=====================  =====================================================================  ==============
``divergence``         per-position formula                                                    reference dist.
=====================  =====================================================================  ==============
``forward_kl``         KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)                               teacher
``reverse_kl``         KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)                               student
``jsd``                β KL(p_t ‖ m) + (1−β) KL(p_s ‖ m),  m = β p_t + (1−β) p_s;              both, vs m
                       β = 0 → KL(p_t ‖ p_s), β = 1 → KL(p_s ‖ p_t) (special cases)
``skew_forward_kl``    KL(p_t ‖ β p_t + (1−β) p_s)                                             teacher
``skew_reverse_kl``    KL(p_s ‖ β p_s + (1−β) p_t)                                             student
``tvd``                ½ Σ |p_t − p_s|                                                         (symmetric)
=====================  =====================================================================  ==============

* ``jsd`` is the generalized Jensen–Shannon divergence of GKD (Agarwal et al., "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes", 2024, eq. 1) with TRL's
  β convention, read from ``GKDTrainer.generalized_jsd_loss`` (trl 1.16.0,
  ``trl/experimental/gkd/gkd_trainer.py``): the mixture is ``β·p_t + (1−β)·p_s`` (P = teacher,
  weight β), and β = 0 / β = 1 are *special-cased* to forward KL(p_t ‖ p_s) / reverse
  KL(p_s ‖ p_t). The mixture formula itself tends to 0 at both ends (m → p_s resp. m → p_t), so
  the loss is discontinuous at β ∈ {0, 1}; we keep TRL's convention so that TRL users get the
  same numbers.
* ``skew_forward_kl`` / ``skew_reverse_kl`` are DistiLLM's skew KL / skew reverse KL (Ko et al.,
  "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024), with the skew
  weight α passed as ``beta`` (DistiLLM uses α = 0.1). β = 0 gives the plain KL of that direction;
  β = 1 gives 0.
* ``tvd`` is the total variation distance (as Liger-Kernel's ``LigerTVDLoss``, which has no
  temperature).
* ``scale_by_t2`` multiplies every divergence by T² (Hinton et al., 2015: keeps the gradient's
  magnitude independent of T); TRL's ``generalized_jsd_loss`` does not (use ``scale_by_t2=False``).

Sparse teacher (``teacher_topk``): the teacher is known only on k classes per position, as
top-k ids and values (raw logits, or log-probabilities normalised over the full vocabulary, as
:mod:`kdkernels.llm.topk_store` writes them). The divergence is then taken over fewer "buckets":

* ``tail="renormalize"``: the k classes only; both distributions are conditioned on them
  (teacher: softmax of its k tempered values; student: softmax of its logits at the k ids). This
  is a proper divergence between two distributions over the same k outcomes for every entry of
  the table (keeping the student normalised over V instead would not be, for reverse KL/JSD/TVD).
  The student's gradient is zero outside the k ids.
* ``tail="tail_bucket"``: k + 1 buckets: the k classes plus one bucket holding the rest: the
  teacher's missing mass ``1 − Σ_k p_t`` and the student's mass outside the k ids
  ``Σ_{c ∉ top-k} p_s,c``, both in log space (teacher: ``log(1 − exp(logsumexp(values)))``, 0 mass
  when rounding makes the stored mass ≥ 1; student: ``logsumexp`` of its tempered logits over the
  complement, no cancellation). Needs log-prob values (a logit's normaliser is unknown).
  The student's gradient is dense (the tail bucket depends on every logit).
* Re-tempering of stored log-probs: values written at temperature T₀ (``stored_temperature``,
  the store's ``temperature``) are used at T as ``values · T₀ / T`` before normalising (exact for
  the k classes up to the normaliser, since ``log p_T₀ = z/T₀ − c``). In ``tail_bucket`` mode the
  tail is re-tempered as if it were one class, ``log tail_T₀ · T₀ / T``, then the k + 1 buckets are
  renormalised: exact at T = T₀, an approximation otherwise (the tail's logits are not stored).
* Entries with value −inf (e.g. the store's padding) have no teacher mass; a position whose k
  values are all −inf has no teacher distribution and is not counted.

Logit transforms, applied to raw logits before the temperature: ``logit_scale`` (z·s, e.g.
Cohere/Granite) then ``softcap`` (cap·tanh(z / cap), Gemma 2/3), each a float for both models or a
``(student, teacher)`` pair; a −inf logit (a masked vocabulary entry) stays −inf. ``vocab_size``
keeps only the first ``vocab_size`` classes of both models (teacher and student vocabularies that
differ only by padding, e.g. Qwen2.5's 152,064 vs 151,936).

Non-finite values follow ``kdkernels/ops/reference/__init__.py``: a NaN logit in a counted row
makes its loss and gradients NaN; masked-out rows give exactly 0 and zero gradients whatever they
hold; a −inf teacher logit is a class with p_t = 0 (contributes 0); a −inf student logit where the
reference distribution has mass gives +inf (finite gradient); a row with no teacher mass at all is
not counted.

Reductions (of the per-position losses, counted positions only): ``none`` (same shape as a
position), ``sum``, ``mean`` (÷ counted positions), ``batchmean`` (÷ size(0), as ``nn.KLDivLoss``
and ``kd_loss``). ``num_items_in_batch`` overrides the reduction with ``sum / num_items_in_batch``:
Hugging Face's convention for gradient accumulation (the ``Trainer`` counts the label tokens that
are not ``-100`` over *all* micro-batches of an optimizer step, after the causal shift, and across
data-parallel ranks when ``average_tokens_across_devices``), so that the accumulated gradient equals
that of one big batch.
"""

from __future__ import annotations

import math

import torch

from kdkernels._dtypes import accumulation_dtype

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TAILS = ("renormalize", "tail_bucket")
TEACHER_VALUES = ("logits", "logprobs")
REDUCTIONS = ("none", "sum", "mean", "batchmean")

NEG_INF = float("-inf")


def transform_logits(z: torch.Tensor, logit_scale: float | None, softcap: float | None) -> torch.Tensor:
    """``softcap(z · logit_scale)`` with −inf (a masked vocabulary entry) kept −inf."""
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.where(z == NEG_INF, z, softcap * torch.tanh(z / softcap))
    return z


def kl_terms(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Σ_c x_c (log x_c − log y_c) over the last dim, with 0·log 0 = 0 selected (not multiplied)
    so that x = 0 entries give neither NaN values nor NaN gradients; y = 0 where x > 0 gives +inf."""
    support = log_x != NEG_INF  # NaN counts as support: NaN propagates
    lx = torch.where(support, log_x, 0.0)
    ly = torch.where(support, log_y, 0.0)
    return (lx.exp() * (lx - ly)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) for 0 < w < 1, in log space. Where both are 0 the result is −inf and the
    inputs are replaced by 0 first, so that no NaN gradient flows from an unused entry."""
    both_zero = (log_a == NEG_INF) & (log_b == NEG_INF)
    la = torch.where(both_zero, 0.0, log_a) + math.log(weight_a)
    lb = torch.where(both_zero, 0.0, log_b) + math.log1p(-weight_a)
    return torch.where(both_zero, NEG_INF, torch.logaddexp(la, lb))


def divergence_from_log_probs(log_p_t: torch.Tensor, log_p_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The per-position divergence (table above) of two normalised log-distributions over the last dim."""
    if divergence == "forward_kl":
        return kl_terms(log_p_t, log_p_s)
    if divergence == "reverse_kl":
        return kl_terms(log_p_s, log_p_t)
    if divergence == "jsd":
        if beta == 0:
            return kl_terms(log_p_t, log_p_s)
        if beta == 1:
            return kl_terms(log_p_s, log_p_t)
        log_m = log_mixture(log_p_t, log_p_s, beta)
        return beta * kl_terms(log_p_t, log_m) + (1 - beta) * kl_terms(log_p_s, log_m)
    if divergence == "skew_forward_kl":
        if beta == 1:
            return kl_terms(log_p_t, log_p_t)  # exactly 0
        log_m = log_p_s if beta == 0 else log_mixture(log_p_t, log_p_s, beta)
        return kl_terms(log_p_t, log_m)
    if divergence == "skew_reverse_kl":
        if beta == 1:
            return kl_terms(log_p_s, log_p_s)
        log_m = log_p_t if beta == 0 else log_mixture(log_p_s, log_p_t, beta)
        return kl_terms(log_p_s, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)
    raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate near both ends; x ≥ 0 (rounding put the stored mass at or
    above 1) → −inf, no mass left, with a zero gradient (inputs replaced before the arithmetic)."""
    empty = x >= 0
    x = torch.where(empty, -1.0, x)
    near_zero = x > -math.log(2)
    safe_near = torch.where(near_zero, x, -1.0)
    safe_far = torch.where(near_zero, -1.0, x)
    value = torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))
    return torch.where(empty, NEG_INF, value)


def sparse_log_probs(
    s: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    *,
    temperature: float,
    tail: str,
    teacher_values: str,
    stored_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p_t, log p_s)`` over the k (renormalize) or k + 1 (tail_bucket) buckets.

    ``s``: student logits (…, V) after the transforms, not yet tempered; ``values``: the teacher's
    k values (logits after the transforms, or full-vocabulary log-probs at ``stored_temperature``).
    """
    s_t = s / temperature
    gathered = s_t.gather(-1, indices)
    if teacher_values == "logits":
        teacher_scaled = values / temperature
    else:
        teacher_scaled = values * (stored_temperature / temperature)
    if tail == "renormalize":
        return torch.log_softmax(teacher_scaled, -1), torch.log_softmax(gathered, -1)
    # tail_bucket: the teacher's missing mass at the stored temperature, re-tempered as one class.
    if indices.shape[-1] == s.shape[-1]:
        # k = V: there is no class outside the top-k; what 1 − Σ p_t holds is rounding, not mass.
        log_tail_t = torch.full_like(values[..., :1], NEG_INF)
    else:
        log_tail_t = _log1mexp(torch.logsumexp(values, -1, keepdim=True)) * (stored_temperature / temperature)
    log_p_t = torch.log_softmax(torch.cat([teacher_scaled, log_tail_t], -1), -1)
    log_z_s = torch.logsumexp(s_t, -1, keepdim=True)
    outside = s_t.scatter(-1, indices, NEG_INF)
    # No mass outside (k = V, or −inf logits there): −inf, with inputs replaced first so that
    # logsumexp's backward (exp(x − lse) = exp(nan)) never sees −inf − (−inf).
    outside_empty = outside.amax(-1, keepdim=True) == NEG_INF
    log_tail_s = torch.where(
        outside_empty, NEG_INF, torch.logsumexp(torch.where(outside_empty, 0.0, outside), -1, keepdim=True)
    )
    log_p_s = torch.cat([gathered, log_tail_s], -1) - log_z_s
    return log_p_t, log_p_s


def zero_uncounted(s: torch.Tensor, t: torch.Tensor, teacher_max: torch.Tensor, mask: torch.Tensor | None):
    """``(s, t, counted)``: a position counts where ``mask`` allows and the teacher's row maximum is
    not −inf (NaN counts); the logits of the others are replaced by zeros *before* any
    arithmetic, so that they give an exact 0 and zero gradients whatever they hold."""
    counted = teacher_max != NEG_INF
    if mask is not None:
        counted = counted & mask
    keep = counted.unsqueeze(-1)
    return torch.where(keep, s, 0.0), torch.where(keep, t, 0.0), counted


def distill_loss_positions(
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
    vocab_size: int | None = None,
    softcap: tuple[float | None, float | None] = (None, None),
    logit_scale: tuple[float | None, float | None] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-position loss, counted)``: the loss of every position (classes on the last dim), in
    float32 (float64 if an input is float64), exactly 0 with zero gradients where not counted;
    ``counted`` (bool, the positions' shape) = mask ∧ the teacher has mass."""
    if teacher_topk is not None:
        indices, values = teacher_topk
        dtype = accumulation_dtype(student_logits, values)
        t = values.to(dtype)
        if teacher_values == "logits":
            t = transform_logits(t, logit_scale[1], softcap[1])
    else:
        dtype = accumulation_dtype(student_logits, teacher_logits)
        t = teacher_logits.to(dtype)
        if vocab_size is not None:
            t = t[..., :vocab_size]
        t = transform_logits(t, logit_scale[1], softcap[1])
    s = student_logits.to(dtype)
    if vocab_size is not None:
        s = s[..., :vocab_size]
    s = transform_logits(s, logit_scale[0], softcap[0])

    # A row counts when it is in the mask and the teacher has some mass (max ≠ −inf; NaN counts).
    teacher_max = t.amax(-1) if t.shape[-1] > 0 else t.new_full(t.shape[:-1], NEG_INF)
    s, t, counted = zero_uncounted(s, t, teacher_max, mask)

    if teacher_topk is None:
        log_p_t = torch.log_softmax(t / temperature, -1)
        log_p_s = torch.log_softmax(s / temperature, -1)
    else:
        log_p_t, log_p_s = sparse_log_probs(
            s,
            indices,
            t,
            temperature=temperature,
            tail=tail,
            teacher_values=teacher_values,
            stored_temperature=stored_temperature,
        )
    loss = divergence_from_log_probs(log_p_t, log_p_s, divergence, beta)
    if scale_by_t2:
        loss = loss * temperature**2
    return torch.where(counted, loss, torch.zeros_like(loss)), counted


def reduce_distill(
    per_position: torch.Tensor,
    counted: torch.Tensor,
    reduction: str,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-position losses (already 0 where not counted); see the module docstring."""
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(device=total.device, dtype=total.dtype)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(per_position.shape[0] if per_position.dim() else 1, 1)
    return total / counted.sum(dtype=torch.int64).clamp_min(1).to(total.dtype)


def bucket_gradient(log_p_t: torch.Tensor, log_p_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """g = ∂D/∂(log p_s) per bucket, in closed form: what a fused kernel accumulates per element.

    With u = log p_s, v = log p_t, p = p_s, q = p_t and m the mixture of each divergence:

    * forward_kl: g = −q;  reverse_kl: g = p (u − v + 1);
    * jsd (0 < β < 1): g = (1−β) p (u − log m)   (the mixture terms cancel);
    * skew_forward_kl: g = −(1−β) q p / m;  skew_reverse_kl: g = p (u − log m + 1) − β p² / m;
    * tvd: g = ½ p sign(p − q);
    * the endpoints: β = 0 of jsd / skew_forward_kl is forward_kl's, β = 0 of skew_reverse_kl and
      β = 1 of jsd are reverse_kl's, β = 1 of the skew divergences is 0.

    The student's logit gradient follows from it (:func:`student_logit_gradient`). Rows and
    entries are assumed counted and finite (the edge cases are the reference's, above).
    """
    p, q = log_p_s.exp(), log_p_t.exp()
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and beta == 1:
        return torch.zeros_like(p)  # KL(x ‖ x) = 0 whatever the student
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0) or (divergence == "skew_forward_kl" and beta == 0):
        return -q
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1) or (divergence == "skew_reverse_kl" and beta == 0):
        return p * (log_p_s - log_p_t + 1)
    if divergence == "jsd":
        return (1 - beta) * p * (log_p_s - log_mixture(log_p_t, log_p_s, beta))
    if divergence == "skew_forward_kl":
        return -(1 - beta) * q * p / log_mixture(log_p_t, log_p_s, beta).exp()
    if divergence == "skew_reverse_kl":
        log_m = log_mixture(log_p_s, log_p_t, beta)
        return p * (log_p_s - log_m + 1) - beta * p * p / log_m.exp()
    if divergence == "tvd":
        return 0.5 * p * torch.sign(p - q)
    raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")


def student_logit_gradient(
    student_logits: torch.Tensor, g: torch.Tensor, temperature: float, indices: torch.Tensor | None = None, tail: str = "renormalize"
) -> torch.Tensor:
    """∂D/∂z_s (…, V) from the bucket gradient ``g`` (:func:`bucket_gradient`), before T² and the
    reduction's scale; ``student_logits`` already transformed (cap/scale, vocab slice).

    * dense (V buckets), u = log softmax(z/T): ∂D/∂z_j = (g_j − p_j Σ_i g_i) / T.
    * renormalize (k buckets, p conditioned on the k ids): the same on the k gathered logits,
      scattered into zeros (no gradient outside the k ids).
    * tail_bucket (k + 1 buckets, u_b = z_b/T − lse(z/T) for b in the top-k, u_tail = log Σ_{j∉K} p_j):
      ∂D/∂z_j = (g_j·[j∈K] + g_tail·p_j/P_tail·[j∉K] − p_j Σ_b g_b) / T, p the full-vocabulary softmax.
    """
    z = student_logits / temperature
    if indices is None:
        p = torch.softmax(z, -1)
        return (g - p * g.sum(-1, keepdim=True)) / temperature
    if tail == "renormalize":
        p_k = torch.softmax(z.gather(-1, indices), -1)
        grad_k = (g - p_k * g.sum(-1, keepdim=True)) / temperature
        return torch.zeros_like(z).scatter(-1, indices, grad_k)
    p = torch.softmax(z, -1)
    outside = torch.ones_like(z, dtype=torch.bool).scatter(-1, indices, False)
    p_tail = (p * outside).sum(-1, keepdim=True)
    direct = torch.zeros_like(z).scatter(-1, indices, g[..., :-1]) + torch.where(outside, g[..., -1:] * p / p_tail, 0.0)
    return (direct - p * g.sum(-1, keepdim=True)) / temperature


def distill_loss_reference(student_logits, teacher_logits=None, *, reduction="batchmean", num_items_in_batch=None, **kwargs):
    """The reduced loss; keyword arguments as :func:`distill_loss_positions` (already validated)."""
    per_position, counted = distill_loss_positions(student_logits, teacher_logits, **kwargs)
    return reduce_distill(per_position, counted, reduction, num_items_in_batch)
