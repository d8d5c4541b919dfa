// The Kullback–Leibler policy of the two-distribution row walker (two_distribution_row.h):
// KL(p_b ‖ p_a) of one row, with p_a = softmax(a/T), p_b = softmax(b/T), from one cross term
//   W = Σ e^{x_b}(x_b − x_a),  KL = W/Z_b − log Z_b + log Z_a
// (the shifts inside W keep every term small: no cancellation of two large log-normalisers).
// kd_loss walks (a, b) = (student, teacher): the forward KL of Hinton's KD; the LLM divergences
// (divergences.cpp) also walk (teacher, student) for the reverse KL, KL(p_s ‖ p_t).
#pragma once

#include "two_distribution_row.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace row {

template <typename acc_t>
struct KlPolicy {
  using V = Vec<acc_t>;
  static constexpr int kTerms = 1;
  acc_t scale;   // the gradients' factor (kd_loss: grad_scale·T)
  acc_t kl = 0;  // the row's KL (for the gradient of b)

  V accumulate(V* terms, const V& xa, const V& xb, const V& /*ea*/, const V& eb, int64_t /*c*/) const {
    // Classes with p_b = 0 contribute 0, whatever a is (never 0 * inf = NaN).
    terms[0] = cpu::fmadd_where_nonzero(eb, eb, xb - xa, terms[0]);
    return eb;
  }
  static void rescale(V* terms, const Rescale<acc_t>& r, const V& zb) {
    terms[0] = r.zero_b ? V(0) : (terms[0] + V(r.delta) * zb) * V(r.fb);
  }
  // grad_a = scale·(p_a − p_b). Both products rounded before the subtraction: the compiler may not
  // contract one of them into an FMA with it (x·a − round(x·b) ≠ 0 for a = b), which would lose the
  // exact 0 of equal inputs.
  struct StudentGrad {
    V fa, fb;
    V operator()(const V& ea, const V& eb, int64_t /*c*/) const {
      return at::vec::fmadd(ea, fa, V(0)) - at::vec::fmadd(eb, fb, V(0));
    }
  };
  StudentGrad student_grad_block(acc_t fa, acc_t fb) const { return {V(scale * fa), V(scale * fb)}; }
  //   grad_a = scale·(p_a − p_b),  grad_b = scale·p_b·(log p_b − log p_a − KL)
  void grads(const V& log_pa, const V& log_pb, int64_t /*c*/, V* g_a, V* g_b) const {
    const V pb = log_pb.exp();
    if (g_a != nullptr) *g_a = V(scale) * (log_pa.exp() - pb);
    if (g_b != nullptr) *g_b = cpu::where_nonzero(pb, V(scale) * pb * (log_pb - log_pa - V(kl)));
  }
};

}  // namespace row
}  // namespace CPU_CAPABILITY
}  // namespace kdkernels
