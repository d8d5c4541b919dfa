// CUDA kernel of kdkernels::weighted_soft_ce_rows: the weighted soft cross-entropy policy of the
// softmax pair walker (softmax_pair_walker.cuh, which owns the traversal, the maxima and the sums
// Z_a, Z_b).
//
// Per position (o, i) of (outer, classes, inner) views, with a = s/T, b = t/T in the accumulation
// type (fp32; fp64 if an input is fp64) and gs = *grad_scale read on the device:
//   ℓ = −Σ_c w_c p_t,c log p_s,c = S·log Z_a − A / Z_b                     (0 where masked out)
//   grad_student_c = gs/T · (S p_s,c − w_c p_t,c)
//   grad_teacher_c = −gs/T · p_t,c (ℓ + w_c log p_s,c)      (exactly 0 where p_t,c = 0)
// from the cross terms
//   W = Σ w e^{b − m_b},  A = Σ w e^{b − m_b} (a − m_a),  S = W / Z_b
// (m: the walker's running maxima, scaled by 1/T). A stays relative to the running student max
// (shifted by −W·Δm_a when it grows), so ℓ is a sum of two non-negative terms and large logits lose
// no precision. A class with w·p_t = 0 is selected out, never multiplied by 0, so a −inf student
// logit there gives 0, not NaN.
//
// Loads are scalar (kVectorLoads = false) and the rows kernel serves only unit class stride or
// inner == 1: the per-thread class order of the kernel the walker replaced, kept so that the
// rounding of the results stays the same. Vector loads are a speed-up still to measure on a GPU.

#include "weighted_soft_ce_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

template <typename AccT>
struct WeightedSoftCePolicy {
  using Acc = AccT;
  static constexpr bool kVectorLoads = false;
  static constexpr int64_t kRowsKernelMaxPositions = 0;

  const Acc* weight;  // (classes,), nullptr = ones

  static WeightedSoftCePolicy make(const WeightedSoftCeParams& p) { return {static_cast<const Acc*>(p.class_weight)}; }

  struct Terms {
    Acc ws;   // W
    Acc acc;  // A
    __host__ __device__ static Terms empty() { return {Acc(0), Acc(0)}; }
    __device__ Terms shfl_xor(int offset) const {
      return {__shfl_xor_sync(0xffffffffu, ws, offset), __shfl_xor_sync(0xffffffffu, acc, offset)};
    }
  };

  // The loss of a position and what the gradient pass needs of its statistics.
  struct Finished {
    Acc loss, mass, z_b, log_z_a, shift_a, shift_b, coef, inv_t;  // shifts: raw maxima (0 for −inf)
  };

  __host__ __device__ Acc class_weight(int64_t c) const { return weight ? weight[c] : Acc(1); }

  __host__ __device__ void add(Terms& t, const ClassStep<Acc>& s, int64_t c, Acc inv_t) const {
    if (s.a_up && t.ws > Acc(0))  // new student max (or NaN): re-reference A
      t.acc -= t.ws * ((s.a - (s.ma_old == neg_inf<Acc>() ? s.a : s.ma_old)) * inv_t);
    if (s.b_up) {  // new teacher max (or NaN): rescale the teacher sums
      t.ws = t.ws * s.b_scale;
      // b_scale = 0: nothing seen yet, or contributions underflowed
      t.acc = s.b_scale > Acc(0) ? t.acc * s.b_scale : Acc(0);
    }
    if (s.mb != neg_inf<Acc>()) {
      // This class's e^{(b − m_b)/T}. When b raised the maximum it is e^0 = 1, written as 1 + (b − m_b)
      // so that b = +inf (inf − inf) or NaN makes it NaN and the position NaN, as the reference.
      const Acc e_b = s.b_up ? Acc(1) + (s.b - s.mb) : s.b_weight;
      const Acc we = class_weight(c) * e_b;
      t.ws += we;
      if (we > Acc(0)) t.acc += we * ((s.a - s.ma) * inv_t);
    }
  }

  __host__ __device__ Terms merge(const Terms& x, const Terms& y, const MergeStep<Acc>& m, Acc inv_t) const {
    Terms r;
    r.ws = x.ws * m.b_scale_x + y.ws * m.b_scale_y;
    const Acc acc_x = x.ws > Acc(0) ? (x.acc - x.ws * ((m.ma - m.ma_x) * inv_t)) * m.b_scale_x : Acc(0);
    const Acc acc_y = y.ws > Acc(0) ? (y.acc - y.ws * ((m.ma - m.ma_y) * inv_t)) * m.b_scale_y : Acc(0);
    r.acc = acc_x + acc_y;
    return r;
  }

  __host__ __device__ Acc grad_coef(Acc grad_scale) const { return grad_scale; }

  __host__ __device__ Finished finish(const PairStats<Acc, Terms>& st, Acc grad_scale, Acc inv_t) const {
    Finished f;
    f.z_b = st.zb;
    f.mass = st.terms.ws / f.z_b;
    f.log_z_a = acc_log(st.za);
    f.loss = f.mass * f.log_z_a - st.terms.acc / f.z_b;
    f.shift_a = st.ma == neg_inf<Acc>() ? Acc(0) : st.ma;
    f.shift_b = st.mb == neg_inf<Acc>() ? Acc(0) : st.mb;
    f.coef = grad_scale * inv_t;
    f.inv_t = inv_t;
    return f;
  }

  __host__ __device__ Acc loss(const PairStats<Acc, Terms>&, const Finished& f, Acc) const { return f.loss; }

  __host__ __device__ void grads(const Finished& f, Acc a, Acc b, int64_t c, Acc& g_s, Acc& g_t) const {
    // a, b: raw logits.
    const Acc w = class_weight(c);
    const Acc p_t = acc_exp((b - f.shift_b) * f.inv_t) / f.z_b;
    const Acc wp_t = w * p_t;
    const Acc log_p_s = (a - f.shift_a) * f.inv_t - f.log_z_a;
    g_s = f.coef * (f.mass * acc_exp(log_p_s) - wp_t);
    g_t = p_t != Acc(0) ? -f.coef * p_t * (f.loss + (wp_t > Acc(0) ? w * log_p_s : Acc(0))) : Acc(0);
  }
};

}  // namespace

cudaError_t launch_weighted_soft_ce_rows(const WeightedSoftCeParams& params, cudaStream_t stream) {
  return launch_softmax_pair_loss<WeightedSoftCePolicy>(params, stream);
}

}  // namespace cuda
}  // namespace kdkernels
