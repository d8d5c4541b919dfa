// CPU kernel of kdkernels::sparse_divergence_rows: the LLM divergence family between a student's
// logits z (outer, V, inner) and a sparse teacher, its top-k (indices, values) (outer, k, inner),
// per position, with the gradients of grad_scale·Σ loss for the student's logits and the values.
// The formulas are kdkernels/ops/reference/divergences.py's (sparse_log_probs, bucket_gradient,
// student_logit_gradient); the declaration is kdkernels/ops/sparse_divergences.py.
//
// Per counted position (the mask, and some teacher value above −inf):
//   buckets b = the k ids (renormalize), or the k ids + the tail (tail_bucket);
//   teacher: w_b = t_b/T (logits, transformed) or values_b·T₀/T (log-probs);
//            w_tail = log1mexp(lse_k(values))·T₀/T (no mass when the stored mass rounds to ≥ 1,
//            none at all when k = V); v = log_softmax(w);
//   student: renormalize: u = log_softmax(z_K/T) (the k gathered logits only: no pass over V);
//            tail_bucket: u_b = z_b/T − lse(z/T), u_tail = lse_{j∉K}(z_j/T) − lse(z/T). The
//            complement's sum is taken over the complement itself (the sorted ids split the row
//            into k + 1 contiguous segments), never as 1 − Σ_K p: no cancellation when the top-k
//            hold almost all the mass;
//   D = Σ_b term_b, g_b = ∂D/∂u_b, h_b = ∂D/∂v_b (closed forms below, as bucket_gradient);
//   ∂D/∂z_j = (g_j·[j∈K] + g_tail·p_j/P_tail·[j∉K] − p_j·Σg)/T (tail_bucket; renormalize: the k
//            ids only, p conditioned on them), times the student transform's slope;
//   ∂D/∂w_b = h_b − q_b·Σh, back to the values through w_b (and w_tail's lse for tail_bucket).
// The per-bucket arithmetic (O(k)) runs in double; the passes over the V student logits in the
// accumulation type with at::vec. Memory: the student gradient (written once) + O(k) per thread.
// A row whose student logits read in the dense pass hold a NaN or +inf gets NaN (the reference's
// logsumexp does too). Each position is computed by one thread: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "divergence_kind.h"
#include "gradient_buffer.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;  // the at::vec helpers of vec_utils.h

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kGrainElements = 32768;  // work per parallel task, in student logits

struct Terms {
  double term, g, h;  // the bucket's loss term, ∂D/∂u, ∂D/∂v
};

inline double logsumexp(const double* x, int64_t n) {
  double m = kNegInf;
  for (int64_t b = 0; b < n; ++b) m = nan_max(m, x[b]);
  if (m == kNegInf) return kNegInf;
  if (!std::isfinite(m)) return m == m ? kNaN : m;  // +inf − +inf, or NaN
  double z = 0;
  for (int64_t b = 0; b < n; ++b) z += std::exp(x[b] - m);
  return m + std::log(z);
}

// log m of the mixture m = w_x·x + w_y·y of x = e^{lx}, y = e^{ly}: log(m) where m is a normal
// number, else in log space (the sum of two tiny probabilities underflows, to 0 even, and its log
// would be −inf).
inline double log_mixture(double wx, double x, double lx, double wy, double y, double ly) {
  const double m = wx * x + wy * y;
  if (!(m < std::numeric_limits<double>::min())) return std::log(m);  // NaN too
  const double logs[2] = {lx + std::log(wx), ly + std::log(wy)};
  return logsumexp(logs, 2);
}

// KL(x ‖ β x + (1−β) y) per bucket: (term, ∂/∂log x, ∂/∂log y), with x = e^{lx}, y = e^{ly};
// x/m = e^{lx − log m} (m ≥ β x > 0 where x has mass, but it may underflow).
inline Terms skew(double x, double lx, double y, double ly, double beta) {
  const double lm = log_mixture(beta, x, lx, 1 - beta, y, ly);
  const double x_over_m = x != 0 ? std::exp(lx - lm) : 0.0;
  const double term = x != 0 ? x * (lx - lm) : 0.0;
  const double dx = x != 0 ? x * (lx - lm + 1) - beta * x * x_over_m : 0.0;
  const double dy = -(1 - beta) * y * x_over_m;
  return {term, dx, dy};
}

// Terms of a distribution in front that is 0 are selected away (never 0·log 0); NaN has "mass".
inline Terms bucket_terms(double u, double v, double beta, Kind kind) {
  const double p = std::exp(u), q = std::exp(v);
  switch (kind) {
    case kForwardKl:
      return {q != 0 ? q * (v - u) : 0.0, -q, q != 0 ? q * (v - u + 1) : 0.0};
    case kReverseKl:
      return {p != 0 ? p * (u - v) : 0.0, p != 0 ? p * (u - v + 1) : 0.0, -p};
    case kJsd: {
      const double lm = log_mixture(beta, q, v, 1 - beta, p, u);
      const double g = (1 - beta) * (p != 0 ? p * (u - lm) : 0.0);
      const double h = beta * (q != 0 ? q * (v - lm) : 0.0);
      return {g + h, g, h};  // the mixture terms cancel: D = Σ (g + h)
    }
    case kSkewForwardKl: {
      const Terms t = skew(q, v, p, u, beta);
      return {t.term, t.h, t.g};
    }
    case kSkewReverseKl:
      return skew(p, u, q, v, beta);
    case kTvd: {
      double sign = p > q ? 1.0 : p < q ? -1.0 : 0.0;
      if (p != p || q != q) sign = kNaN;
      return {0.5 * std::abs(q - p), 0.5 * p * sign, -0.5 * q * sign};
    }
    case kZeroTeacherReference:  // KL(q ‖ q): 0, NaN where q is
      return {v != kNegInf ? q * (v - v) : 0.0, 0.0, 0.0};
    case kZeroStudentReference:
      return {u != kNegInf ? p * (u - u) : 0.0, 0.0, 0.0};
  }
  return {kNaN, kNaN, kNaN};
}

// log(1 − e^x) for x < 0, accurate at both ends; x ≥ 0 (stored mass rounded to ≥ 1): −inf.
inline double log1mexp(double x) {
  if (x >= 0) return kNegInf;
  return x > -M_LN2 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// cap·tanh(scale·z / cap), each step only if configured; −inf kept −inf. slope = d/dz from the
// transformed value y: scale·(1 − (y/cap)²), scale at −inf.
template <typename acc_t>
struct Transform {
  bool has_scale = false, has_cap = false;
  acc_t scale = 1, cap = 1;
  using V = Vec<acc_t>;

  double apply(double z) const {
    if (has_scale) z *= static_cast<double>(scale);
    if (has_cap && z != kNegInf) z = cap * std::tanh(z / static_cast<double>(cap));
    return z;
  }
  double slope(double y) const {
    double s = 1;
    if (has_cap && y != kNegInf) {
      const double t = y / static_cast<double>(cap);
      s = (1 - t) * (1 + t);
    }
    return has_scale ? s * static_cast<double>(scale) : s;
  }
  V apply(V z) const {
    if (has_scale) z = z * V(scale);
    if (has_cap) z = V::blendv(V(cap) * (z / V(cap)).tanh(), z, z == V(-std::numeric_limits<acc_t>::infinity()));
    return z;
  }
  V slope(const V& y) const {
    V s(1);
    if (has_cap) {
      const V t = y / V(cap);
      s = V::blendv((V(1) - t) * (V(1) + t), V(1), y == V(-std::numeric_limits<acc_t>::infinity()));
    }
    return has_scale ? s * V(scale) : s;
  }
};

// One row of the student's logits: classes c·sc from `data`.
template <typename T>
struct Strided {
  T* data;
  int64_t sc;
  template <typename acc_t>
  Vec<acc_t> load(int64_t c, int64_t n) const {
    const T* p = data + c * sc;
    if (sc == 1) return n == Vec<acc_t>::size() ? load_vec<acc_t>(p) : load_vec_n<acc_t>(p, n);
    return load_vec_strided<acc_t>(p, sc, n);
  }
  template <typename acc_t>
  void store(const Vec<acc_t>& v, int64_t c, int64_t n) const {
    T* p = data + c * sc;
    if (sc == 1) {
      if (n == Vec<acc_t>::size()) {
        store_vec(v, p);
      } else {
        store_vec_n(v, p, n);
      }
    } else {
      store_vec_strided(v, p, sc, n);
    }
  }
};

// Calls f(c, n) for the vectors of classes [begin, end).
template <typename acc_t, typename F>
inline void for_vectors(int64_t begin, int64_t end, const F& f) {
  constexpr int64_t L = Vec<acc_t>::size();
  for (int64_t c = begin; c < end; c += L) f(c, std::min(L, end - c));
}

constexpr int64_t kBlock = 2048;  // classes per block of the complement pass: 8 KiB of fp32 stay in L1

// The sorted ids (the top-k: not in the complement) met in a walk over the row, vector by vector:
// `punch` sets the lanes of the ids in classes [c, c + L) to −inf, so that their exponentials are 0.
// A vector holds an id in at most k of the row's C/L vectors: elsewhere the check is one compare
// with the next id, predicted not taken (splitting the row into the k + 1 segments between the ids
// cost each segment a masked head and tail, a horizontal maximum and sum, and a rescale).
struct IdWalk {
  const int64_t* id;
  const int64_t* end;
  int64_t next;  // *id, or past every class
  IdWalk(const int64_t* begin, const int64_t* end_) : id(begin), end(end_) { next = id != end ? *id : INT64_MAX; }
  bool hits(int64_t c, int64_t L) const { return next < c + L; }
  // Inlined: a call in the hot loops (even on this rare path) made GCC keep their vector
  // accumulators on the stack, since a call clobbers every vector register.
  template <typename acc_t>
  __attribute__((always_inline)) Vec<acc_t> punch(Vec<acc_t> x, int64_t c) {
    constexpr int64_t L = Vec<acc_t>::size();
    __at_align__ acc_t lanes[L];
    x.store(lanes);
    for (; id != end && *id < c + L; ++id) lanes[*id - c] = neg_inf<acc_t>();
    next = id != end ? *id : INT64_MAX;
    return Vec<acc_t>::loadu(lanes);
  }
};

// Online softmax of z/T over the complement of the sorted ids, in blocks of kBlock classes. The row
// is walked as two streams, its first and second halves of blocks side by side (block j with block
// half + j): one core keeps twice the reads in flight (one stream read ~9 GB/s per core here, two
// ~11). Each pair's maximum (NaN-propagating) moves the running sums onto the new maximum, then one
// sweep adds both blocks' e^{(x − shift)/T}. m = the complement's maximum, z = Σ e^{(x − m)/T}
// (m = −inf: z = 0). With `cache` (the row's fp32/fp64 gradient buffer, contiguous), each
// exponential is also stored there (0 at the ids) and each block's shift in `shifts` (−inf while the
// complement so far is empty): the gradient pass then only rescales them (one exp per logit for the
// whole forward + backward, as kd_loss's ExpCache). The hot loops are instantiated per (contiguous
// row, cache, transformed row), with no call inside them (see IdWalk::punch and the dispatch below).
template <bool kContiguous, bool kCache, bool kTransformed, typename acc_t, typename s_t>
void complement_softmax_impl(const Strided<const s_t>& s, const int64_t* sorted, int64_t k, int64_t C,
                             const Transform<acc_t>& tr, acc_t inv_t, acc_t& m, acc_t& z, acc_t* cache, acc_t* shifts) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  constexpr acc_t ninf = neg_inf<acc_t>();
  auto apply = [&tr](const V& x) __attribute__((always_inline)) {
    if constexpr (kTransformed) {
      return tr.apply(x);
    } else {
      return x;
    }
  };
  // The complement's vector at c (full), or its last partial vector [c, end) padded with −inf.
  auto vector_at = [&s, &apply](int64_t c, IdWalk& ids) __attribute__((always_inline)) {
    V x;
    if constexpr (kContiguous) {
      x = apply(load_vec<acc_t>(s.data + c));
    } else {
      x = apply(load_vec_strided<acc_t>(s.data + c * s.sc, s.sc, L));
    }
    return ids.hits(c, L) ? ids.punch(x, c) : x;
  };
  auto tail_at = [&s, &apply](int64_t c, int64_t end, IdWalk& ids) {
    return ids.punch(V::set(V(ninf), apply(s.template load<acc_t>(c, end - c)), end - c), c);
  };
  const V vinv(inv_t);
  V za(0), zb(0);
  acc_t shift = 0;
  m = ninf;
  const int64_t blocks = (C + kBlock - 1) / kBlock, half = (blocks + 1) / 2;
  const int64_t* const ids_end = sorted + k;
  IdWalk ids_a(sorted, ids_end), ids_b(std::lower_bound(sorted, ids_end, half * kBlock), ids_end);
  for (int64_t j = 0; j < half; ++j) {
    // Block a = j (full unless it is the row's only block), block b = half + j (maybe absent or
    // partial): full vectors of both side by side, then what is left of each.
    const int64_t a0 = j * kBlock, a1 = std::min(C, a0 + kBlock), av = a0 + (a1 - a0) / L * L;
    const int64_t b0 = (half + j) * kBlock, b1 = half + j < blocks ? std::min(C, b0 + kBlock) : b0;
    const int64_t bv = b0 + (b1 - b0) / L * L;
    const int64_t both = std::min(av - a0, bv - b0);
    const IdWalk start_a = ids_a, start_b = ids_b;
    V ma(ninf), mb(ninf);
    for (int64_t i = 0; i < both; i += L) {
      const V xa = vector_at(a0 + i, ids_a);
      const V xb = vector_at(b0 + i, ids_b);
      ma = at::vec::maximum(ma, xa);
      mb = at::vec::maximum(mb, xb);
    }
    for (int64_t c = a0 + both; c < av; c += L) ma = at::vec::maximum(ma, vector_at(c, ids_a));
    for (int64_t c = b0 + both; c < bv; c += L) mb = at::vec::maximum(mb, vector_at(c, ids_b));
    if (av < a1) ma = at::vec::maximum(ma, tail_at(av, a1, ids_a));
    if (bv < b1) mb = at::vec::maximum(mb, tail_at(bv, b1, ids_b));
    const acc_t new_m = nan_max(m, nan_max(hmax(ma), hmax(mb)));
    if (!(new_m == m)) {  // grew, or became NaN
      const acc_t new_shift = new_m == ninf ? acc_t(0) : new_m;
      if (m != ninf) {
        const V f(std::exp((shift - new_shift) * inv_t));
        za = za * f;
        zb = zb * f;
      }
      shift = new_shift;
      m = new_m;
    }
    if constexpr (kCache) {
      shifts[j] = m == ninf ? ninf : shift;
      if (half + j < blocks) shifts[half + j] = shifts[j];
    }
    ids_a = start_a;
    ids_b = start_b;
    const V vshift(shift);
    V sa = za, sb = zb;
    // e^{(x − shift)/T} of classes [c, c + n) into `sum` (and the cache).
    auto add_exp = [&](const V& x, V& sum, int64_t c, int64_t n) __attribute__((always_inline)) {
      const V e = fast_exp<acc_t>((x - vshift) * vinv);
      sum = sum + e;
      if constexpr (kCache) {
        if (n == L) {
          e.store(cache + c);
        } else {
          e.store(cache + c, n);
        }
      }
    };
    for (int64_t i = 0; i < both; i += L) {
      // The next pair of blocks, fetched while these exponentials are computed (as the row walker).
      if constexpr (kContiguous) {
        __builtin_prefetch(s.data + a0 + i + kBlock, 0, 3);
        __builtin_prefetch(s.data + b0 + i + kBlock, 0, 3);
      }
      add_exp(vector_at(a0 + i, ids_a), sa, a0 + i, L);
      add_exp(vector_at(b0 + i, ids_b), sb, b0 + i, L);
    }
    for (int64_t c = a0 + both; c < av; c += L) add_exp(vector_at(c, ids_a), sa, c, L);
    for (int64_t c = b0 + both; c < bv; c += L) add_exp(vector_at(c, ids_b), sb, c, L);
    if (av < a1) add_exp(tail_at(av, a1, ids_a), sa, av, a1 - av);
    if (bv < b1) add_exp(tail_at(bv, b1, ids_b), sb, bv, b1 - bv);
    za = sa;
    zb = sb;
  }
  z = hsum(za + zb);
}

template <typename acc_t, typename s_t>
void complement_softmax(const Strided<const s_t>& s, const int64_t* sorted, int64_t k, int64_t C,
                        const Transform<acc_t>& tr, acc_t inv_t, acc_t& m, acc_t& z, acc_t* cache, acc_t* shifts) {
  // Soft-capping or scaling: tr.apply may call tanh, so the untransformed row gets its own loops.
  // (A strided row takes the transform's branches per vector: its gathers cost more anyway.)
  const bool transformed = tr.has_cap || tr.has_scale;
  if (s.sc != 1) {
    if (cache != nullptr) return complement_softmax_impl<false, true, true>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
    return complement_softmax_impl<false, false, true>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
  }
  if (transformed) {
    if (cache != nullptr) return complement_softmax_impl<true, true, true>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
    return complement_softmax_impl<true, false, true>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
  }
  if (cache != nullptr) return complement_softmax_impl<true, true, false>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
  complement_softmax_impl<true, false, false>(s, sorted, k, C, tr, inv_t, m, z, cache, shifts);
}

// The cached exponentials of complement_softmax into the gradient, in place (the ids' classes hold
// 0; the caller writes them after): in block b,
// grad_j = coef·slope(x_j)·e^{x_j/T − lse_out} = e_j·coef·e^{shift_b/T − lse_out}·slope(x_j).
template <typename acc_t, typename s_t>
void complement_gradient_cached(const Strided<const s_t>& s, acc_t* cache, const acc_t* shifts, int64_t C,
                                const Transform<acc_t>& tr, double inv_t, double lse_out, double coef) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const bool has_slope = tr.has_cap || tr.has_scale;
  for (int64_t c0 = 0, block = 0; c0 < C; c0 += kBlock, ++block) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    const V factor(static_cast<acc_t>(coef * std::exp(static_cast<double>(shifts[block]) * inv_t - lse_out)));
    for (int64_t c = c0; c < c1; c += L) {
      const int64_t n = std::min(L, c1 - c);
      V g = (n == L ? V::loadu(cache + c) : V::loadu(cache + c, n)) * factor;
      if (has_slope) g = g * tr.slope(tr.apply(s.template load<acc_t>(c, n)));
      if (n == L) {
        g.store(cache + c);
      } else {
        g.store(cache + c, n);
      }
    }
  }
}

// grad_j = scale_j·slope(x_j)·e^{x_j/T − lse_out} for the classes outside the sorted ids.
template <typename acc_t, typename s_t>
void complement_gradient(const Strided<const s_t>& s, const Strided<s_t>& gs, const int64_t* sorted, int64_t k,
                         int64_t C, const Transform<acc_t>& tr, acc_t inv_t, acc_t lse_out, acc_t coef) {
  using V = Vec<acc_t>;
  const V vinv(inv_t), vlse(lse_out), vcoef(coef);
  int64_t begin = 0;
  for (int64_t b = 0; b <= k; ++b) {
    const int64_t end = b < k ? sorted[b] : C;
    for_vectors<acc_t>(begin, end, [&](int64_t c, int64_t n) {
      const V y = tr.apply(s.template load<acc_t>(c, n));
      const V e = (y * vinv - vlse).exp();  // libm-grade: this is the gradient itself
      gs.template store<acc_t>(vcoef * e * tr.slope(y), c, n);
    });
    begin = std::max(begin, end + 1);
  }
}

template <typename T>
void fill_zero(const Strided<T>& x, int64_t C) {
  if (x.sc == 1) {
    std::fill(x.data, x.data + C, T(0));
  } else {
    for (int64_t c = 0; c < C; ++c) x.data[c * x.sc] = T(0);
  }
}

struct Options {
  Kind kind;
  double beta, temperature, stored_temperature, factor, grad_scale;
  bool tail_bucket, logprob_values;
};

// Per-thread scratch of O(k).
struct Scratch {
  std::vector<int64_t> sorted;
  std::vector<double> t, y, sk, w, u, v, g, h;
  void resize(int64_t k) {
    sorted.resize(k);
    for (auto* x : {&t, &y, &sk, &w, &u, &v, &g, &h}) x->resize(k + 1);
  }
};

template <typename s_t, typename v_t>
void sparse_rows_impl(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                      const bool* mask, const Options& opt, const Transform<typename cpu::acc_type_t<s_t, v_t>>& s_tr,
                      const Transform<double>& t_tr, at::Tensor& loss, at::Tensor& grad_student,
                      at::Tensor& grad_values, bool student_grad, bool values_grad) {
  using acc_t = acc_type_t<s_t, v_t>;
  const int64_t O = student.size(0), C = student.size(1), I = student.size(2), K = values.size(1);
  const s_t* s_p = student.data_ptr<s_t>();
  const v_t* v_p = values.data_ptr<v_t>();
  const int64_t* i_p = indices.data_ptr<int64_t>();
  s_t* gs_p = student_grad ? grad_student.data_ptr<s_t>() : nullptr;
  v_t* gv_p = values_grad ? grad_values.data_ptr<v_t>() : nullptr;
  acc_t* loss_p = loss.data_ptr<acc_t>();
  const double T = opt.temperature, inv_t = 1.0 / T, T0 = opt.stored_temperature;
  const int64_t P = O * I;
  // Only the tail bucket reads the whole student row; renormalize is O(k) per row.
  const int64_t work = opt.tail_bucket ? C : std::max<int64_t>(K, 1) * 8;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / work);

  // The gradient buffer doubles as the exponentials' cache where it holds acc_t contiguously.
  const bool use_cache = student_grad && opt.tail_bucket && std::is_same_v<s_t, acc_t> && grad_student.stride(1) == 1;
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    Scratch sc;
    sc.resize(K);
    std::vector<acc_t> shifts((C + kBlock - 1) / kBlock);
    acc_t* cache = nullptr;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p / I, i = p % I;
      const Strided<const s_t> s{s_p + o * student.stride(0) + i * student.stride(2), student.stride(1)};
      const v_t* vals = v_p + o * values.stride(0) + i * values.stride(2);
      const int64_t* ids = i_p + o * indices.stride(0) + i * indices.stride(2);
      const int64_t vk = values.stride(1), ik = indices.stride(1);
      const Strided<s_t> gs{student_grad ? gs_p + o * grad_student.stride(0) + i * grad_student.stride(2) : nullptr,
                            student_grad ? grad_student.stride(1) : 0};
      v_t* gv = values_grad ? gv_p + o * grad_values.stride(0) + i * grad_values.stride(2) : nullptr;
      const int64_t gvk = values_grad ? grad_values.stride(1) : 0;

      // The teacher's (transformed) values; the row counts when masked in and some is > −inf.
      double t_max = kNegInf;
      for (int64_t b = 0; b < K; ++b) {
        const double raw = static_cast<double>(vals[b * vk]);
        sc.t[b] = opt.logprob_values ? raw : t_tr.apply(raw);
        t_max = nan_max(t_max, sc.t[b]);
      }
      const bool counted = (mask == nullptr || mask[p]) && t_max != kNegInf;
      if (!counted) {
        loss_p[p] = acc_t(0);
        if (student_grad) fill_zero(gs, C);
        if (values_grad) {
          for (int64_t b = 0; b < K; ++b) gv[b * gvk] = v_t(0);
        }
        continue;
      }
      for (int64_t b = 0; b < K; ++b) {
        const int64_t id = ids[b * ik];
        TORCH_CHECK(id >= 0 && id < C, "sparse_divergence_rows: index ", id, " outside [0, ", C, ")");
        sc.sorted[b] = id;
      }

      // Teacher buckets.
      const int64_t nb = opt.tail_bucket ? K + 1 : K;
      for (int64_t b = 0; b < K; ++b) sc.w[b] = opt.logprob_values ? sc.t[b] * (T0 * inv_t) : sc.t[b] * inv_t;
      double lse_values = kNegInf, log_tail_t = kNegInf;
      if (opt.tail_bucket && K < C) {
        lse_values = logsumexp(sc.t.data(), K);
        log_tail_t = log1mexp(lse_values);
        if (lse_values != lse_values) log_tail_t = kNaN;
        sc.w[K] = log_tail_t * (T0 * inv_t);
      } else if (opt.tail_bucket) {
        sc.w[K] = kNegInf;  // k = V: what 1 − Σ p_t holds is rounding, not mass
      }
      const double lse_w = logsumexp(sc.w.data(), nb);
      for (int64_t b = 0; b < nb; ++b) sc.v[b] = sc.w[b] - lse_w;

      // Student buckets. The complement pass comes first: the k logits at the ids are then read
      // from cache, not as k scattered misses ahead of the row's sequential read.
      double lse_out = kNegInf;
      acc_t m_out = 0;
      if (opt.tail_bucket) {
        std::sort(sc.sorted.begin(), sc.sorted.end());
        acc_t z_out = 0;
        cache = use_cache ? reinterpret_cast<acc_t*>(gs.data) : nullptr;
        complement_softmax<acc_t, s_t>(s, sc.sorted.data(), K, C, s_tr, static_cast<acc_t>(inv_t), m_out, z_out, cache,
                                       cache != nullptr ? shifts.data() : nullptr);
        if (m_out != m_out || m_out == std::numeric_limits<acc_t>::infinity()) {
          lse_out = kNaN;  // fast_exp need not carry NaN through the sum: say it here
        } else if (m_out != -std::numeric_limits<acc_t>::infinity()) {
          lse_out = static_cast<double>(m_out) * inv_t + std::log(static_cast<double>(z_out));
        }
      }
      for (int64_t b = 0; b < K; ++b) {
        sc.y[b] = s_tr.apply(static_cast<double>(s.data[ids[b * ik] * s.sc]));
        sc.sk[b] = sc.y[b] * inv_t;
      }
      const double lse_k = logsumexp(sc.sk.data(), K);
      double lse_all = lse_k;
      if (opt.tail_bucket) {
        const double pair[2] = {lse_k, lse_out};
        lse_all = logsumexp(pair, 2);
        for (int64_t b = 0; b < K; ++b) sc.u[b] = sc.sk[b] - lse_all;
        sc.u[K] = lse_out - lse_all;
      } else {
        for (int64_t b = 0; b < K; ++b) sc.u[b] = sc.sk[b] - lse_k;
      }

      // The divergence over the buckets and its bucket gradients.
      double D = 0, G = 0, H = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const Terms tb = bucket_terms(sc.u[b], sc.v[b], opt.beta, opt.kind);
        D += tb.term;
        G += tb.g;
        H += tb.h;
        sc.g[b] = tb.g;
        sc.h[b] = tb.h;
      }
      loss_p[p] = static_cast<acc_t>(opt.factor * D);

      const double c = opt.grad_scale * opt.factor;  // the loss's scale in grad_scale·Σ loss
      // KL(q ‖ q) does not read the student at all (nor KL(p ‖ p) the teacher): its gradient is 0
      // even where that model's logits are NaN (which 0·NaN below would spread).
      if (student_grad && opt.kind == kZeroTeacherReference) {
        fill_zero(gs, C);
      } else if (student_grad) {
        if (opt.tail_bucket) {
          // j ∉ K: c/T·slope·p_j·(g_tail/P_tail − Σg) = c/T·slope·e^{z_j/T − lse_out}·(g_tail − Σg·P_tail);
          // an empty complement (all −inf, or k = V) has p_j = 0 there.
          if (lse_out == kNegInf) {
            fill_zero(gs, C);
          } else {
            const double p_tail = std::exp(lse_out - lse_all);
            const double coef = c * inv_t * (sc.g[K] - G * p_tail);
            if (cache != nullptr) {
              complement_gradient_cached<acc_t, s_t>(s, cache, shifts.data(), C, s_tr, inv_t, lse_out, coef);
            } else {
              complement_gradient<acc_t, s_t>(s, gs, sc.sorted.data(), K, C, s_tr, static_cast<acc_t>(inv_t),
                                              static_cast<acc_t>(lse_out), static_cast<acc_t>(coef));
            }
          }
        } else {
          fill_zero(gs, C);
        }
        for (int64_t b = 0; b < K; ++b) {
          const int64_t id = ids[b * ik];
          gs.data[id * gs.sc] = static_cast<s_t>(c * inv_t * (sc.g[b] - std::exp(sc.u[b]) * G) * s_tr.slope(sc.y[b]));
        }
      }
      if (values_grad && opt.kind == kZeroStudentReference) {
        for (int64_t b = 0; b < K; ++b) gv[b * gvk] = v_t(0);
      } else if (values_grad) {
        // ∂D/∂w_b = h_b − q_b·Σh; w_b = values_b·T₀/T (log-probs) or transform(values_b)/T (logits);
        // w_tail = (T₀/T)·log1mexp(lse(t)): ∂w_tail/∂t_b = −(T₀/T)·e^{t_b − log1mexp(lse(t))}.
        double tail_part = 0;
        const bool tail_live = opt.tail_bucket && K < C && !(lse_values >= 0);
        if (tail_live) tail_part = (sc.h[K] - std::exp(sc.v[K]) * H) * (-T0 * inv_t);
        for (int64_t b = 0; b < K; ++b) {
          const double dw = sc.h[b] - std::exp(sc.v[b]) * H;
          double d = dw * (opt.logprob_values ? T0 * inv_t : inv_t);
          if (tail_live) d += tail_part * std::exp(sc.t[b] - log_tail_t);
          if (!opt.logprob_values) d *= t_tr.slope(sc.t[b]);
          gv[b * gvk] = static_cast<v_t>(c * d);
        }
      }
    }
  });
}

}  // namespace

TensorTriple sparse_divergence_rows_cpu(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                        const c10::optional<at::Tensor>& mask, c10::string_view divergence,
                                        double beta, double temperature, bool scale_by_t2, c10::string_view tail,
                                        c10::string_view teacher_values, double stored_temperature,
                                        c10::optional<double> student_softcap, c10::optional<double> teacher_softcap,
                                        c10::optional<double> student_logit_scale,
                                        c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
                                        bool student_grad, bool values_grad) {
  TORCH_CHECK(student.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "sparse_divergence_rows_cpu: expected CPU tensors");
  TORCH_CHECK(student.dim() == 3 && values.dim() == 3 && indices.dim() == 3,
              "sparse_divergence_rows: student, values and indices must be 3-D (O, ·, I)");
  TORCH_CHECK(values.sizes() == indices.sizes(), "sparse_divergence_rows: values ", values.sizes(), " and indices ",
              indices.sizes(), " differ in shape");
  TORCH_CHECK(values.size(0) == student.size(0) && values.size(2) == student.size(2),
              "sparse_divergence_rows: values ", values.sizes(), " do not match the student's positions ",
              student.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "sparse_divergence_rows: indices must be int64");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && at::isFloatingType(values.scalar_type()),
              "sparse_divergence_rows: expected floating-point logits and values");
  TORCH_CHECK(temperature > 0 && stored_temperature > 0, "sparse_divergence_rows: temperatures must be positive");
  TORCH_CHECK(grad_scale.numel() == 1, "sparse_divergence_rows: grad_scale must have one element");
  const std::string tail_s(tail), values_s(teacher_values);
  TORCH_CHECK(tail_s == "renormalize" || tail_s == "tail_bucket", "sparse_divergence_rows: unknown tail ", tail_s);
  TORCH_CHECK(values_s == "logits" || values_s == "logprobs", "sparse_divergence_rows: unknown teacher_values ",
              values_s);
  const int64_t O = student.size(0), C = student.size(1), I = student.size(2), K = values.size(1);
  const bool* mask_p = nullptr;
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "sparse_divergence_rows: mask must be bool");
    TORCH_CHECK(mask->numel() == O * I, "sparse_divergence_rows: mask must have shape (", O, ", ", I, ")");
    mask_c = mask->contiguous();
    mask_p = mask_c.numel() > 0 ? mask_c.data_ptr<bool>() : nullptr;
  }
  const bool use_double = student.scalar_type() == at::kDouble || values.scalar_type() == at::kDouble;
  at::Tensor loss = at::empty({O, I}, student.options().dtype(use_double ? at::kDouble : at::kFloat));
  at::Tensor grad_student = cpu::gradient_buffer(student, student_grad);
  at::Tensor grad_values = cpu::gradient_buffer(values, values_grad);
  if (O * I == 0) return {loss, grad_student, grad_values};
  if (C == 0 || K == 0) {  // no teacher mass anywhere: nothing counts
    loss.zero_();
    if (student_grad) grad_student.zero_();
    if (values_grad) grad_values.zero_();
    return {loss, grad_student, grad_values};
  }
  Options opt;
  opt.kind = kind_of("sparse_divergence_rows", divergence, beta);
  opt.beta = beta;
  opt.temperature = temperature;
  opt.stored_temperature = stored_temperature;
  opt.factor = scale_by_t2 ? temperature * temperature : 1.0;
  opt.grad_scale = grad_scale.item<double>();
  opt.tail_bucket = tail_s == "tail_bucket";
  opt.logprob_values = values_s == "logprobs";
  Transform<double> t_tr;
  t_tr.has_scale = teacher_logit_scale.has_value();
  t_tr.scale = teacher_logit_scale.value_or(1.0);
  t_tr.has_cap = teacher_softcap.has_value();
  t_tr.cap = teacher_softcap.value_or(1.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "sparse_divergence_rows_cpu", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_divergence_rows_cpu", [&] {
      using v_t = scalar_t;
      using acc_t = acc_type_t<s_t, v_t>;
      Transform<acc_t> s_tr;
      s_tr.has_scale = student_logit_scale.has_value();
      s_tr.scale = static_cast<acc_t>(student_logit_scale.value_or(1.0));
      s_tr.has_cap = student_softcap.has_value();
      s_tr.cap = static_cast<acc_t>(student_softcap.value_or(1.0));
      sparse_rows_impl<s_t, v_t>(student, values, indices, mask_p, opt, s_tr, t_tr, loss, grad_student, grad_values,
                                 student_grad, values_grad);
    });
  });
  return {loss, grad_student, grad_values};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(sparse_divergence_rows_cpu);
