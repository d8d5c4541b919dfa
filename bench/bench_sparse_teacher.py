"""Benchmark of a sparse (top-k) teacher in ``kdkernels.functional.distill_loss`` against a dense
teacher in ``kd_loss`` on the same student, and against the sparse reference (eager).

    python bench/bench_sparse_teacher.py                          # CPU: N=512, V=32000, k=32, fp32
    python bench/bench_sparse_teacher.py --shapes 512x128256      # the Llama-3 vocabulary
    python bench/bench_sparse_teacher.py --k 1024 --tail renormalize

Inputs: student logits ``s`` (N, V) with ``requires_grad``; the teacher's top-k ids and their
log-probabilities (what ``kdkernels.llm.TopKTeacherStore`` holds), frozen; and, for the dense
candidate, the same teacher as (N, V) logits: its top-k log-probs at the ids and −inf elsewhere.
With ``tail="tail_bucket"`` and forward KL the sparse loss of that teacher *is* the dense KL (the
teacher's tail bucket is empty), so every candidate computes the same number and is checked
against one float64 reference:

* ``sparse[<backend>]``: ``distill_loss(s, teacher_topk=(ids, values), teacher_values="logprobs",
  tail=...)`` on the fused op (``cpu``; ``triton`` on GPU);
* ``sparse-eager``: the same call on the ``torch`` backend (the reference formula: (N, V)
  temporaries, what a user gets without a fused kernel);
* ``dense kd_loss[<backend>]``: ``kd_loss(s, t_dense, T)``, the fused dense loss on the (N, V) teacher.

``--tail renormalize`` benchmarks the renormalised top-k instead; its loss is not the dense KL, so
the dense candidate is then reported as a mismatch of the check (its time and memory still hold).
Bytes moved (for bandwidth): one read of the student, of the ids and values, one write of its gradient.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]
import _harness as H  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.functional import distill_loss, kd_loss  # noqa: E402
from kdkernels.ops.reference.divergences import distill_loss_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    H.add_common_args(parser, "sparse_teacher")
    parser.add_argument("--k", type=int, default=32, help="teacher entries per position")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tail", default="tail_bucket", choices=["tail_bucket", "renormalize"])
    parser.add_argument("--dense-first", action="store_true", help="time the dense kd_loss first in each round (see make_candidates)")
    args = parser.parse_args()
    device = H.resolve_common_args(args, H.GPU_SHAPES, H.CPU_SHAPES, ["bf16", "fp32"], ["fp32"])
    T, k, tail = args.temperature, args.k, args.tail

    def make_inputs(config: H.Config, device: torch.device, seed: int) -> list[torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (config.n, config.v)
        s = (torch.randn(shape, generator=g, device=device, dtype=config.dtype) * 3).requires_grad_()
        teacher = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 3
        top, ids = teacher.topk(k, -1)
        values = top.log_softmax(-1).to(config.dtype)  # the top-k teacher, normalised on its k ids
        dense = torch.full(shape, float("-inf"), device=device, dtype=config.dtype).scatter_(-1, ids, values)
        del teacher, top
        return [s, dense, ids, values]

    sparse_kw = dict(teacher_values="logprobs", tail=tail, temperature=T, reduction="batchmean")

    def reference(inputs):
        s, _dense, ids, values = inputs
        s64 = s.detach().double().requires_grad_()
        loss = distill_loss_reference(
            s64, teacher_topk=(ids, values.double()), divergence="forward_kl", beta=0.5, scale_by_t2=True,
            stored_temperature=1.0, mask=None, vocab_size=None, softcap=(None, None), logit_scale=(None, None),
            **{key: v for key, v in sparse_kw.items() },
        )
        loss.backward()
        return loss.detach(), [s64.grad]

    def make_candidates(config: H.Config, device: torch.device) -> list[H.Candidate]:
        fused, dense = [], []
        for backend, reason in H.kdkernels_backends(device, args.backends):

            def sparse(s, dense_teacher, ids, values, backend=backend):
                with kdkernels.use_backend(backend):
                    return distill_loss(s, teacher_topk=(ids, values), **sparse_kw)

            def dense_kd(s, dense_teacher, ids, values, backend=backend):
                with kdkernels.use_backend(backend):
                    return kd_loss(s, dense_teacher, T)

            fused.append(H.Candidate(f"sparse[{backend}]", fn=sparse, skip_reason=reason, is_kdkernels=True))
            # a baseline here: the ratios are then "dense kd_loss / sparse"
            dense.append(H.Candidate(f"dense kd_loss[{backend}]", fn=dense_kd, skip_reason=reason))

        def sparse_eager(s, dense_teacher, ids, values):
            with kdkernels.use_backend("torch"):
                return distill_loss(s, teacher_topk=(ids, values), **sparse_kw)

        # On CPU the candidate that runs right after the harness's roofline copy (timed last in
        # each round) is measurably slower (about 10 ms of 30 here, whichever loss it is), so
        # the order is a flag: run both and compare like with like.
        first, second = (dense, fused) if args.dense_first else (fused, dense)
        return first + second + [H.Candidate("sparse-eager", fn=sparse_eager)]

    def bytes_moved(config: H.Config) -> int:
        elem = torch.empty((), dtype=config.dtype).element_size()
        return 2 * config.n * config.v * elem + config.n * k * (8 + elem)  # read s, write grad s, ids + values

    spec = H.BenchSpec(
        name="sparse_teacher",
        make_inputs=make_inputs,
        make_candidates=make_candidates,
        reference=reference,
        bytes_moved=bytes_moved,
        settings={"k": k, "temperature": T, "tail": tail, "divergence": "forward_kl", "teacher_values": "logprobs",
                  "reduction": "batchmean", "teacher_requires_grad": False},
    )
    H.run_benchmark(spec, args, device)


if __name__ == "__main__":
    main()
