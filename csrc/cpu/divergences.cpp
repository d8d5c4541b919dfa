// CPU kernel of kdkernels::divergence_rows: the LLM divergence family per position (forward and
// reverse KL, generalized JSD, skew KLs, total variation) of a student and a dense teacher, and
// its gradients. The formulas, their directions and the edge cases are those of
// kdkernels/ops/reference/divergences.py; kdkernels/ops/triton/divergences.py is the same kernel in
// Triton. With p = softmax(z_s/T), q = softmax(z_t/T) of the transformed logits
// z = cap·tanh(scale·x/cap) (each step only if configured), u = log p, v = log q:
//
//   forward_kl  KL(q ‖ p)         reverse_kl  KL(p ‖ q)
//   jsd         β KL(q ‖ m) + (1−β) KL(p ‖ m),  m = β q + (1−β) p   (β = 0: forward, β = 1: reverse KL)
//   skew_forward_kl  KL(q ‖ β q + (1−β) p)      skew_reverse_kl  KL(p ‖ β p + (1−β) q)
//   tvd         ½ Σ |q − p|
//
// times T² with scale_by_t2. Rows layout only (classes contiguous, the LLM case): each row walks
// through the shared two-distribution walker (two_distribution_row.h).
//   * The KL divergences are its KL policy (kl_row_policy.h), walked (student, teacher) for the
//     forward KL and (teacher, student) for the reverse one: one pass gives the loss, and the
//     student gradient of the forward KL is a rescale of pass 1's cached exponentials, as kd_loss.
//   * The mixtures (JSD, skew KLs, TVD) need both normalisers before any term: pass 1 is a plain
//     two-softmax walk that caches the exponentials; pass 2 turns them into p and q, evaluates the
//     terms and the bucket gradients g = ∂D/∂u, h = ∂D/∂v (kept in a per-thread scratch); pass 3,
//     when a gradient is wanted, writes ∂D/∂z_s = (g − p Σg)/T and ∂D/∂z_t = (h − q Σh)/T.
//     All passes after the first read L2-resident rows: each logit comes from memory once.
// A transformed model's row is first written (transformed) into a scratch row that the passes
// read; the gradients are multiplied by the transform's slope before they are stored.
// Other layouts are copied to rows first, and mixed dtypes promoted to one (both: a slow path,
// never the LLM one). A NaN or +inf logit in a counted row makes its loss and gradients NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "divergence_kind.h"
#include "gradient_buffer.h"
#include "kl_row_policy.h"
#include "row_op_inputs.h"
#include "two_distribution_row.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;  // the at::vec helpers of vec_utils.h

// Work per parallel task, in logits of one input.
constexpr int64_t kGrainElements = 32768;

// One model's logit transform z = cap·tanh(scale·x/cap) (Gemma's soft-capping, a logit scale),
// −inf kept −inf, and its slope dz/dx = scale·(1 − tanh²) (scale alone at −inf).
template <typename acc_t>
struct LogitTransform {
  using V = Vec<acc_t>;
  bool has_scale = false, has_cap = false;
  acc_t scale = 1, cap = 1;

  bool active() const { return has_scale || has_cap; }
  V apply(V x) const {
    if (has_scale) x = x * V(scale);
    if (has_cap) x = V::blendv(V(cap) * (x / V(cap)).tanh(), x, x == V(neg_inf<acc_t>()));
    return x;
  }
  V slope(const V& z) const {
    V s(1);
    if (has_cap) {
      const V t = z / V(cap);
      s = V::blendv((V(1) - t) * (V(1) + t), V(1), z == V(neg_inf<acc_t>()));
    }
    if (has_scale) s = s * V(scale);
    return s;
  }
};

template <typename acc_t>
struct Setup {
  Kind kind;
  acc_t beta, inv_t;
  acc_t log_beta, log_one_minus_beta;  // the mixtures' weights in log space (their tiny lanes), once per call
  acc_t factor;  // T² with scale_by_t2, else 1
  acc_t scale;   // grad_scale·factor/T: ∂(grad_scale·factor·D)/∂z = scale·T·∂D/∂z
  LogitTransform<acc_t> student, teacher;
};

// One thread's scratch, reused row after row.
template <typename acc_t>
struct Scratch {
  row::ExpCache<acc_t> cache;
  std::vector<acc_t> zs, zt;  // transformed rows (padded to whole vectors)
  std::vector<acc_t> g, h;    // the mixtures' bucket gradients
  std::vector<acc_t> factors;  // the mixtures' per-block probability factors
};

// A row's inputs as the passes read them (raw logits, or the scratch's transformed rows) and the
// transformed rows the slopes come from (nullptr: no transform on that side).
template <typename acc_t, typename in_t>
struct RowInputs {
  const in_t* s;
  const in_t* t;
  const acc_t* zs;
  const acc_t* zt;
};

template <typename acc_t>
inline Vec<acc_t> slope_at(const LogitTransform<acc_t>& tr, const acc_t* z, int64_t c) {
  return z == nullptr ? Vec<acc_t>(1) : tr.slope(Vec<acc_t>::loadu(z + c));
}

// The KL policy with each side's gradient times its transform's slope.
template <typename acc_t>
struct SlopedKlPolicy : row::KlPolicy<acc_t> {
  using V = Vec<acc_t>;
  using Base = row::KlPolicy<acc_t>;
  const LogitTransform<acc_t>* ta = nullptr;
  const LogitTransform<acc_t>* tb = nullptr;
  const acc_t* za = nullptr;  // side a's transformed row, nullptr = untransformed
  const acc_t* zb = nullptr;

  struct StudentGrad {
    typename Base::StudentGrad inner;
    const SlopedKlPolicy* self;
    V operator()(const V& ea, const V& eb, int64_t c) const {
      const V g = inner(ea, eb, c);
      return self->za == nullptr ? g : g * self->ta->slope(V::loadu(self->za + c));
    }
  };
  StudentGrad student_grad_block(acc_t fa, acc_t fb) const { return {Base::student_grad_block(fa, fb), this}; }
  void grads(const V& log_pa, const V& log_pb, int64_t c, V* g_a, V* g_b) const {
    Base::grads(log_pa, log_pb, c, g_a, g_b);
    if (g_a != nullptr && za != nullptr) *g_a = *g_a * slope_at(*ta, za, c);
    if (g_b != nullptr && zb != nullptr) *g_b = *g_b * slope_at(*tb, zb, c);
  }
};

// Pass 1 of the mixtures: the two softmaxes only.
template <typename acc_t>
struct SoftmaxPolicy {
  using V = Vec<acc_t>;
  static constexpr int kTerms = 1;
  V accumulate(V*, const V&, const V&, const V&, const V& eb, int64_t) const { return eb; }
  static void rescale(V*, const row::Rescale<acc_t>&, const V&) {}
};

struct RowResult {
  bool counted;  // the teacher has a distribution (a NaN one counts)
  double loss;   // factor·D
};

// grad_b = scale·p_b·(log p_b − log p_a − KL) (times side b's slope) of a finite row, with p_b
// from pass 1's exponentials and log p_b − log p_a from the logits (L2-resident): no exponential,
// where row::grads_from_logits evaluates p_b again (the reverse KL's student gradient was 1.3×
// kd_loss's time with it). The same formula and selects as KlPolicy::grads.
template <typename acc_t, typename in_t, typename out_t, int kTerms>
void b_grad_from_cache(const SlopedKlPolicy<acc_t>& policy, const in_t* a, const in_t* b, out_t* gb, int64_t C,
                       acc_t inv_t, const row::RowStats<acc_t, kTerms>& st, const row::ExpCache<acc_t>& cache) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V vinv(inv_t), vscale(policy.scale), vkl(policy.kl);
  // log p_b − log p_a = (b − shift_b)/T − (a − shift_a)/T + (log Z_a − log Z_b)
  const V vsa(st.shift_a), vsb(st.shift_b), voffset(st.log_za - st.log_zb);
  const acc_t* eb = cache.eb.data();
  auto grad = [&](const V& av, const V& bv, const V& pb, int64_t c) {
    const V diff = (bv - vsb) * vinv - (av - vsa) * vinv + voffset;
    V g = where_nonzero(pb, vscale * pb * (diff - vkl));
    if (policy.zb != nullptr) g = g * slope_at(*policy.tb, policy.zb, c);
    return g;
  };
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += row::kRowBlock, ++k) {
    const int64_t c1 = std::min(C, c0 + row::kRowBlock);
    const int64_t cv = c0 + (c1 - c0) / L * L;
    const V fb(row::probability_factors(cache, k, st, inv_t)[1]);
    for (int64_t c = c0; c < cv; c += L) {
      store_vec(grad(load_vec<acc_t>(a + c), load_vec<acc_t>(b + c), V::loadu(eb + c) * fb, c), gb + c);
    }
    if (cv < c1) {
      const int64_t n = c1 - cv;
      const V g = grad(load_vec_n<acc_t>(a + cv, n), load_vec_n<acc_t>(b + cv, n), V::loadu(eb + cv, n) * fb, cv);
      store_vec_n(g, gb + cv, n);
    }
  }
}

// KL(b ‖ a) with (a, b) = (student, teacher) for the forward KL, (teacher, student) for the reverse.
template <typename acc_t, typename in_t, typename out_t>
RowResult kl_row(const Setup<acc_t>& su, const RowInputs<acc_t, in_t>& in, out_t* gs, out_t* gt, int64_t C,
                 Scratch<acc_t>& scratch) {
  const bool reverse = su.kind == kReverseKl;
  SlopedKlPolicy<acc_t> policy;
  policy.scale = su.scale;
  policy.ta = reverse ? &su.teacher : &su.student;
  policy.tb = reverse ? &su.student : &su.teacher;
  policy.za = reverse ? in.zt : in.zs;
  policy.zb = reverse ? in.zs : in.zt;
  const in_t* a = reverse ? in.t : in.s;
  const in_t* b = reverse ? in.s : in.t;
  out_t* ga = reverse ? gt : gs;
  out_t* gb = reverse ? gs : gt;
  // Side a's gradient alone is a rescale of pass 1's exponentials (kd_loss's student gradient);
  // side b's alone (the reverse KL's student) takes p_b from them too (b_grad_from_cache).
  const bool reuse = ga != nullptr && gb == nullptr;
  const bool reuse_b = gb != nullptr && ga == nullptr;
  const auto st = row::walk_row(policy, a, b, C, su.inv_t, reuse || reuse_b ? &scratch.cache : nullptr);
  const acc_t teacher_max = reverse ? st.max_a : st.max_b;
  if (teacher_max == neg_inf<acc_t>()) return {false, 0.0};
  // No special case for a side that is −inf everywhere: the reference's log-softmax is NaN there,
  // and so is this (W/Z_b − log Z_b + log 0 with W = +inf). NaN/+inf logits: the walker's NaN log Z.
  policy.kl = st.terms[0] / st.z_b - st.log_zb + st.log_za;
  if (reuse && st.finite()) {
    row::student_grad_from_cache(policy, ga, C, su.inv_t, st, scratch.cache);
  } else if (reuse_b && st.finite()) {
    b_grad_from_cache(policy, a, b, gb, C, su.inv_t, st, scratch.cache);
  } else if (ga != nullptr || gb != nullptr) {
    row::grads_from_logits(policy, a, b, ga, gb, C, su.inv_t, st);
  }
  return {true, static_cast<double>(su.factor * policy.kl)};
}

// log m of a mixture m = w_x·x + w_y·y of the probabilities x = e^{lx}, y = e^{ly}: log(m) where m
// is a normal number, else in log space, log(w_x e^{lx} + w_y e^{ly}). The sum underflows (to 0
// even: half the smallest subnormal rounds to 0) where x and y are tiny but not 0, and there log m
// would be −inf and a term x·(lx − log m) infinite. `tiny` marks the lanes taken in log space.
// Whether some lane of m is below the smallest normal number (0 included; NaN is not).
template <typename acc_t>
inline bool any_below_normal(const Vec<acc_t>& m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(m, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ) != 0;
  }
#endif
  const Vec<acc_t> tiny = m < Vec<acc_t>(std::numeric_limits<acc_t>::min());
  return tiny.zero_mask() != (1 << Vec<acc_t>::size()) - 1;
}

template <typename acc_t>
struct LogMixture {
  using V = Vec<acc_t>;
  V lm, tiny;
  bool any_tiny;
  // log_wx, log_wy: log w_x, log w_y, precomputed: a call to logf in this loop would make the
  // compiler keep every vector of the loop on the stack around it.
  LogMixture(const V& m, acc_t log_wx, const V& lx, acc_t log_wy, const V& ly) {
    lm = log_of_normal(m);  // wrong only in the tiny lanes, which are replaced below
    any_tiny = any_below_normal(m);
    if (!any_tiny) return;  // the common case: one compare
    tiny = m < V(std::numeric_limits<acc_t>::min());
    const V a = lx + V(log_wx), b = ly + V(log_wy);  // log 0 = −inf: that side has no weight
    const V hi = at::vec::maximum(a, b), lo = at::vec::minimum(a, b);
    V in_log_space = hi + fast_log(V(1) + fast_exp(lo - hi));
    in_log_space = V::blendv(in_log_space, hi, hi == V(neg_inf<acc_t>()));  // both −inf: −inf, not NaN
    lm = V::blendv(lm, in_log_space, tiny);
  }
  // x/m, from e^{lx − log m} where m is tiny (x/m itself may be x/0 there).
  V ratio(const V& x, const V& m, const V& lx) const {
    const V r = x / m;
    return any_tiny ? V::blendv(r, fast_exp(lx - lm), tiny) : r;
  }
};

// The mixtures' per-class terms: (term, g = ∂D/∂u, h = ∂D/∂v), the Triton kernel's _bucket_terms.
// Terms of a class where the distribution in front is 0 are selected away (never 0·log 0).
template <int kKind, typename acc_t>
inline void bucket_terms(const Vec<acc_t>& u, const Vec<acc_t>& v, const Vec<acc_t>& p, const Vec<acc_t>& q,
                         const Setup<acc_t>& su, Vec<acc_t>& term, Vec<acc_t>& g, Vec<acc_t>& h) {
  using V = Vec<acc_t>;
  const acc_t beta = su.beta;
  const V zero(0), vb(beta), vb1(acc_t(1) - beta);
  if constexpr (kKind == kJsd) {
    const V lm = LogMixture<acc_t>(vb * q + vb1 * p, su.log_beta, v, su.log_one_minus_beta, u).lm;
    g = vb1 * where_nonzero(p, p * (u - lm));
    h = vb * where_nonzero(q, q * (v - lm));
    term = g + h;  // the mixture's own terms cancel: D = Σ (g + h)
  } else if constexpr (kKind == kSkewForwardKl || kKind == kSkewReverseKl) {
    // KL(x ‖ β x + (1−β) y): x = q, y = p for the forward skew, the other way round for the reverse.
    const bool fwd = kKind == kSkewForwardKl;
    const V& x = fwd ? q : p;
    const V& lx = fwd ? v : u;
    const V& y = fwd ? p : q;
    const V& ly = fwd ? u : v;
    const V m = vb * x + vb1 * y;
    const LogMixture<acc_t> mix(m, su.log_beta, lx, su.log_one_minus_beta, ly);
    const V& lm = mix.lm;
    const V x_over_m = mix.ratio(x, m, lx);  // one division for both derivatives
    const V log_ratio = lx - lm;
    term = where_nonzero(x, x * log_ratio);
    const V d_x = where_nonzero(x, x * (log_ratio + V(1) - vb * x_over_m));
    // x = 0: x/m = 0 (and m = 0 only there, or where a tiny m was taken in log space).
    const V d_y = where_nonzero(x, V(beta - acc_t(1)) * y * x_over_m);
    g = fwd ? d_y : d_x;
    h = fwd ? d_x : d_y;
  } else {
    static_assert(kKind == kTvd, "bucket_terms: a mixture kind");
    term = V(0.5) * (q - p).abs();
    V sign = V::blendv(V::blendv(zero, V(-1), p < q), V(1), p > q);
    sign = V::blendv(sign, p, p != p);  // NaN compares false: keep it (p − q is NaN there)
    sign = V::blendv(sign, q, q != q);
    g = V(0.5) * p * sign;
    h = V(-0.5) * q * sign;
  }
}

// What passes 2 and 3 of a mixture row read, by value. Each pass is a function of its own, with a
// local copy of the Setup (a store into a float gradient row may alias any float the compiler
// reaches through a pointer), and its loop over whole vectors is separate from the block's tail (no
// per-vector lane count: no masked loads and stores, no padding selects). Against the passes as
// capturing lambdas of mixture_row with a lane count per vector, this took the JSD's fwd+bwd at
// 512 × 32000 fp32 from 1.31–1.34× kd_loss's time to 1.14–1.16× (interleaved runs, AVX-512).
template <typename acc_t, typename in_t>
struct MixtureSweep {
  const in_t* s;
  const in_t* t;
  const acc_t* ea;       // pass 1's exponentials (finite rows)
  const acc_t* eb;
  const acc_t* factors;  // per block of row::kRowBlock classes: the factors that make ea, eb p and q
  int64_t C;
  acc_t inv_t, shift_a, shift_b, log_za, log_zb;
};

// (u, v, p, q) of the n classes at c of a block whose factors are fa, fb: u = log p, v = log q;
// n = L, or n < L at a block's tail (the rest of the lanes −inf logits). p, q from the cached
// exponentials (kFromCache: finite rows) or as exp(u), exp(v) (NaN propagates).
template <bool kFromCache, bool kFull, typename acc_t, typename in_t>
inline void sweep_point(const MixtureSweep<acc_t, in_t>& row, int64_t c, int64_t n, const Vec<acc_t>& fa,
                        const Vec<acc_t>& fb, Vec<acc_t>& u, Vec<acc_t>& v, Vec<acc_t>& p, Vec<acc_t>& q) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  constexpr acc_t ninf = neg_inf<acc_t>();
  const V sv = kFull ? load_vec<acc_t>(row.s + c) : load_vec_n<acc_t>(row.s + c, n, ninf);
  const V tv = kFull ? load_vec<acc_t>(row.t + c) : load_vec_n<acc_t>(row.t + c, n, ninf);
  u = (sv - V(row.shift_a)) * V(row.inv_t) - V(row.log_za);
  v = (tv - V(row.shift_b)) * V(row.inv_t) - V(row.log_zb);
  if constexpr (kFromCache) {
    p = V::loadu(row.ea + c, kFull ? L : n) * fa;
    q = V::loadu(row.eb + c, kFull ? L : n) * fb;
  } else {
    p = u.exp();
    q = v.exp();
  }
}

// Calls step(c, n, fa, fb, full) for the vectors of a row, block by block: `full` std::true_type for
// whole vectors (n = L), std::false_type for a block's tail; fa, fb the block's probability factors.
template <bool kFromCache, typename acc_t, typename in_t, typename Step>
inline void for_each_vector(const MixtureSweep<acc_t, in_t>& row, Step&& step) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  for (int64_t c0 = 0, k = 0; c0 < row.C; c0 += row::kRowBlock, ++k) {
    const int64_t c1 = std::min(row.C, c0 + row::kRowBlock);
    const V fa(kFromCache ? row.factors[2 * k] : acc_t(0)), fb(kFromCache ? row.factors[2 * k + 1] : acc_t(0));
    int64_t c = c0;
    for (; c + L <= c1; c += L) step(c, L, fa, fb, std::true_type{});
    if (c < c1) step(c, c1 - c, fa, fb, std::false_type{});
  }
}

// Pass 2: the terms and bucket gradients g, h (into G, H where not null); returns Σ term, Σ g, Σ h.
template <int kKind, bool kFromCache, typename acc_t, typename in_t>
std::array<acc_t, 3> mixture_pass2(const Setup<acc_t>& setup, const MixtureSweep<acc_t, in_t>& row, acc_t* G, acc_t* H) {
  using V = Vec<acc_t>;
  const Setup<acc_t> su = setup;  // a copy no store can alias
  V sum_term(0), sum_g(0), sum_h(0);
  for_each_vector<kFromCache>(row, [&](int64_t c, int64_t n, const V& fa, const V& fb, auto full) {
    constexpr bool kFull = decltype(full)::value;
    V u, v, p, q, term, g, h;
    sweep_point<kFromCache, kFull>(row, c, n, fa, fb, u, v, p, q);
    bucket_terms<kKind>(u, v, p, q, su, term, g, h);
    if constexpr (!kFull) {  // padding lanes: never summed
      term = V::set(V(0), term, n);
      g = V::set(V(0), g, n);
      h = V::set(V(0), h, n);
    }
    sum_term = sum_term + term;
    sum_g = sum_g + g;
    sum_h = sum_h + h;
    if (G != nullptr) kFull ? g.store(G + c) : g.store(G + c, n);
    if (H != nullptr) kFull ? h.store(H + c) : h.store(H + c, n);
  });
  return {hsum(sum_term), hsum(sum_g), hsum(sum_h)};
}

// Pass 3: ∂D/∂z_s = (g − p Σg)·scale (times the transform's slope: kSloped) into gs, and the teacher's
// likewise into gt (either may be null). G, H: pass 2's bucket gradients (they may be gs, gt).
template <bool kFromCache, bool kSloped, typename acc_t, typename in_t, typename out_t>
void mixture_pass3(const Setup<acc_t>& setup, const MixtureSweep<acc_t, in_t>& row, const acc_t* zs, const acc_t* zt,
                   const acc_t* G, const acc_t* H, acc_t total_g, acc_t total_h, out_t* gs, out_t* gt) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const Setup<acc_t> su = setup;
  const V vscale(su.scale), vg(total_g), vh(total_h);
  for_each_vector<kFromCache>(row, [&](int64_t c, int64_t n, const V& fa, const V& fb, auto full) {
    constexpr bool kFull = decltype(full)::value;
    V u, v, p, q;  // u and v unused here: the compiler drops them, loads included
    sweep_point<kFromCache, kFull>(row, c, n, fa, fb, u, v, p, q);
    if (gs != nullptr) {
      V d = (V::loadu(G + c, kFull ? L : n) - p * vg) * vscale;
      if constexpr (kSloped) d = d * slope_at(su.student, zs, c);
      kFull ? store_vec(d, gs + c) : store_vec_n(d, gs + c, n);
    }
    if (gt != nullptr) {
      V d = (V::loadu(H + c, kFull ? L : n) - q * vh) * vscale;
      if constexpr (kSloped) d = d * slope_at(su.teacher, zt, c);
      kFull ? store_vec(d, gt + c) : store_vec_n(d, gt + c, n);
    }
  });
}

// The mixtures: pass 1 caches the exponentials, pass 2 the terms and bucket gradients, pass 3 the
// logit gradients. p and q come from the cache (finite rows) or from exp(u), exp(v) (the rest:
// NaN propagates).
template <int kKind, typename acc_t, typename in_t, typename out_t>
RowResult mixture_row(const Setup<acc_t>& su, const RowInputs<acc_t, in_t>& in, out_t* gs, out_t* gt, int64_t C,
                      Scratch<acc_t>& scratch) {
  const auto st = row::walk_row(SoftmaxPolicy<acc_t>{}, in.s, in.t, C, su.inv_t, &scratch.cache);
  if (st.max_b == neg_inf<acc_t>()) return {false, 0.0};
  const bool finite = st.finite();
  if (finite) {
    const int64_t blocks = (C + row::kRowBlock - 1) / row::kRowBlock;
    scratch.factors.resize(2 * blocks);
    for (int64_t k = 0; k < blocks; ++k) {
      const auto f = row::probability_factors(scratch.cache, k, st, su.inv_t);
      scratch.factors[2 * k] = f[0];
      scratch.factors[2 * k + 1] = f[1];
    }
  }
  const MixtureSweep<acc_t, in_t> row{in.s, in.t, scratch.cache.ea.data(), scratch.cache.eb.data(),
                                      scratch.factors.data(), C, su.inv_t, st.shift_a, st.shift_b, st.log_za, st.log_zb};
  // The bucket gradients wait for pass 3 in the gradient rows themselves when those hold acc_t
  // (pass 3 then updates them in place: a smaller working set), else in the scratch.
  acc_t* G = gs == nullptr ? nullptr : scratch.g.data();
  acc_t* H = gt == nullptr ? nullptr : scratch.h.data();
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (gs != nullptr) G = gs;
    if (gt != nullptr) H = gt;
  }
  const std::array<acc_t, 3> sums = finite ? mixture_pass2<kKind, true>(su, row, G, H)
                                           : mixture_pass2<kKind, false>(su, row, G, H);
  if (gs != nullptr || gt != nullptr) {
    const bool sloped = in.zs != nullptr || in.zt != nullptr;  // a transform on either side
    auto pass3 = [&](auto from_cache, auto with_slope) {
      mixture_pass3<decltype(from_cache)::value, decltype(with_slope)::value>(su, row, in.zs, in.zt, G, H, sums[1],
                                                                              sums[2], gs, gt);
    };
    if (finite) {
      sloped ? pass3(std::true_type{}, std::true_type{}) : pass3(std::true_type{}, std::false_type{});
    } else {
      sloped ? pass3(std::false_type{}, std::true_type{}) : pass3(std::false_type{}, std::false_type{});
    }
  }
  return {true, static_cast<double>(su.factor * sums[0])};
}

// KL(x ‖ x) of the skews at β = 1: 0, NaN where the reference side's row is NaN (a NaN or +inf
// logit); the gradients 0 (NaN on that side likewise). The other model is not used at all.
template <typename acc_t, typename in_t, typename out_t>
RowResult zero_row(const Setup<acc_t>& su, const RowInputs<acc_t, in_t>& in, out_t* gs, out_t* gt, int64_t C,
                   Scratch<acc_t>&) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  acc_t ms = ninf, mt = ninf;
  for (int64_t c = 0; c < C; ++c) {
    ms = cpu::nan_max(ms, static_cast<acc_t>(in.s[c]));
    mt = cpu::nan_max(mt, static_cast<acc_t>(in.t[c]));
  }
  if (mt == ninf) return {false, 0.0};
  const bool teacher_side = su.kind == kZeroTeacherReference;
  const acc_t m = teacher_side ? mt : ms;
  // A student reference side that is −inf everywhere has no distribution: the reference's
  // log-softmax of it is NaN, and so is the row (a teacher like that is not counted, above).
  const bool nan_row = m != m || m == std::numeric_limits<acc_t>::infinity() || (!teacher_side && m == ninf);
  const acc_t value = nan_row ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
  for (int64_t c = 0; c < C; ++c) {
    if (gs != nullptr) gs[c] = static_cast<out_t>(teacher_side ? acc_t(0) : value);
    if (gt != nullptr) gt[c] = static_cast<out_t>(teacher_side ? value : acc_t(0));
  }
  return {true, static_cast<double>(value)};
}

template <typename acc_t, typename in_t, typename out_t>
RowResult divergence_row(const Setup<acc_t>& su, const RowInputs<acc_t, in_t>& in, out_t* gs, out_t* gt, int64_t C,
                         Scratch<acc_t>& scratch) {
  switch (su.kind) {
    case kForwardKl:
    case kReverseKl:
      return kl_row(su, in, gs, gt, C, scratch);
    case kJsd:
      return mixture_row<kJsd>(su, in, gs, gt, C, scratch);
    case kSkewForwardKl:
      return mixture_row<kSkewForwardKl>(su, in, gs, gt, C, scratch);
    case kSkewReverseKl:
      return mixture_row<kSkewReverseKl>(su, in, gs, gt, C, scratch);
    case kTvd:
      return mixture_row<kTvd>(su, in, gs, gt, C, scratch);
    default:
      return zero_row(su, in, gs, gt, C, scratch);
  }
}

// Writes `raw`'s C logits, transformed, into `out` (padded with −inf to whole vectors).
template <typename acc_t, typename in_t>
void transform_row(const LogitTransform<acc_t>& tr, const in_t* raw, acc_t* out, int64_t C) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  for (int64_t c = 0; c < C; c += L) {
    const int64_t n = std::min(L, C - c);
    const V x = n == L ? load_vec<acc_t>(raw + c) : load_vec_n<acc_t>(raw + c, n, neg_inf<acc_t>());
    tr.apply(x).store(out + c);
  }
}

// (outer, classes, inner) tensors with class stride 1 and one dtype.
template <typename scalar_t, typename acc_t = cpu::acc_type_t<scalar_t, scalar_t>>
void divergence_rows_impl(const Setup<acc_t>& su, const at::Tensor& s, const at::Tensor& t, const bool* mask,
                          at::Tensor& loss, at::Tensor* gs_t, at::Tensor* gt_t) {
  constexpr int64_t L = Vec<acc_t>::size();
  const int64_t O = s.size(0), C = s.size(1), I = s.size(2);
  const int64_t padded = (C + L - 1) / L * L;
  const scalar_t* S = s.const_data_ptr<scalar_t>();
  const scalar_t* T = t.const_data_ptr<scalar_t>();
  scalar_t* GS = gs_t != nullptr ? gs_t->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* GT = gt_t != nullptr ? gt_t->mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  const bool mixture = su.kind == kJsd || su.kind == kSkewForwardKl || su.kind == kSkewReverseKl || su.kind == kTvd;
  const bool transformed = su.student.active() || su.teacher.active();

  at::parallel_for(0, O * I, std::max<int64_t>(1, kGrainElements / C), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    scratch.cache.resize(C);
    if (transformed) {
      scratch.zs.resize(padded);
      scratch.zt.resize(padded);
    }
    if (!std::is_same_v<scalar_t, acc_t> && mixture && GS != nullptr) scratch.g.resize(C);
    if (!std::is_same_v<scalar_t, acc_t> && mixture && GT != nullptr) scratch.h.resize(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / I, i = r % I;
      const scalar_t* s_row = S + o * s.stride(0) + i * s.stride(2);
      const scalar_t* t_row = T + o * t.stride(0) + i * t.stride(2);
      scalar_t* gs = GS != nullptr ? GS + o * gs_t->stride(0) + i * gs_t->stride(2) : nullptr;
      scalar_t* gt = GT != nullptr ? GT + o * gt_t->stride(0) + i * gt_t->stride(2) : nullptr;
      RowResult result{false, 0.0};
      if (mask == nullptr || mask[r]) {
        if (transformed) {
          // Both sides read as acc_t: one instantiation of the passes per dtype, not three.
          transform_row(su.student, s_row, scratch.zs.data(), C);
          transform_row(su.teacher, t_row, scratch.zt.data(), C);
          const RowInputs<acc_t, acc_t> in{scratch.zs.data(), scratch.zt.data(),
                                           su.student.active() ? scratch.zs.data() : nullptr,
                                           su.teacher.active() ? scratch.zt.data() : nullptr};
          result = divergence_row(su, in, gs, gt, C, scratch);
        } else {
          result = divergence_row(su, RowInputs<acc_t, scalar_t>{s_row, t_row, nullptr, nullptr}, gs, gt, C, scratch);
        }
      }
      out[r] = result.counted ? static_cast<acc_t>(result.loss) : acc_t(0);
      if (!result.counted) {
        if (gs != nullptr) std::fill(gs, gs + C, scalar_t(0));
        if (gt != nullptr) std::fill(gt, gt + C, scalar_t(0));
      }
    }
  });
}

template <typename acc_t>
Setup<acc_t> setup_of(Kind kind, double beta, double temperature, bool scale_by_t2,
                      const c10::optional<double>& s_cap, const c10::optional<double>& t_cap,
                      const c10::optional<double>& s_scale, const c10::optional<double>& t_scale, double grad_scale) {
  Setup<acc_t> su;
  su.kind = kind;
  su.beta = static_cast<acc_t>(beta);
  su.log_beta = std::log(su.beta);  // −inf at β = 0: that side of the mixture has no weight
  su.log_one_minus_beta = std::log(acc_t(1) - su.beta);
  su.inv_t = static_cast<acc_t>(1.0 / temperature);
  const double factor = scale_by_t2 ? temperature * temperature : 1.0;
  su.factor = static_cast<acc_t>(factor);
  su.scale = static_cast<acc_t>(grad_scale * factor / temperature);
  auto transform = [](const c10::optional<double>& cap, const c10::optional<double>& scale) {
    LogitTransform<acc_t> tr;
    tr.has_cap = cap.has_value();
    tr.has_scale = scale.has_value();
    tr.cap = static_cast<acc_t>(cap.value_or(1.0));
    tr.scale = static_cast<acc_t>(scale.value_or(1.0));
    return tr;
  };
  su.student = transform(s_cap, s_scale);
  su.teacher = transform(t_cap, t_scale);
  return su;
}

// Classes contiguous (a stride along a dimension of size 1 never matters): the rows layout.
bool class_rows(const at::Tensor& x) { return x.size(1) == 1 || x.stride(1) == 1; }

// `x` as an (outer, classes, inner) tensor of `dtype` with class stride 1 (a copy unless it is one).
at::Tensor as_rows(const at::Tensor& x, at::ScalarType dtype) {
  const at::Tensor y = x.scalar_type() == dtype ? x : x.to(dtype);
  return class_rows(y) ? y : y.transpose(1, 2).contiguous().transpose(1, 2);
}

}  // namespace

TensorTriple divergence_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                 const c10::optional<at::Tensor>& mask, c10::string_view divergence, double beta,
                                 double temperature, bool scale_by_t2, c10::optional<double> student_softcap,
                                 c10::optional<double> teacher_softcap, c10::optional<double> student_logit_scale,
                                 c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
                                 bool student_grad, bool teacher_grad) {
  cpu::check_row_op_inputs("divergence_rows", student, teacher, temperature, grad_scale);
  const Kind kind = kind_of("divergence_rows", divergence, beta);
  at::Tensor mask_c;
  const bool* mask_p = cpu::row_op_mask("divergence_rows", mask, student.size(0), student.size(2), mask_c);
  cpu::RowOpOutputs out = cpu::row_op_outputs(student, teacher, student_grad, teacher_grad);
  at::Tensor &loss = out.loss, &grad_student = out.grad_student, &grad_teacher = out.grad_teacher;
  if (out.done) return {loss, grad_student, grad_teacher};
  const at::ScalarType common = c10::promoteTypes(student.scalar_type(), teacher.scalar_type());
  const at::Tensor s = as_rows(student, common);
  const at::Tensor t = as_rows(teacher, common);
  // The gradients go straight into the returned buffers when those are rows of the common dtype.
  auto work_buffer = [&](const at::Tensor& grad, const at::Tensor& rows, bool wanted) {
    if (!wanted) return grad;
    const bool direct = grad.scalar_type() == common && class_rows(grad);
    return direct ? grad : cpu::gradient_buffer(rows, true);
  };
  at::Tensor gs_work = work_buffer(grad_student, s, student_grad);
  at::Tensor gt_work = work_buffer(grad_teacher, t, teacher_grad);
  const double gscale = grad_scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, common, "divergence_rows_cpu", [&] {
    using acc_t = cpu::acc_type_t<scalar_t, scalar_t>;
    const Setup<acc_t> su = setup_of<acc_t>(kind, beta, temperature, scale_by_t2, student_softcap, teacher_softcap,
                                            student_logit_scale, teacher_logit_scale, gscale);
    divergence_rows_impl<scalar_t>(su, s, t, mask_p, loss, student_grad ? &gs_work : nullptr,
                                   teacher_grad ? &gt_work : nullptr);
  });
  if (student_grad && !gs_work.is_same(grad_student)) grad_student.copy_(gs_work);
  if (teacher_grad && !gt_work.is_same(grad_teacher)) grad_teacher.copy_(gt_work);
  return {loss, grad_student, grad_teacher};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(divergence_rows_cpu);
