r"""Plain-PyTorch reference implementations: the readable spec every fast backend is tested
against (in float64), and the ``torch`` backend, the last fallback.

Non-finite values: the rules every loss follows on every backend
================================================================

These follow torch's composite (the float64 eager formula written with torch operations, as in
this package) and are tested for every loss × backend × layout in ``tests/test_nan_inf.py``.
The kernels get them from the arithmetic itself (NaN-propagating maxima, selects instead of
products with 0), never from an extra pass over the data.

* **NaN** in a counted position makes that position's loss NaN (so any reduced loss is NaN) and
  its gradients NaN. For the softmax losses (``kd_loss``, ``weighted_soft_ce``) the position is
  the whole class vector: one NaN logit, student or teacher, makes the row NaN. ``kl_div``: a NaN
  or negative target gives a NaN loss, as ``torch.nn.functional.kl_div``; the input gradient is
  then ``-target`` (NaN for a NaN target), as torch. ``margin_partial_l2``: an element is left
  out only when ``S ≤ T ≤ 0`` holds, so a NaN student or teacher element counts and is NaN.
  ``bounded_regression``: a row is inactive only when ``d_s + m ≤ d_t`` holds, so a NaN student
  or target is active and NaN; a NaN teacher makes the row's loss and gradient NaN.
* **Masked-out positions** (``mask`` False) contribute exactly 0 and get exactly zero gradients,
  whatever they hold (NaN and ±inf included), on every backend.
* **−inf teacher logit** = a class the teacher excludes (p_t = 0): it contributes exactly 0 and
  gets a zero teacher gradient, whatever the student says there (−inf, a large value). A position
  whose teacher logits are *all* −inf has no distribution: it counts as masked out (0, zero
  gradients, not counted by ``mean``).
* **−inf student logit where the teacher has mass** (p_t > 0): the loss is +inf (KL and
  cross-entropy are infinite there); the student gradient stays finite, ``T·(p_s − p_t)``.
* **+inf logits** (student or teacher) make the row NaN, as ``log_softmax`` does.
* **Exact zeros**: identical student and teacher logits (same dtype) give exactly 0 for
  ``kd_loss``; one class (V = 1) gives exactly 0 for ``kd_loss`` and ``weighted_soft_ce`` at any
  temperature (the kernels shift by the row maximum of the raw logits and scale the differences,
  ``(x − max x) / T``, so the maximum's term is exactly 0 and no term overflows).
* **Large finite logits** never give NaN where the float64 formula is finite (e.g. logits of
  1e10 at any T): differences to the row maximum are ≤ 0, so no exponential overflows.
"""
