// The per-class arithmetic of the LLM divergence kernels (divergences_kernel.cu, dense teacher;
// sparse_divergences_kernel.cu, top-k teacher), torch-free and __host__ __device__ so that the
// host test (tests/divergences_test.cu) runs exactly what the kernels inline. The formulas, their
// directions and the edge cases are kdkernels/ops/reference/divergences.py's; the CPU kernels
// (csrc/cpu/divergences.cpp, sparse_divergences.cpp) and the Triton ones compute the same.
//
// With p = p_s, q = p_t, u = log p, v = log q per class (or bucket):
//   forward_kl  KL(q ‖ p)          reverse_kl  KL(p ‖ q)
//   jsd         β KL(q ‖ m) + (1−β) KL(p ‖ m),  m = β q + (1−β) p   (β = 0 / 1: forward / reverse KL)
//   skew_forward_kl  KL(q ‖ β q + (1−β) p)       skew_reverse_kl  KL(p ‖ β p + (1−β) q)
//   tvd         ½ Σ |q − p|
// bucket_terms gives per class (term, g = ∂D/∂u, h = ∂D/∂v); the logit gradients follow as
// ∂D/∂z_s = (g − p Σg)/T and ∂D/∂z_t = (h − q Σh)/T.
#pragma once

#include <cstdint>
#include <cstring>

#include "softmax_pair_walker.cuh"  // common.cuh; add_logit, merge_sums (device part)

namespace kdkernels {
namespace cuda {

// The divergence after β's endpoints are resolved (csrc/cpu/divergence_kind.h's convention): β = 0 / 1
// of a mixture is the KL it reduces to, computed without its log 0 terms.
enum class DivergenceKind : int {
  kForwardKl = 0,             // KL(q ‖ p)
  kReverseKl = 1,             // KL(p ‖ q)
  kJsd = 2,                   // β KL(q ‖ m) + (1−β) KL(p ‖ m), m = β q + (1−β) p
  kSkewForwardKl = 3,         // KL(q ‖ β q + (1−β) p)
  kSkewReverseKl = 4,         // KL(p ‖ β p + (1−β) q)
  kTvd = 5,                   // ½ Σ |q − p|
  kZeroTeacherReference = 6,  // skew_forward_kl at β = 1: KL(q ‖ q)
  kZeroStudentReference = 7,  // skew_reverse_kl at β = 1: KL(p ‖ p)
};

// The kind of the divergence `name` at `beta`; false for an unknown name.
inline bool divergence_kind_of(const char* name, double beta, DivergenceKind& kind) {
  auto is = [&](const char* s) { return std::strcmp(name, s) == 0; };
  if (is("forward_kl")) {
    kind = DivergenceKind::kForwardKl;
  } else if (is("reverse_kl")) {
    kind = DivergenceKind::kReverseKl;
  } else if (is("jsd")) {
    kind = beta == 0 ? DivergenceKind::kForwardKl : beta == 1 ? DivergenceKind::kReverseKl : DivergenceKind::kJsd;
  } else if (is("skew_forward_kl")) {
    kind = beta == 0   ? DivergenceKind::kForwardKl
           : beta == 1 ? DivergenceKind::kZeroTeacherReference
                       : DivergenceKind::kSkewForwardKl;
  } else if (is("skew_reverse_kl")) {
    kind = beta == 0   ? DivergenceKind::kReverseKl
           : beta == 1 ? DivergenceKind::kZeroStudentReference
                       : DivergenceKind::kSkewReverseKl;
  } else if (is("tvd")) {
    kind = DivergenceKind::kTvd;
  } else {
    return false;
  }
  return true;
}

// One model's logit transform as the launchers take it: z = cap·tanh(scale·x / cap), each step only
// if configured (Gemma's soft-capping, a logit scale).
struct LogitTransformParams {
  bool has_scale = false;
  bool has_cap = false;
  double scale = 1.0;
  double cap = 1.0;
};

#ifdef __CUDACC__
namespace detail {

template <typename Acc>
__host__ __device__ __forceinline__ Acc quiet_nan() {
  return static_cast<Acc>(NAN);
}

// NaN or +inf: a maximum that makes its row NaN (the reference's log-softmax is NaN there).
template <typename Acc>
__host__ __device__ __forceinline__ bool nan_or_pos_inf(Acc x) {
  return !(x < static_cast<Acc>(INFINITY));
}

// The transform in the accumulation type, −inf kept −inf, and its slope dz/dx from the transformed
// value z: scale·(1 − (z/cap)²) (= scale·(1 − tanh²)), scale alone at −inf.
template <typename Acc>
struct LogitTransform {
  bool has_scale, has_cap;
  Acc scale, cap;

  static LogitTransform make(const LogitTransformParams& p) {
    return {p.has_scale, p.has_cap, static_cast<Acc>(p.scale), static_cast<Acc>(p.cap)};
  }
  __host__ __device__ Acc apply(Acc x) const {
    if (has_scale) x *= scale;
    if (has_cap && x != neg_inf<Acc>()) x = cap * acc_tanh(x / cap);
    return x;
  }
  __host__ __device__ Acc slope(Acc z) const {
    Acc s = Acc(1);
    if (has_cap && z != neg_inf<Acc>()) {
      const Acc t = z / cap;
      s = (Acc(1) - t) * (Acc(1) + t);
    }
    return has_scale ? s * scale : s;
  }
};

// One class's (or bucket's) loss term and its derivatives g = ∂D/∂u, h = ∂D/∂v.
template <typename Acc>
struct BucketTerms {
  Acc term, g, h;
};

// Sums over the classes (or buckets) of the loss terms and of the bucket gradients.
template <typename Acc>
struct TermSums {
  Acc d, g, h;  // Σ term, Σ g, Σ h
  __host__ __device__ static TermSums add(const TermSums& x, const TermSums& y) {
    return {x.d + y.d, x.g + y.g, x.h + y.h};
  }
};

// The smallest normal number: a mixture below it has lost precision or underflowed (to 0 under
// flush-to-zero, or when w·x rounds away).
template <typename Acc>
__host__ __device__ __forceinline__ Acc min_normal() {
  return sizeof(Acc) == sizeof(double) ? static_cast<Acc>(2.2250738585072014e-308) : static_cast<Acc>(1.17549435e-38f);
}

// log m and x/m of the mixture m = w·x + (1−w)·y of two probabilities (lx = log x, ly = log y).
// Where m is not a normal number both come from log space (log m = logaddexp(lx + log w,
// ly + log(1−w))): an underflowed m = 0 would make log m = −inf, and the terms +inf, where x or y
// still has (tiny) mass; the reference's log-space mixture has no such cliff.
template <typename Acc>
__host__ __device__ __forceinline__ void log_mixture(Acc x, Acc lx, Acc y, Acc ly, Acc w, Acc& log_m, Acc& x_over_m) {
  const Acc m = w * x + (Acc(1) - w) * y;
  if (m >= min_normal<Acc>()) {
    log_m = acc_log(m);
    x_over_m = x / m;
    return;
  }
  const Acc la = lx + acc_log(w);
  const Acc lb = ly + acc_log1p(-w);
  const Acc hi = nan_max(la, lb);
  const Acc lo = la == hi ? lb : la;
  log_m = hi == neg_inf<Acc>() ? hi : hi + acc_log1p(acc_exp(lo - hi));  // NaN propagates
  x_over_m = acc_exp(lx - log_m);
}

// KL(x ‖ β x + (1−β) y) per class: (term, ∂/∂log x, ∂/∂log y); m ≥ β x > 0 where x has mass.
template <typename Acc>
__host__ __device__ __forceinline__ BucketTerms<Acc> skew_terms(Acc x, Acc lx, Acc y, Acc ly, Acc beta) {
  Acc lm, x_over_m;
  log_mixture(x, lx, y, ly, beta, lm, x_over_m);
  BucketTerms<Acc> r;
  r.term = x != Acc(0) ? x * (lx - lm) : Acc(0);
  r.g = x != Acc(0) ? x * (lx - lm + Acc(1)) - beta * x * x_over_m : Acc(0);  // ∂/∂log x
  r.h = lm != neg_inf<Acc>() ? -(Acc(1) - beta) * y * x_over_m : Acc(0);      // ∂/∂log y
  return r;
}

// Per class: (term, g, h) at u = log p, v = log q. Terms of a class where the distribution in front
// is 0 are selected away (never 0·log 0); NaN has "mass", so it propagates. The zero kinds (KL of a
// distribution with itself) have the term x·(lx − lx): 0, NaN where x is.
template <typename Acc>
__host__ __device__ __forceinline__ BucketTerms<Acc> bucket_terms(DivergenceKind kind, Acc u, Acc v, Acc beta) {
  const Acc p = acc_exp(u);
  const Acc q = acc_exp(v);
  switch (kind) {
    case DivergenceKind::kForwardKl:
      return {q != Acc(0) ? q * (v - u) : Acc(0), -q, q != Acc(0) ? q * (v - u + Acc(1)) : Acc(0)};
    case DivergenceKind::kReverseKl:
      return {p != Acc(0) ? p * (u - v) : Acc(0), p != Acc(0) ? p * (u - v + Acc(1)) : Acc(0), -p};
    case DivergenceKind::kJsd: {
      Acc lm, q_over_m;
      log_mixture(q, v, p, u, beta, lm, q_over_m);
      const Acc g = (Acc(1) - beta) * (p != Acc(0) ? p * (u - lm) : Acc(0));
      const Acc h = beta * (q != Acc(0) ? q * (v - lm) : Acc(0));
      return {g + h, g, h};  // the mixture's own terms cancel: D = Σ (g + h)
    }
    case DivergenceKind::kSkewForwardKl: {
      const BucketTerms<Acc> t = skew_terms(q, v, p, u, beta);
      return {t.term, t.h, t.g};
    }
    case DivergenceKind::kSkewReverseKl:
      return skew_terms(p, u, q, v, beta);
    case DivergenceKind::kTvd: {
      Acc sign = p > q ? Acc(1) : p < q ? Acc(-1) : Acc(0);
      if (p != p || q != q) sign = quiet_nan<Acc>();
      const Acc d = q - p;
      return {Acc(0.5) * (d < Acc(0) ? -d : d), Acc(0.5) * p * sign, Acc(-0.5) * q * sign};
    }
    case DivergenceKind::kZeroTeacherReference:
      return {v != neg_inf<Acc>() ? q * (v - v) : Acc(0), Acc(0), Acc(0)};
    case DivergenceKind::kZeroStudentReference:
      return {u != neg_inf<Acc>() ? p * (u - u) : Acc(0), Acc(0), Acc(0)};
  }
  return {quiet_nan<Acc>(), quiet_nan<Acc>(), quiet_nan<Acc>()};
}

// log(1 − e^x) for x < 0, accurate at both ends; x ≥ 0 (a stored mass rounded to ≥ 1): −inf.
template <typename Acc>
__host__ __device__ __forceinline__ Acc log1mexp(Acc x) {
  if (x >= Acc(0)) return neg_inf<Acc>();
  return x > Acc(-0.6931471805599453) ? acc_log(-acc_expm1(x)) : acc_log1p(-acc_exp(x));
}

// An online log-sum-exp of values x (already scaled): the NaN-propagating running maximum m and
// z = Σ e^{x − m}, on the walker's add_logit / merge_sums (softmax_pair_walker.cuh) with a unit
// temperature.
template <typename Acc>
struct OnlineLse {
  Acc m, z;

  __host__ __device__ static OnlineLse empty() { return {neg_inf<Acc>(), Acc(0)}; }
  __host__ __device__ void add(Acc x) {
    Acc m_old, scale, weight;
    bool up;
    add_logit(x, m, z, Acc(1), m_old, up, scale, weight);
  }
  __host__ __device__ static OnlineLse merge(const OnlineLse& x, const OnlineLse& y) {
    OnlineLse r;
    Acc scale_x, scale_y;
    merge_sums(x.m, x.z, y.m, y.z, Acc(1), r.m, r.z, scale_x, scale_y);
    return r;
  }
  // log Σ e^x: −inf when empty (all −inf), NaN for a NaN or +inf maximum.
  __host__ __device__ Acc value() const {
    if (m == neg_inf<Acc>()) return m;
    if (nan_or_pos_inf(m)) return quiet_nan<Acc>();
    return m + acc_log(z);
  }
};

// log(e^x + e^y) with the rules of OnlineLse::value.
template <typename Acc>
__host__ __device__ __forceinline__ Acc log_add_exp(Acc x, Acc y) {
  OnlineLse<Acc> l = OnlineLse<Acc>::empty();
  l.add(x);
  l.add(y);
  return l.value();
}

}  // namespace detail
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace kdkernels
