// CUDA kernel of kdkernels::divergence_rows: the LLM divergence family per position of a student
// and a dense teacher, and its gradients. The formulas, directions and edge cases are
// kdkernels/ops/reference/divergences.py's; csrc/cpu/divergences.cpp and
// kdkernels/ops/triton/divergences.py are the same kernel on the CPU and in Triton. With
// p = softmax(z_s/T), q = softmax(z_t/T) of the transformed logits z = cap·tanh(scale·x/cap)
// (each step only if configured; −inf kept −inf), u = log p, v = log q, the divergences of
// divergence_terms.cuh, times T² with scale_by_t2.
//
// One thread block per position (grid-stride), threads striding over the classes (any strides; the
// LLM rows (N, V, 1) read coalesced). The position's code is written against a team
// (block_team.cuh) so that the host test runs it with one host thread.
//   Pass 1: the softmax pair walker's per-class update and merge (softmax_pair_walker.cuh:
//     add_class, merge) on the transformed logits: the maxima m_s, m_t, the sums Z_s, Z_t and,
//     for the KL divergences, the walker's cross term W = Σ e^{(z_t − m_t)/T}·(z_t − z_s)/T (forward:
//     the teacher is the reference) or Σ e^{(z_s − m_s)/T}·(z_s − z_t)/T (reverse). The KL is then
//     a closed form, kd_loss's: KL = W/Z_ref − [(m_ref − m_other)/T + log(Z_ref/Z_other)], and
//     Σg, Σh are known (−1 and KL + 1).
//   Pass 2 (mixtures: JSD, skew KLs, TVD): the per-class terms need both normalisers: u, v per
//     class, the loss Σ term and the bucket gradients' sums Σg, Σh (one deterministic block sum).
//   Pass 3 (a gradient wanted): ∂/∂x_s = c·(g − p Σg)·slope_s, ∂/∂x_t = c·(h − q Σh)·slope_t with
//     c = grad_scale·factor/T (factor = T² or 1), g, h recomputed per class (bucket_terms).
// Masked-out positions and positions whose teacher logits are all −inf get loss 0 and zero
// gradients. A NaN or +inf logit in a counted row, or a student that is −inf everywhere, makes its
// loss and gradients NaN (the skews at β = 1, KL(x ‖ x): only such a reference side does, and only
// its gradient is then NaN, the other's is 0).
// Deterministic: a fixed class split per thread and fixed reduction trees, no atomics.

#include "block_team.cuh"
#include "divergences_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace detail {

constexpr int kDivergenceMaxThreads = 512;

template <typename Acc>
struct DivergenceOptions {
  DivergenceKind kind;
  Acc beta;
  Acc factor;  // T² with scale_by_t2, else 1
  LogitTransform<Acc> student, teacher;
};

// The walker policy of pass 1: only the KL divergences' cross term (the walker's kd_loss term with
// the reference distribution on either side); the mixtures keep the plain two softmaxes.
template <typename AccT>
struct KlCrossPolicy {
  using Acc = AccT;
  enum Reference : int { kNone = 0, kTeacher = 1, kStudent = 2 };
  int reference;

  struct Terms {
    Acc w;  // Σ e^{(ref − m_ref)/T}·(ref − other)/T
    __host__ __device__ static Terms empty() { return {Acc(0)}; }
  };

  // A reference class of probability 0 adds exactly 0 (weighted), even if ref − other is NaN or ±inf.
  __host__ __device__ void add(Terms& terms, const ClassStep<Acc>& s, int64_t, Acc inv_t) const {
    if (reference == kTeacher) terms.w = weighted(s.b_scale, terms.w) + weighted(s.b_weight, (s.b - s.a) * inv_t);
    if (reference == kStudent) terms.w = weighted(s.a_scale, terms.w) + weighted(s.a_weight, (s.a - s.b) * inv_t);
  }
  __host__ __device__ Terms merge(const Terms& x, const Terms& y, const MergeStep<Acc>& m, Acc) const {
    if (reference == kTeacher) return {weighted(m.b_scale_x, x.w) + weighted(m.b_scale_y, y.w)};
    if (reference == kStudent) return {weighted(m.a_scale_x, x.w) + weighted(m.a_scale_y, y.w)};
    return {Acc(0)};
  }
};

// One position (row) of divergence_rows, by `team`. `coef` = grad_scale·factor/T (0 without
// gradients). Writes the loss (rank 0) and the requested gradients.
template <typename Team, typename S, typename T, typename Acc>
__host__ __device__ void divergence_position(const Team& team, const PairArgs<S, T, Acc>& args,
                                             const DivergenceOptions<Acc>& opt, Acc coef, int64_t row) {
  using Policy = KlCrossPolicy<Acc>;
  using Stats = PairStats<Acc, typename Policy::Terms>;
  const PositionPtrs<S, T> pos = position_ptrs(args, row);
  const int64_t C = args.classes;
  const Acc inv_t = args.inv_temperature;
  const DivergenceKind kind = opt.kind;
  auto student_at = [&](int64_t c) { return opt.student.apply(to_acc<Acc>(pos.s[c * args.s_stride[1]])); };
  auto teacher_at = [&](int64_t c) { return opt.teacher.apply(to_acc<Acc>(pos.t[c * args.t_stride[1]])); };

  // Pass 1.
  Policy policy;
  policy.reference = kind == DivergenceKind::kForwardKl   ? Policy::kTeacher
                     : kind == DivergenceKind::kReverseKl ? Policy::kStudent
                                                          : Policy::kNone;
  Stats st = empty_stats<Policy>();
  if (pos.active) {
    for (int64_t c = team.rank(); c < C; c += team.size()) add_class(st, student_at(c), teacher_at(c), c, policy, inv_t);
  }
  st = team.reduce(st, empty_stats<Policy>(), [&](const Stats& x, const Stats& y) { return merge(x, y, policy, inv_t); });

  // Everything below is uniform over the team (it depends on the merged statistics only).
  const bool counted = pos.active && st.mb != neg_inf<Acc>();  // a NaN maximum counts
  // A side without a distribution: a NaN or +inf logit (after a NaN the running maximum may move
  // on, but the sum stays NaN), or no mass at all (its log-softmax is NaN in the reference).
  const bool bad_s = nan_or_pos_inf(st.ma) || !(st.za > Acc(0));
  const bool bad_t = nan_or_pos_inf(st.mb) || !(st.zb > Acc(0));
  const Acc log_za = acc_log(st.za);
  const Acc log_zb = acc_log(st.zb);
  auto log_probs = [&](Acc a, Acc b, Acc& u, Acc& v) {
    u = (a - st.ma) * inv_t - log_za;
    v = (b - st.mb) * inv_t - log_zb;
  };
  TermSums<Acc> sums{Acc(0), Acc(0), Acc(0)};
  switch (kind) {
    case DivergenceKind::kForwardKl:
      // No special case for a student that is −inf everywhere: +inf − +inf = NaN, as the
      // reference's log-softmax of such a row.
      sums.d = st.terms.w / st.zb - ((st.mb - st.ma) * inv_t + acc_log(st.zb / st.za));
      sums.g = Acc(-1);
      sums.h = sums.d + Acc(1);
      break;
    case DivergenceKind::kReverseKl:
      sums.d = st.terms.w / st.za - ((st.ma - st.mb) * inv_t + acc_log(st.za / st.zb));
      sums.g = sums.d + Acc(1);
      sums.h = Acc(-1);
      break;
    case DivergenceKind::kZeroTeacherReference:
      sums.d = bad_t ? quiet_nan<Acc>() : Acc(0);
      break;
    case DivergenceKind::kZeroStudentReference:
      sums.d = bad_s ? quiet_nan<Acc>() : Acc(0);
      break;
    default:  // Pass 2: the mixtures' per-class terms (skipped where the row is NaN anyway).
      if (counted && !bad_s && !bad_t) {
        for (int64_t c = team.rank(); c < C; c += team.size()) {
          Acc u, v;
          log_probs(student_at(c), teacher_at(c), u, v);
          const BucketTerms<Acc> bt = bucket_terms(kind, u, v, opt.beta);
          sums = TermSums<Acc>::add(sums, {bt.term, bt.g, bt.h});
        }
        sums = team.reduce(sums, TermSums<Acc>{Acc(0), Acc(0), Acc(0)}, TermSums<Acc>::add);
      }
      break;
  }
  const bool zero_kind = kind == DivergenceKind::kZeroTeacherReference || kind == DivergenceKind::kZeroStudentReference;
  if (!zero_kind && (bad_s || bad_t)) sums = {quiet_nan<Acc>(), quiet_nan<Acc>(), quiet_nan<Acc>()};
  if (team.rank() == 0) args.loss[row] = counted ? opt.factor * sums.d : Acc(0);

  // Pass 3.
  if (pos.gs == nullptr && pos.gt == nullptr) return;
  for (int64_t c = team.rank(); c < C; c += team.size()) {
    Acc grad_s = Acc(0);
    Acc grad_t = Acc(0);
    if (counted) {
      const Acc a = student_at(c);
      const Acc b = teacher_at(c);
      if (kind == DivergenceKind::kZeroTeacherReference) {
        grad_t = sums.d;  // KL(q ‖ q): 0, NaN where the teacher's row is
      } else if (kind == DivergenceKind::kZeroStudentReference) {
        grad_s = sums.d;
      } else {
        Acc u, v;
        log_probs(a, b, u, v);
        const BucketTerms<Acc> bt = bucket_terms(kind, u, v, opt.beta);
        grad_s = coef * (bt.g - acc_exp(u) * sums.g) * opt.student.slope(a);
        grad_t = coef * (bt.h - acc_exp(v) * sums.h) * opt.teacher.slope(b);
      }
    }
    if (pos.gs != nullptr) pos.gs[c * args.gs_stride[1]] = from_acc<S>(grad_s);
    if (pos.gt != nullptr) pos.gt[c * args.gt_stride[1]] = from_acc<T>(grad_t);
  }
}

template <typename Acc>
DivergenceOptions<Acc> divergence_options(const DivergenceParams& p) {
  DivergenceOptions<Acc> opt;
  opt.kind = p.kind;
  opt.beta = static_cast<Acc>(p.beta);
  opt.factor = static_cast<Acc>(p.scale_by_t2 ? p.temperature * p.temperature : 1.0);
  opt.student = LogitTransform<Acc>::make(p.student_transform);
  opt.teacher = LogitTransform<Acc>::make(p.teacher_transform);
  return opt;
}

// grad_scale·factor/T from *grad_scale on the device; 0 without reading it when no gradient is wanted.
template <typename S, typename T, typename Acc>
__host__ __device__ __forceinline__ Acc divergence_grad_coef(const PairArgs<S, T, Acc>& args,
                                                             const DivergenceOptions<Acc>& opt) {
  const bool want_grad = args.grad_student != nullptr || args.grad_teacher != nullptr;
  return want_grad ? *static_cast<const Acc*>(args.grad_scale) * opt.factor * args.inv_temperature : Acc(0);
}

template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kDivergenceMaxThreads)
    divergence_rows_kernel(const PairArgs<S, T, Acc> args, const DivergenceOptions<Acc> opt) {
  const Acc coef = divergence_grad_coef(args, opt);
  for (int64_t row = blockIdx.x; row < args.positions; row += gridDim.x)
    divergence_position(BlockTeam{}, args, opt, coef, row);
}

}  // namespace detail

cudaError_t launch_divergence_rows(const DivergenceParams& params, cudaStream_t stream) {
  using namespace detail;
  const cudaError_t bad = check_softmax_pair_params(params);
  if (bad != cudaSuccess) return bad;
  const int threads = team_threads(params.classes, kDivergenceMaxThreads);
  return launch_position_teams(params.student.dtype, params.teacher.dtype, params.outer * params.inner,
                               [&](auto s_tag, auto t_tag, unsigned grid) {
                                 using S = typename decltype(s_tag)::type;
                                 using T = typename decltype(t_tag)::type;
                                 using Acc = acc_t<S, T>;
                                 divergence_rows_kernel<S, T, Acc><<<grid, threads, 0, stream>>>(
                                     make_pair_args<S, T, Acc>(params), divergence_options<Acc>(params));
                               });
}

}  // namespace cuda
}  // namespace kdkernels
