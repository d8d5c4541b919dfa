// CUDA kernel of kdkernels::sparse_divergence_rows: the LLM divergence family between a student's
// logits z (outer, V, inner) and a sparse teacher, its top-k (ids, values) (outer, k, inner), per
// position, and the gradients of grad_scale·Σ loss for the student's logits and the values. The
// formulas are kdkernels/ops/reference/divergences.py's (sparse_log_probs, bucket_gradient,
// student_logit_gradient); csrc/cpu/sparse_divergences.cpp and
// kdkernels/ops/triton/sparse_divergences.py compute the same. Per counted position (the mask, and
// some teacher value above −inf):
//   buckets b = the k ids (renormalize), or the k ids + the tail (tail_bucket);
//   teacher: w_b = t_b/T (logits, transformed) or values_b·T₀/T (log-probs);
//            w_tail = log1mexp(lse_k(values))·T₀/T (no mass when the stored mass rounds to ≥ 1,
//            none at all when k = V); v = log_softmax(w);
//   student: renormalize: u = log_softmax(z_K/T) (the k gathered logits only: no pass over V);
//            tail_bucket: u_b = z_b/T − lse(z/T), u_tail = lse_{j∉K}(z_j/T) − lse(z/T), the
//            complement's log-sum-exp taken over the complement itself (never as 1 − Σ_K p);
//   D = Σ_b term_b, g_b = ∂D/∂u_b, h_b = ∂D/∂v_b (divergence_terms.cuh's bucket_terms);
//   ∂D/∂z_j = (g_j·[j∈K] + g_tail·p_j/P_tail·[j∉K] − p_j·Σg)/T (tail_bucket; renormalize: the k
//            ids only, p conditioned on them), times the student transform's slope;
//   ∂D/∂w_b = h_b − q_b·Σh, back to the values through w_b (and w_tail's lse for tail_bucket).
//
// One thread block per position (grid-stride), written against a team (block_team.cuh) so that the
// host test runs the same code with one host thread. The buckets are recomputed from the inputs in
// each pass over them (O(k) reads, nothing of size k kept per position). The complement of the ids
// is found with a bitmap of the ids in shared memory, kSparseBitmapClasses classes at a time (the
// ids of a chunk are marked with integer atomics, then the chunk's classes are read). The student
// gradient is written for every class, then, after a barrier, overwritten at the k ids.
// Deviation from the CPU kernel: an id outside [0, V) raises there; here (no host sync) it is read
// as a student logit of −inf and never written (the front end rejects such ids before any kernel).
// Deterministic: fixed work split and reduction trees; the only atomics are the bitmap's ORs.

#include "block_team.cuh"
#include "sparse_divergences_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace detail {

constexpr int kSparseMaxThreads = 512;
constexpr int kSparseBitmapWords = 4096;                        // 16 KiB of shared memory
constexpr int64_t kSparseBitmapClasses = kSparseBitmapWords * 32;  // classes per chunk

// The kernel's typed view of checked params.
template <typename S, typename V, typename Acc>
struct SparseArgs {
  const S* student;
  const V* values;
  const int64_t* indices;
  S* grad_student;  // nullptr: not requested
  V* grad_values;   // nullptr: not requested
  Acc* loss;
  const bool* mask;
  const Acc* grad_scale;
  int64_t classes, k, inner, positions;
  int64_t s_stride[3], v_stride[3], i_stride[3], gs_stride[3], gv_stride[3];
  DivergenceKind kind;
  Acc beta, inv_t, t0_over_t, factor;
  bool tail_bucket, logprob_values;
  LogitTransform<Acc> student_transform, teacher_transform;
};

// One teacher bucket b < k and the student's logit at its id.
template <typename Acc>
struct SparseBucket {
  Acc t;   // the teacher's value (transformed if a logit)
  Acc w;   // its bucket logit: t/T or t·T₀/T
  Acc y;   // the student's transformed logit at the id (−inf for an id outside [0, V))
  Acc sk;  // y/T
  int64_t id;
  bool id_ok;
};

// The three log-sum-exps of pass A: of the values t, of the bucket logits w, of the student's y/T.
template <typename Acc>
struct BucketLses {
  OnlineLse<Acc> t, w, sk;
  __host__ __device__ static BucketLses empty() {
    return {OnlineLse<Acc>::empty(), OnlineLse<Acc>::empty(), OnlineLse<Acc>::empty()};
  }
  __host__ __device__ static BucketLses merge(const BucketLses& x, const BucketLses& y) {
    return {OnlineLse<Acc>::merge(x.t, y.t), OnlineLse<Acc>::merge(x.w, y.w), OnlineLse<Acc>::merge(x.sk, y.sk)};
  }
};

// One position (row) of sparse_divergence_rows, by `team`. `coef` = grad_scale·factor (0 without
// gradients); `bits`: kSparseBitmapWords words of scratch shared by the team.
template <typename Team, typename S, typename V, typename Acc>
__host__ __device__ void sparse_divergence_position(const Team& team, const SparseArgs<S, V, Acc>& a, Acc coef,
                                                    uint32_t* bits, int64_t row) {
  const int64_t o = row / a.inner;
  const int64_t i = row - o * a.inner;
  const int64_t C = a.classes;
  const int64_t K = a.k;
  const S* s = a.student + (o * a.s_stride[0] + i * a.s_stride[2]);
  const V* vals = a.values + (o * a.v_stride[0] + i * a.v_stride[2]);
  const int64_t* ids = a.indices + (o * a.i_stride[0] + i * a.i_stride[2]);
  S* gs = a.grad_student != nullptr ? a.grad_student + (o * a.gs_stride[0] + i * a.gs_stride[2]) : nullptr;
  V* gv = a.grad_values != nullptr ? a.grad_values + (o * a.gv_stride[0] + i * a.gv_stride[2]) : nullptr;
  const bool active = (a.mask == nullptr || a.mask[row]) && C > 0 && K > 0;
  const Acc inv_t = a.inv_t;
  const Acc w_factor = a.logprob_values ? a.t0_over_t : inv_t;
  const bool tail = a.tail_bucket;

  auto student_at = [&](int64_t c) { return a.student_transform.apply(to_acc<Acc>(s[c * a.s_stride[1]])); };
  auto bucket = [&](int64_t b) {
    SparseBucket<Acc> r;
    const Acc raw = to_acc<Acc>(vals[b * a.v_stride[1]]);
    r.t = a.logprob_values ? raw : a.teacher_transform.apply(raw);
    r.w = r.t * w_factor;
    r.id = ids[b * a.i_stride[1]];
    r.id_ok = r.id >= 0 && r.id < C;
    r.y = r.id_ok ? student_at(r.id) : neg_inf<Acc>();
    r.sk = r.y * inv_t;
    return r;
  };

  // Pass A over the buckets: the teacher's maximum (is the position counted?) and lse, the bucket
  // logits' lse, the gathered student logits' lse.
  BucketLses<Acc> lses = BucketLses<Acc>::empty();
  if (active) {
    for (int64_t b = team.rank(); b < K; b += team.size()) {
      const SparseBucket<Acc> B = bucket(b);
      lses.t.add(B.t);
      lses.w.add(B.w);
      lses.sk.add(B.sk);
    }
  }
  lses = team.reduce(lses, BucketLses<Acc>::empty(), BucketLses<Acc>::merge);
  // Uniform over the team from here on.
  const bool counted = active && lses.t.m != neg_inf<Acc>();  // a NaN maximum counts
  const Acc lse_values = lses.t.value();
  // k = V: no class outside the ids; what 1 − Σ p_t holds is rounding, not mass.
  const bool tail_present = tail && K < C;
  const Acc log_tail_t = tail_present ? log1mexp(lse_values) : neg_inf<Acc>();
  const Acc w_tail = log_tail_t * a.t0_over_t;
  OnlineLse<Acc> lse_w = lses.w;
  if (tail) lse_w.add(w_tail);
  const Acc log_zw = lse_w.value();
  const Acc lse_k = lses.sk.value();

  // Pass B (tail_bucket): the student's log-sum-exp over the classes outside the ids.
  Acc lse_out = neg_inf<Acc>();
  Acc lse_all = lse_k;
  if (tail && counted) {
    OnlineLse<Acc> out = OnlineLse<Acc>::empty();
    for (int64_t chunk = 0; chunk < C; chunk += kSparseBitmapClasses) {
      const int64_t n = C - chunk < kSparseBitmapClasses ? C - chunk : kSparseBitmapClasses;
      for (int64_t w = team.rank(); w < (n + 31) / 32; w += team.size()) bits[w] = 0u;
      team.sync();
      for (int64_t b = team.rank(); b < K; b += team.size()) {
        const int64_t id = ids[b * a.i_stride[1]];
        if (id >= chunk && id < chunk + n) team.mark(bits, id - chunk);
      }
      team.sync();
      for (int64_t j = team.rank(); j < n; j += team.size()) {
        if (!team.test(bits, j)) out.add(student_at(chunk + j) * inv_t);
      }
      team.sync();  // the next chunk clears the bitmap
    }
    out = team.reduce(out, OnlineLse<Acc>::empty(), OnlineLse<Acc>::merge);
    lse_out = out.value();
    lse_all = log_add_exp(lse_k, lse_out);
  }
  auto log_probs = [&](const SparseBucket<Acc>& B, Acc& u, Acc& v) {
    u = B.sk - lse_all;
    v = B.w - log_zw;
  };
  const Acc u_tail = lse_out - lse_all;
  const Acc v_tail = w_tail - log_zw;

  // Pass C over the buckets: the divergence and the sums of its bucket gradients.
  TermSums<Acc> sums{Acc(0), Acc(0), Acc(0)};
  BucketTerms<Acc> tail_terms{Acc(0), Acc(0), Acc(0)};
  if (counted) {
    for (int64_t b = team.rank(); b < K; b += team.size()) {
      Acc u, v;
      log_probs(bucket(b), u, v);
      const BucketTerms<Acc> bt = bucket_terms(a.kind, u, v, a.beta);
      sums = TermSums<Acc>::add(sums, {bt.term, bt.g, bt.h});
    }
    sums = team.reduce(sums, TermSums<Acc>{Acc(0), Acc(0), Acc(0)}, TermSums<Acc>::add);
    if (tail) {
      tail_terms = bucket_terms(a.kind, u_tail, v_tail, a.beta);
      sums = TermSums<Acc>::add(sums, {tail_terms.term, tail_terms.g, tail_terms.h});
    }
  }
  if (team.rank() == 0) a.loss[row] = counted ? a.factor * sums.d : Acc(0);

  // KL(x ‖ x) (the skews at β = 1) does not use the other model at all: its gradient is exactly 0,
  // even where that model's row is NaN.
  const bool student_used = counted && a.kind != DivergenceKind::kZeroTeacherReference;
  const bool values_used = counted && a.kind != DivergenceKind::kZeroStudentReference;
  if (gs != nullptr) {
    // Every class: the complement's share c/T·slope·e^{z_j/T − lse_out}·(g_tail − Σg·P_tail)
    // (tail_bucket, some mass outside the ids), else 0; then the k ids.
    const bool dense = student_used && tail && lse_out != neg_inf<Acc>();
    const Acc coef_out = dense ? coef * inv_t * (tail_terms.g - sums.g * acc_exp(lse_out - lse_all)) : Acc(0);
    for (int64_t j = team.rank(); j < C; j += team.size()) {
      Acc grad = Acc(0);
      if (dense) {
        const Acc y = student_at(j);
        grad = coef_out * acc_exp(y * inv_t - lse_out) * a.student_transform.slope(y);
      }
      gs[j * a.gs_stride[1]] = from_acc<S>(grad);
    }
    team.sync();  // the ids below overwrite what the team just wrote
    if (student_used) {
      for (int64_t b = team.rank(); b < K; b += team.size()) {
        const SparseBucket<Acc> B = bucket(b);
        if (!B.id_ok) continue;
        Acc u, v;
        log_probs(B, u, v);
        const BucketTerms<Acc> bt = bucket_terms(a.kind, u, v, a.beta);
        const Acc grad = coef * inv_t * (bt.g - acc_exp(u) * sums.g) * a.student_transform.slope(B.y);
        gs[B.id * a.gs_stride[1]] = from_acc<S>(grad);
      }
    }
  }
  if (gv != nullptr) {
    // ∂D/∂w_b = h_b − q_b·Σh; w_tail = (T₀/T)·log1mexp(lse(t)): ∂w_tail/∂t_b = −(T₀/T)·e^{t_b − log1mexp(lse(t))}.
    const bool tail_live = tail_present && !(lse_values >= Acc(0));
    const Acc tail_part = tail_live ? (tail_terms.h - acc_exp(v_tail) * sums.h) * (-a.t0_over_t) : Acc(0);
    for (int64_t b = team.rank(); b < K; b += team.size()) {
      Acc grad = Acc(0);
      if (values_used) {
        const SparseBucket<Acc> B = bucket(b);
        Acc u, v;
        log_probs(B, u, v);
        const BucketTerms<Acc> bt = bucket_terms(a.kind, u, v, a.beta);
        Acc d = (bt.h - acc_exp(v) * sums.h) * w_factor;
        if (tail_live) d += tail_part * acc_exp(B.t - log_tail_t);
        if (!a.logprob_values) d *= a.teacher_transform.slope(B.t);
        grad = coef * d;
      }
      gv[b * a.gv_stride[1]] = from_acc<V>(grad);
    }
  }
}

template <typename S, typename V, typename Acc>
SparseArgs<S, V, Acc> make_sparse_args(const SparseDivergenceParams& p) {
  SparseArgs<S, V, Acc> a;
  a.student = static_cast<const S*>(p.student.data);
  a.values = static_cast<const V*>(p.values.data);
  a.indices = p.indices;
  a.grad_student = static_cast<S*>(p.grad_student);
  a.grad_values = static_cast<V*>(p.grad_values);
  a.loss = static_cast<Acc*>(p.loss);
  a.mask = p.mask;
  a.grad_scale = static_cast<const Acc*>(p.grad_scale);
  a.classes = p.classes;
  a.k = p.k;
  a.inner = p.inner;
  a.positions = p.outer * p.inner;
  for (int d = 0; d < 3; ++d) {
    a.s_stride[d] = p.student_strides[d];
    a.v_stride[d] = p.values_strides[d];
    a.i_stride[d] = p.indices_strides[d];
    a.gs_stride[d] = p.grad_student_strides[d];
    a.gv_stride[d] = p.grad_values_strides[d];
  }
  a.kind = p.kind;
  a.beta = static_cast<Acc>(p.beta);
  a.inv_t = static_cast<Acc>(1.0 / p.temperature);
  a.t0_over_t = static_cast<Acc>(p.stored_temperature / p.temperature);
  a.factor = static_cast<Acc>(p.scale_by_t2 ? p.temperature * p.temperature : 1.0);
  a.tail_bucket = p.tail_bucket;
  a.logprob_values = p.logprob_values;
  a.student_transform = LogitTransform<Acc>::make(p.student_transform);
  a.teacher_transform = LogitTransform<Acc>::make(p.teacher_transform);
  return a;
}

template <typename S, typename V, typename Acc>
__global__ void __launch_bounds__(kSparseMaxThreads) sparse_divergence_rows_kernel(const SparseArgs<S, V, Acc> a) {
  __shared__ uint32_t bits[kSparseBitmapWords];
  const bool want_grad = a.grad_student != nullptr || a.grad_values != nullptr;
  const Acc coef = want_grad ? *a.grad_scale * a.factor : Acc(0);
  for (int64_t row = blockIdx.x; row < a.positions; row += gridDim.x)
    sparse_divergence_position(BlockTeam{}, a, coef, bits, row);
}

}  // namespace detail

cudaError_t launch_sparse_divergence_rows(const SparseDivergenceParams& params, cudaStream_t stream) {
  using namespace detail;
  const cudaError_t bad = check_sparse_divergence_params(params);
  if (bad != cudaSuccess) return bad;
  // Per position: O(V) work for the tail bucket or a student gradient, else O(k).
  const int64_t work = params.tail_bucket || params.grad_student != nullptr ? params.classes : params.k;
  const int threads = team_threads(work, kSparseMaxThreads);
  return launch_position_teams(params.student.dtype, params.values.dtype, params.outer * params.inner,
                               [&](auto s_tag, auto v_tag, unsigned grid) {
                                 using S = typename decltype(s_tag)::type;
                                 using V = typename decltype(v_tag)::type;
                                 using Acc = acc_t<S, V>;
                                 sparse_divergence_rows_kernel<S, V, Acc>
                                     <<<grid, threads, 0, stream>>>(make_sparse_args<S, V, Acc>(params));
                               });
}

}  // namespace cuda
}  // namespace kdkernels
