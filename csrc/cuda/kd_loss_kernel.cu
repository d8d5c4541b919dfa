// CUDA kernel of kdkernels::kd_loss_rows: the kd_loss policy of the softmax pair walker
// (softmax_pair_walker.cuh, which owns the traversal, the maxima and the sums Z_a, Z_b).
//
// Per position (o, i) of (outer, classes, inner) views, with a_c = s_c / T and b_c = t_c / T in the
// accumulation type (fp32; fp64 if an input is fp64):
//   L'   = Σ_c p_t,c (b_c − a_c) − lse_b + lse_a            (= KL(p_t ‖ p_s), p = softmax)
//   loss = T² · L'                                           (0 where the mask is false)
//   grad_student_c = gs·T·(p_s,c − p_t,c)
//   grad_teacher_c = gs·T·p_t,c·((b_c − lse_b) − (a_c − lse_a) − L')
//                  = gs·T·p_t,c·((b_c − a_c) − Σ_k p_t,k (b_k − a_k))     (what we compute)
// with gs = *grad_scale read on the device. A class with b_c = −inf (p_t,c = 0) contributes exactly
// 0 to the loss and gets a teacher gradient of exactly 0, even if a_c = −inf too; a position whose
// teacher logits are all −inf (or that is masked out) gets loss 0 and zero gradients.
//
// The one cross term is W = Σ e^{(t − m_t)/T}·(b − a), rescaled with Z_b. From the walker's
// statistics (with m_a = m_s/T, m_b = m_t/T):
//   E = Σ p_t (b − a) = W / Z_b,  lse_b − lse_a = (m_b − m_a) + log(Z_b / Z_a),  L' = E − (lse_b − lse_a).
// Writing lse_b − lse_a this way (difference of maxima + log of a ratio) avoids subtracting two
// large log-sum-exps, which would cost ~1e-6 absolute in fp32 on a loss that is often tiny.
// Rows of unit class stride take 16-byte vector loads; the rows kernel also serves strided
// classes when there are few positions.

#include "kd_loss_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

template <typename AccT>
struct KdLossPolicy {
  using Acc = AccT;
  static constexpr bool kVectorLoads = true;
  static constexpr int64_t kRowsKernelMaxPositions = 1024;  // few positions: a block per row anyway

  Acc temperature;
  Acc temperature_sq;

  static KdLossPolicy make(const KdLossRowsParams& p) {
    return {static_cast<Acc>(p.temperature), static_cast<Acc>(p.temperature * p.temperature)};
  }

  struct Terms {
    Acc w;  // W = Σ e^{(t − m_t)/T}·(b − a)
    __host__ __device__ static Terms empty() { return {Acc(0)}; }
    __device__ Terms shfl_xor(int offset) const { return {__shfl_xor_sync(0xffffffffu, w, offset)}; }
  };

  // What the gradient pass needs of a position's statistics.
  struct Finished {
    Acc ma, mb, inv_za, inv_zb;  // raw maxima
    Acc expect;  // E = Σ p_t (b − a)
    Acc gs_t;    // grad_scale · T
    Acc inv_t;
  };

  __host__ __device__ void add(Terms& terms, const ClassStep<Acc>& s, int64_t, Acc inv_t) const {
    // b = −inf: b_weight = 0, so the class adds exactly 0 even if b − a is NaN or ±inf.
    terms.w = weighted(s.b_scale, terms.w) + weighted(s.b_weight, (s.b - s.a) * inv_t);
  }

  __host__ __device__ Terms merge(const Terms& x, const Terms& y, const MergeStep<Acc>& m, Acc) const {
    return {weighted(m.b_scale_x, x.w) + weighted(m.b_scale_y, y.w)};
  }

  __host__ __device__ Acc grad_coef(Acc grad_scale) const { return grad_scale * temperature; }

  __host__ __device__ Finished finish(const PairStats<Acc, Terms>& st, Acc gs_t, Acc inv_t) const {
    Finished g;
    g.ma = st.ma;
    g.mb = st.mb;
    g.inv_za = Acc(1) / st.za;
    g.inv_zb = Acc(1) / st.zb;
    g.expect = st.terms.w * g.inv_zb;
    g.gs_t = gs_t;
    g.inv_t = inv_t;
    return g;
  }

  __host__ __device__ Acc loss(const PairStats<Acc, Terms>& st, const Finished& g, Acc inv_t) const {
    // A student that is −inf everywhere gives 0 probability where the teacher has mass: +inf.
    if (st.ma == neg_inf<Acc>()) return -neg_inf<Acc>();
    const Acc lse_diff = (st.mb - st.ma) * inv_t + acc_log(st.zb / st.za);  // lse_b − lse_a
    return temperature_sq * (g.expect - lse_diff);
  }

  __host__ __device__ void grads(const Finished& g, Acc a, Acc b, int64_t, Acc& grad_s, Acc& grad_t) const {
    // a, b: raw logits.
    const Acc pa = acc_exp((a - g.ma) * g.inv_t) * g.inv_za;
    const Acc pb = acc_exp((b - g.mb) * g.inv_t) * g.inv_zb;
    grad_s = g.gs_t * (pa - pb);
    // Exactly 0 where p_t = 0 (b = −inf, or underflow), whatever b − a is.
    grad_t = pb == Acc(0) ? Acc(0) : g.gs_t * pb * ((b - a) * g.inv_t - g.expect);
  }
};

}  // namespace

cudaError_t launch_kd_loss_rows(const KdLossRowsParams& params, cudaStream_t stream) {
  return launch_softmax_pair_loss<KdLossPolicy>(params, stream);
}

}  // namespace cuda
}  // namespace kdkernels
