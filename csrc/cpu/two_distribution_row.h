// The two-distribution online-softmax row walker shared by the CPU softmax losses (kd_loss,
// weighted_soft_ce): one row of classes, contiguous (class stride 1), of student logits s and
// teacher logits t, with p_s = softmax(s/T), p_t = softmax(t/T).
//
// Pass 1 (`walk_row`) reads each logit once, block by block (kRowBlock classes of both inputs stay
// in L1): the block's maxima of the raw logits update the running maxima (m_s, m_t), the running
// sums are moved onto the new maxima, and one sweep over the block computes, per class,
//   x_a = (s − m_s)/T,  x_b = (t − m_t)/T,  e_a = e^{x_a},  e_b = e^{x_b}
// and accumulates Z_a = Σ e_a, Z_b = Σ e_b and the loss policy's cross terms (e.g. Σ e_b (x_b − x_a)).
// The shift is taken before the scaling, (s − m_s)·(1/T): every x is ≤ 0 and the maximum's is
// exactly 0, so no exponential overflows for any finite logits, and V = 1 gives exactly 0.
// Maxima propagate NaN; fast_exp need not (exp_u20 clamps), so a NaN or +inf maximum is made
// explicit in `RowStats` (its log-normalisers are NaN: every gradient recomputed from them is NaN).
// On AVX-512 in float the block maxima are a plain VMAXPS, which may drop a NaN (cpu::running_max);
// there fast_exp keeps NaN, so a NaN logit makes its sum NaN, and the row's maximum is set to NaN
// from the sum.
//
// Each e_a, e_b is evaluated once: with an `ExpCache`, pass 1 stores e_a and the policy's teacher
// value (e_b, or a per-class multiple of it such as w·e_b; shifted by the running maxima of their
// block) in a per-thread scratch of 2·C values that stays in L2, and the student-gradient pass
// (`student_grad_from_cache`) only rescales them, block by block, by e^{(m_k − m)/T}/Z. So the
// whole fwd+bwd reads each input once and writes the gradient once. A teacher gradient needs
// log p_s and log p_t of every class: `grads_from_logits` re-reads the logits (also the path for
// rows whose maxima or normalisers are not finite).
//
// A loss is a policy struct (see kd_loss.cpp's KlPolicy, weighted_soft_ce.cpp's WeightedCePolicy):
//   static constexpr int kTerms;      number of cross-term accumulators
//   Vec accumulate(Vec* terms, xa, xb, ea, eb, c) const;      add class vector c's cross terms and
//                                      return what the cache keeps of the teacher: e_b times a
//                                      factor of the class only (so the block rescale applies)
//   static void rescale(Vec* terms, const Rescale& r, const Vec& z_b_before);
//                                      the maxima moved: x_a += r.da, x_b += r.db, e_a *= r.fa,
//                                      e_b *= r.fb (r.zero_b: e_b underflowed to 0)
//   auto student_grad_block(fa, fb) const;   a functor (ea, cb, c) -> grad_s of one class vector,
//                                      with p_s = ea·fa, p_t = (cb's e_b)·fb in this block
//   void grads(log_p_s, log_p_t, c, Vec* g_s, Vec* g_t) const;   gradients from log-probabilities
// The losses' scalar results (the loss, S = Σ w p_t, ...) are computed by the policy's owner from
// the `RowStats` and the summed terms; the walker knows nothing of them.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace row {

using cpu::fast_exp;
using cpu::hmax;
using cpu::hsum;
using cpu::load_vec;
using cpu::load_vec_n;
using cpu::nan_max;
using cpu::neg_inf;
using cpu::store_vec;
using cpu::store_vec_n;
using cpu::Vec;

constexpr int64_t kRowBlock = 2048;  // classes per block: 2 inputs x 8 KiB in fp32 stay in L1

// Online-softmax rescale when the maxima grow (or turn NaN): new safe shifts and the factors that
// move the running sums onto them. A sum whose old maximum was -inf is empty (0) and is left alone.
// Shifts are raw logits; their differences are scaled by 1/T like the terms.
template <typename acc_t>
struct Rescale {
  acc_t new_sa, new_sb;
  acc_t da, db;   // (old shift − new shift)/T: what every x_a, x_b of the old blocks gains
  acc_t fa, fb;   // multiply Z_a by fa, Z_b by fb (1 where the old max was -inf: sums are 0)
  acc_t delta;    // db − da, 0 where the teacher's old max was -inf (no teacher terms yet)
  bool zero_b;    // fb underflowed: the teacher's old terms are 0
};

template <typename acc_t>
inline Rescale<acc_t> rescale(acc_t ma, acc_t mb, acc_t sa, acc_t sb, acc_t nma, acc_t nmb, acc_t inv_t) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  Rescale<acc_t> r;
  r.new_sa = nma == ninf ? acc_t(0) : nma;
  r.new_sb = nmb == ninf ? acc_t(0) : nmb;
  r.da = (sa - r.new_sa) * inv_t;
  r.db = (sb - r.new_sb) * inv_t;
  r.fa = ma == ninf ? acc_t(1) : std::exp(r.da);
  r.fb = mb == ninf ? acc_t(1) : std::exp(r.db);
  r.delta = mb == ninf ? acc_t(0) : r.db - r.da;
  r.zero_b = r.fb == acc_t(0);
  return r;
}

// A row after pass 1.
template <typename acc_t, int kTerms>
struct RowStats {
  acc_t max_a, max_b;      // raw maxima (NaN-propagating)
  acc_t shift_a, shift_b;  // the maxima, 0 where a maximum is -inf
  acc_t z_a, z_b;          // Σ e^{(s − shift_a)/T}, Σ e^{(t − shift_b)/T}
  acc_t log_za, log_zb;    // NaN when a maximum is NaN or +inf
  std::array<acc_t, kTerms> terms;  // the policy's cross terms, summed
  bool has_dist() const { return !(max_b == neg_inf<acc_t>()); }  // some teacher logit > -inf
  bool nonfinite_max() const {  // a NaN or +inf logit: the row is NaN
    return max_a != max_a || max_b != max_b || max_a == std::numeric_limits<acc_t>::infinity() ||
           max_b == std::numeric_limits<acc_t>::infinity();
  }
  // Shifts and normalisers finite: the cached exponentials give the gradient.
  bool finite() const {
    return std::isfinite(shift_a) && std::isfinite(shift_b) && std::isfinite(log_za) && std::isfinite(log_zb);
  }
};

// Pass 1's exponentials, kept for the gradient pass so that each is evaluated once: e^{x_a} and
// the policy's teacher value (e^{x_b} times a factor of the class) of every class, each shifted by
// its block's running maxima, and those shifts. Scratch of one thread, reused row after row (2·C
// values: in L2 at C = 32000).
template <typename acc_t>
struct ExpCache {
  std::vector<acc_t> ea, eb;            // C each (eb: what the policy's accumulate returned)
  std::vector<acc_t> shift_a, shift_b;  // one per block
  std::vector<uint8_t> live_a, live_b;  // the block's running maximum is > -inf (else its e^x are 0)
  void resize(int64_t C) {
    const int64_t blocks = (C + kRowBlock - 1) / kRowBlock;
    ea.resize(C);
    eb.resize(C);
    shift_a.resize(blocks);
    shift_b.resize(blocks);
    live_a.resize(blocks);
    live_b.resize(blocks);
  }
};

// Pass 1 over one row of C classes at s, t (class stride 1). With a cache, stores the exponentials.
template <typename Policy, typename acc_t, typename s_t, typename t_t>
RowStats<acc_t, Policy::kTerms> walk_row(const Policy& policy, const s_t* s, const t_t* t, int64_t C, acc_t inv_t,
                                         ExpCache<acc_t>* cache) {
  using V = Vec<acc_t>;
  constexpr int kTerms = Policy::kTerms;
  constexpr int64_t L = V::size();
  constexpr acc_t ninf = neg_inf<acc_t>();
  const V vinv(inv_t);
  V za(0), zb(0);
  V terms[kTerms];
  for (int k = 0; k < kTerms; ++k) terms[k] = V(0);
  acc_t ma = ninf, mb = ninf, sa = 0, sb = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
    const int64_t c1 = std::min(C, c0 + kRowBlock);
    const int64_t cv = c0 + (c1 - c0) / L * L;
    // Block maxima of the raw logits (NaN-propagating, except where cpu::running_max may drop a
    // NaN: the row's sums carry it then, see below): the shifts are raw, scaled after.
    V bma(ninf), bmb(ninf);
    for (int64_t c = c0; c < cv; c += L) {
      bma = cpu::running_max(bma, load_vec<acc_t>(s + c));
      bmb = cpu::running_max(bmb, load_vec<acc_t>(t + c));
    }
    if (cv < c1) {
      bma = cpu::running_max(bma, load_vec_n<acc_t>(s + cv, c1 - cv, ninf));
      bmb = cpu::running_max(bmb, load_vec_n<acc_t>(t + cv, c1 - cv, ninf));
    }
    const acc_t nma = nan_max(ma, hmax(bma));
    const acc_t nmb = nan_max(mb, hmax(bmb));
    if (!(nma == ma) || !(nmb == mb)) {  // grew, or became NaN
      const Rescale<acc_t> r = rescale(ma, mb, sa, sb, nma, nmb, inv_t);
      Policy::rescale(terms, r, zb);
      za = za * V(r.fa);
      zb = r.zero_b ? V(0) : zb * V(r.fb);
      ma = nma;
      mb = nmb;
      sa = r.new_sa;
      sb = r.new_sb;
    }
    acc_t* ea_out = nullptr;
    acc_t* eb_out = nullptr;
    if (cache != nullptr) {
      const int64_t k = c0 / kRowBlock;
      cache->shift_a[k] = sa;
      cache->shift_b[k] = sb;
      cache->live_a[k] = !(ma == ninf);
      cache->live_b[k] = !(mb == ninf);
      ea_out = cache->ea.data();
      eb_out = cache->eb.data();
    }
    const V vsa(sa), vsb(sb);
    auto step = [&](const V& sv, const V& tv, int64_t c, int64_t n) {
      const V xa = (sv - vsa) * vinv;
      const V xb = (tv - vsb) * vinv;
      const V ea = fast_exp(xa);
      const V eb = fast_exp(xb);
      za = za + ea;
      zb = zb + eb;
      const V cb = policy.accumulate(terms, xa, xb, ea, eb, c);
      if (ea_out != nullptr) {
        if (n == L) {
          ea.store(ea_out + c);
          cb.store(eb_out + c);
        } else {
          ea.store(ea_out + c, n);
          cb.store(eb_out + c, n);
        }
      }
    };
    // The padding lanes of a tail load are -inf: e = 0, and the policies select them out.
    // While a block's exponentials are computed, the next block of both rows (or, past the row's
    // end, what follows it: the next row in the rows layout; a prefetch never faults) is fetched
    // into the cache: otherwise the next block's maximum loop waits for memory, with no
    // arithmetic to hide it behind (it was half the time of this function at 512 × 32000 fp32).
    for (int64_t c = c0; c < cv; c += L) {
      __builtin_prefetch(s + c + kRowBlock, 0, 3);
      __builtin_prefetch(t + c + kRowBlock, 0, 3);
      step(load_vec<acc_t>(s + c), load_vec<acc_t>(t + c), c, L);
    }
    if (cv < c1) {
      step(load_vec_n<acc_t>(s + cv, c1 - cv, ninf), load_vec_n<acc_t>(t + cv, c1 - cv, ninf), cv, c1 - cv);
    }
  }
  RowStats<acc_t, kTerms> st;
  st.max_a = ma;
  st.max_b = mb;
  st.shift_a = sa;
  st.shift_b = sb;
  st.z_a = hsum(za);
  st.z_b = hsum(zb);
  if constexpr (cpu::kRunningMaxDropsNan<acc_t>) {
    // The block maxima may have dropped a NaN logit; its e^x is NaN, and so is the sum.
    if (st.z_a != st.z_a) st.max_a = st.z_a;
    if (st.z_b != st.z_b) st.max_b = st.z_b;
  }
  st.log_za = std::log(st.z_a);
  st.log_zb = std::log(st.z_b);
  if (st.nonfinite_max()) {
    st.log_za = std::numeric_limits<acc_t>::quiet_NaN();
    st.log_zb = st.log_za;
  }
  for (int k = 0; k < kTerms; ++k) st.terms[k] = hsum(terms[k]);
  return st;
}

// The factors that turn block k's cached exponentials into probabilities (requires st.finite()):
//   p_a = e^{x_a}·fa,  fa = e^{(m_a,k − m_a)/T}/Z_a,  and fb likewise;
// 0 where the block's running maximum was -inf (its exponentials are 0).
template <typename acc_t, int kTerms>
inline std::array<acc_t, 2> probability_factors(const ExpCache<acc_t>& cache, int64_t k,
                                                const RowStats<acc_t, kTerms>& st, acc_t inv_t) {
  return {cache.live_a[k] ? std::exp((cache.shift_a[k] - st.shift_a) * inv_t - st.log_za) : acc_t(0),
          cache.live_b[k] ? std::exp((cache.shift_b[k] - st.shift_b) * inv_t - st.log_zb) : acc_t(0)};
}

// The student gradient of a row from pass 1's exponentials (requires st.finite()): in block k,
//   p_s = e^{x_a}·e^{(m_a,k − m_a)/T}/Z_a,  p_t = e^{x_b}·e^{(m_b,k − m_b)/T}/Z_b,
// and the policy's functor turns (e_a, cached teacher value) into the gradient with those factors.
template <typename Policy, typename acc_t, typename s_t, int kTerms>
void student_grad_from_cache(const Policy& policy, s_t* gs, int64_t C, acc_t inv_t,
                             const RowStats<acc_t, kTerms>& st, const ExpCache<acc_t>& cache) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const acc_t* ea = cache.ea.data();
  const acc_t* eb = cache.eb.data();
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kRowBlock, ++k) {
    const int64_t c1 = std::min(C, c0 + kRowBlock);
    const int64_t cv = c0 + (c1 - c0) / L * L;
    const auto [fa, fb] = probability_factors(cache, k, st, inv_t);
    const auto grad = policy.student_grad_block(fa, fb);
    for (int64_t c = c0; c < cv; c += L) store_vec(grad(V::loadu(ea + c), V::loadu(eb + c), c), gs + c);
    if (cv < c1) store_vec_n(grad(V::loadu(ea + cv, c1 - cv), V::loadu(eb + cv, c1 - cv), cv), gs + cv, c1 - cv);
  }
}

// The gradients of a row recomputed from its logits (any gradient; every row, finite or not):
// log p_s = (s − shift_a)/T − log Z_a, log p_t likewise, and the policy's formula. gs / gt nullptr
// = not wanted; their dtypes may differ from the logits' (a transformed row is read as acc_t).
template <typename Policy, typename acc_t, typename s_t, typename t_t, typename gs_t, typename gt_t, int kTerms>
void grads_from_logits(const Policy& policy, const s_t* s, const t_t* t, gs_t* gs, gt_t* gt, int64_t C, acc_t inv_t,
                       const RowStats<acc_t, kTerms>& st) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V vinv(inv_t), vsa(st.shift_a), vsb(st.shift_b), vlza(st.log_za), vlzb(st.log_zb);
  V g_s(0), g_t(0);
  auto step = [&](const V& sv, const V& tv, int64_t c) {
    policy.grads((sv - vsa) * vinv - vlza, (tv - vsb) * vinv - vlzb, c, gs != nullptr ? &g_s : nullptr,
                 gt != nullptr ? &g_t : nullptr);
  };
  const int64_t cv = C / L * L;
  for (int64_t c = 0; c < cv; c += L) {
    step(load_vec<acc_t>(s + c), load_vec<acc_t>(t + c), c);
    if (gs != nullptr) store_vec(g_s, gs + c);
    if (gt != nullptr) store_vec(g_t, gt + c);
  }
  if (cv < C) {
    step(load_vec_n<acc_t>(s + cv, C - cv), load_vec_n<acc_t>(t + cv, C - cv), cv);
    if (gs != nullptr) store_vec_n(g_s, gs + cv, C - cv);
    if (gt != nullptr) store_vec_n(g_t, gt + cv, C - cv);
  }
}

}  // namespace row
}  // namespace CPU_CAPABILITY
}  // namespace kdkernels
