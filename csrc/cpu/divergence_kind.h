// The LLM divergences as the CPU kernels dispatch on them (divergences.cpp, dense teacher;
// sparse_divergences.cpp, top-k teacher): the divergence after β's endpoints are resolved, with
// the conventions of the Triton kernels' divergence_kind (kdkernels/ops/triton/divergences.py):
// β = 0 / 1 of a mixture is the KL it reduces to, computed without its log 0 terms.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h

enum Kind : int {
  kForwardKl,             // KL(q ‖ p)
  kReverseKl,             // KL(p ‖ q)
  kJsd,                   // β KL(q ‖ m) + (1−β) KL(p ‖ m), m = β q + (1−β) p
  kSkewForwardKl,         // KL(q ‖ β q + (1−β) p)
  kSkewReverseKl,         // KL(p ‖ β p + (1−β) q)
  kTvd,                   // ½ Σ |q − p|
  kZeroTeacherReference,  // skew_forward_kl at β = 1: KL(q ‖ q)
  kZeroStudentReference,  // skew_reverse_kl at β = 1: KL(p ‖ p)
};

// `op` names the kernel in the error for an unknown divergence (the Python front ends check first).
inline Kind kind_of(const char* op, c10::string_view divergence, double beta) {
  if (divergence == "forward_kl") return kForwardKl;
  if (divergence == "reverse_kl") return kReverseKl;
  if (divergence == "jsd") return beta == 0 ? kForwardKl : beta == 1 ? kReverseKl : kJsd;
  if (divergence == "skew_forward_kl") return beta == 0 ? kForwardKl : beta == 1 ? kZeroTeacherReference : kSkewForwardKl;
  if (divergence == "skew_reverse_kl") return beta == 0 ? kReverseKl : beta == 1 ? kZeroStudentReference : kSkewReverseKl;
  if (divergence == "tvd") return kTvd;
  TORCH_CHECK(false, op, ": unknown divergence '", std::string(divergence), "'");
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels
