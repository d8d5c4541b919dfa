// CPU kernel of kdkernels::kd_loss_rows: per-position T²·KL(softmax(t/T) ‖ softmax(s/T)) over the
// class dimension of (outer, classes, inner) views, and its gradients.
//
// Per position, pass 1 is an online softmax over the classes, block by block: the block's maxima
// of the raw logits s and t update the running maxima (m_s, m_t), the running sums are rescaled,
// and then one sweep over the block (still in L1) accumulates, with x_a = (s-m_s)/T, x_b = (t-m_t)/T,
//   Z_a = Σ e^{x_a},  Z_b = Σ e^{x_b},  W = Σ e^{x_b} (x_b - x_a),
// so that  L' = Σ p_t (log p_t - log p_s) = W/Z_b - log Z_b + log Z_a.
// (Shifting by the maxima inside W keeps every term small: no cancellation of two large lse.)
// The shift is taken before the scaling, (s - m_s)·(1/T): every x is ≤ 0 and the maximum's is
// exactly 0, so no exponential overflows for any finite logits (a fused s·(1/T) - m/T would leave
// the maximum's rounding error, up to +128 at 1e10/3, in the exponent), V = 1 gives exactly 0, and
// identical inputs give W = 0, Z_a = Z_b: exactly 0. Maxima propagate NaN, so a NaN logit makes
// its position NaN through the arithmetic (kdkernels/ops/reference/__init__.py has the rules).
// Pass 2, only when a gradient is asked for, writes
//   grad_s = gs·T·(p_s - p_t),  grad_t = gs·T·p_t·(log p_t - log p_s - L'):
// for the student gradient alone in the rows layout from pass 1's exponentials, kept in a per-thread
// scratch (ExpCache: one exp per element and input in all), otherwise re-reading the position.
//
// Three layouts: "rows" (class stride 1: vectorised along the classes), "channels" (inner stride
// 1: vectorised across Vec::size() neighbouring positions, looping over the classes), and a scalar
// fallback for any other strides (which sums in double). Each position is computed by one thread: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "gradient_buffer.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using cpu::acc_type_t;
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

// Work per parallel task, in elements of one input.
constexpr int64_t kGrainElements = 32768;

// Strides (in elements) of one (outer, classes, inner) tensor.
template <typename T>
struct View {
  T* data = nullptr;
  int64_t so = 0, sc = 0, si = 0;
  T* at(int64_t o, int64_t i) const { return data + o * so + i * si; }
};

template <typename T>
View<T> view_of(const at::Tensor& x) {
  View<T> v;
  if (x.numel() > 0 && x.dim() == 3) {
    v.data = static_cast<T*>(x.data_ptr());
    v.so = x.stride(0);
    v.sc = x.stride(1);
    v.si = x.stride(2);
  }
  return v;
}

// What pass 2 needs of a position, from pass 1's running state.
template <typename acc_t>
struct Stats {
  acc_t shift_a, shift_b;  // the raw maxima, 0 where a maximum is -inf
  acc_t log_za, log_zb;
  acc_t kl;       // L'
  bool has_dist;  // some teacher logit > -inf
};

template <typename acc_t>
inline Stats<acc_t> finish(acc_t ma, acc_t mb, acc_t sa, acc_t sb, acc_t za, acc_t zb, acc_t w) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  Stats<acc_t> r;
  r.shift_a = sa;
  r.shift_b = sb;
  r.log_za = std::log(za);
  r.log_zb = std::log(zb);
  r.has_dist = !(mb == ninf);
  if (!r.has_dist) {
    r.kl = 0;
  } else if (ma == ninf) {
    r.kl = std::numeric_limits<acc_t>::infinity();  // student gives 0 where the teacher does not
  } else if (!std::isfinite(ma) || !std::isfinite(mb)) {
    // A NaN or +inf logit: the position is NaN. Said here because the rows walker's fast_exp does
    // not carry NaN through the sums (pass 2 then recomputes with exp, which does).
    r.kl = std::numeric_limits<acc_t>::quiet_NaN();
  } else {
    r.kl = w / zb - r.log_zb + r.log_za;
  }
  return r;
}

// Online-softmax rescale when the maxima grow (or turn NaN): new safe shifts and the factors that
// move the running sums onto them. A sum whose old maximum was -inf is empty (0) and is left alone.
// Shifts are raw logits; their differences are scaled by 1/T like the terms.
template <typename acc_t>
struct Rescale {
  acc_t new_sa, new_sb;
  acc_t fa, fb;   // multiply Z_a by fa, Z_b by fb (1 where the old max was -inf: sums are 0)
  acc_t delta;    // W <- fb · (W + delta · Z_b)
  bool zero_b;    // fb underflowed: Z_b, W <- 0
};

template <typename acc_t>
inline Rescale<acc_t> rescale(acc_t ma, acc_t mb, acc_t sa, acc_t sb, acc_t nma, acc_t nmb, acc_t inv_t) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  Rescale<acc_t> r;
  r.new_sa = nma == ninf ? acc_t(0) : nma;
  r.new_sb = nmb == ninf ? acc_t(0) : nmb;
  const acc_t da = (sa - r.new_sa) * inv_t, db = (sb - r.new_sb) * inv_t;
  r.fa = ma == ninf ? acc_t(1) : std::exp(da);
  r.fb = mb == ninf ? acc_t(1) : std::exp(db);
  r.delta = mb == ninf ? acc_t(0) : db - da;
  r.zero_b = r.fb == acc_t(0);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Rows layout: classes contiguous.

constexpr int64_t kRowBlock = 2048;  // classes per block: 2 inputs x 8 KiB in fp32 stay in L1

// Pass 1's exponentials, kept for pass 2 so that each is evaluated once: e^{x_a} and e^{x_b} of
// every class, each shifted by its block's running maximum, and those shifts. Pass 2 rescales a
// block by e^{(shift_block - shift_final)/T} / Z instead of recomputing the exponentials and
// re-reading the logits. Scratch of one thread, reused row after row (2·C values: in L2 at
// C = 32000), so the only memory traffic is one read of each input and one write of the gradient.
template <typename acc_t>
struct ExpCache {
  std::vector<acc_t> ea, eb;            // C each
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

template <typename acc_t, typename s_t, typename t_t>
Stats<acc_t> rows_pass1(const s_t* s, const t_t* t, int64_t C, acc_t inv_t, ExpCache<acc_t>* cache) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  constexpr int64_t kBlock = kRowBlock;
  constexpr acc_t ninf = neg_inf<acc_t>();
  const V vinv(inv_t), vzero(0);
  V za(0), zb(0), w(0);
  acc_t ma = ninf, mb = ninf, sa = 0, sb = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    const int64_t cv = c0 + (c1 - c0) / L * L;
    // Block maxima of the raw logits (NaN-propagating): the shifts are raw, scaled after.
    V bma(ninf), bmb(ninf);
    for (int64_t c = c0; c < cv; c += L) {
      bma = at::vec::maximum(bma, load_vec<acc_t>(s + c));
      bmb = at::vec::maximum(bmb, load_vec<acc_t>(t + c));
    }
    if (cv < c1) {
      bma = at::vec::maximum(bma, load_vec_n<acc_t>(s + cv, c1 - cv, ninf));
      bmb = at::vec::maximum(bmb, load_vec_n<acc_t>(t + cv, c1 - cv, ninf));
    }
    const acc_t nma = nan_max(ma, hmax(bma));
    const acc_t nmb = nan_max(mb, hmax(bmb));
    if (!(nma == ma) || !(nmb == mb)) {  // grew, or became NaN
      const Rescale<acc_t> r = rescale(ma, mb, sa, sb, nma, nmb, inv_t);
      za = za * V(r.fa);
      if (r.zero_b) {
        zb = vzero;
        w = vzero;
      } else {
        w = (w + V(r.delta) * zb) * V(r.fb);
        zb = zb * V(r.fb);
      }
      ma = nma;
      mb = nmb;
      sa = r.new_sa;
      sb = r.new_sb;
    }
    acc_t* ea_out = nullptr;
    acc_t* eb_out = nullptr;
    if (cache != nullptr) {
      const int64_t k = c0 / kBlock;
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
      // Classes with p_t = 0 contribute 0, whatever the student (never 0 * inf = NaN).
      w = w + V::blendv(vzero, eb * (xb - xa), eb != vzero);
      if (ea_out != nullptr) {
        if (n == L) {
          ea.store(ea_out + c);
          eb.store(eb_out + c);
        } else {
          ea.store(ea_out + c, n);
          eb.store(eb_out + c, n);
        }
      }
    };
    for (int64_t c = c0; c < cv; c += L) step(load_vec<acc_t>(s + c), load_vec<acc_t>(t + c), c, L);
    if (cv < c1) {
      step(load_vec_n<acc_t>(s + cv, c1 - cv, ninf), load_vec_n<acc_t>(t + cv, c1 - cv, ninf), cv, c1 - cv);
    }
  }
  return finish(ma, mb, sa, sb, hsum(za), hsum(zb), hsum(w));
}

template <typename acc_t, typename s_t, typename t_t>
void rows_pass2(const s_t* s, const t_t* t, s_t* gs, t_t* gt, int64_t C, acc_t inv_t, const Stats<acc_t>& st,
                acc_t scale) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V vinv(inv_t), vzero(0), vscale(scale), vsa(st.shift_a), vsb(st.shift_b), vlza(st.log_za),
      vlzb(st.log_zb), vkl(st.kl);
  auto grads = [&](const V& sv, const V& tv, V& g_s, V& g_t) {
    const V da = (sv - vsa) * vinv - vlza;  // log p_s
    const V db = (tv - vsb) * vinv - vlzb;  // log p_t
    const V pt = db.exp();
    if (gs != nullptr) g_s = vscale * (da.exp() - pt);
    if (gt != nullptr) g_t = V::blendv(vscale * pt * (db - da - vkl), vzero, pt == vzero);
  };
  const int64_t cv = C / L * L;
  V g_s, g_t;
  for (int64_t c = 0; c < cv; c += L) {
    grads(load_vec<acc_t>(s + c), load_vec<acc_t>(t + c), g_s, g_t);
    if (gs != nullptr) store_vec(g_s, gs + c);
    if (gt != nullptr) store_vec(g_t, gt + c);
  }
  if (cv < C) {
    grads(load_vec_n<acc_t>(s + cv, C - cv), load_vec_n<acc_t>(t + cv, C - cv), g_s, g_t);
    if (gs != nullptr) store_vec_n(g_s, gs + cv, C - cv);
    if (gt != nullptr) store_vec_n(g_t, gt + cv, C - cv);
  }
}

// Pass 2 of the student gradient from pass 1's exponentials (ExpCache), when every shift and
// normaliser is finite (otherwise rows_pass2 recomputes, with the NaN/inf rules of the arithmetic):
//   grad_s = gs·T·(e^{x_a}·e^{(m_a,k - m_a)/T}/Z_a - e^{x_b}·e^{(m_b,k - m_b)/T}/Z_b)  over block k.
// Equal inputs still give exactly 0: both sides then round the same way.
template <typename acc_t, typename s_t>
void rows_pass2_cached(s_t* gs, int64_t C, acc_t inv_t, const Stats<acc_t>& st, acc_t scale,
                       const ExpCache<acc_t>& cache) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const acc_t* ea = cache.ea.data();
  const acc_t* eb = cache.eb.data();
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kRowBlock, ++k) {
    const int64_t c1 = std::min(C, c0 + kRowBlock);
    const int64_t cv = c0 + (c1 - c0) / L * L;
    const acc_t fa = cache.live_a[k] ? scale * std::exp((cache.shift_a[k] - st.shift_a) * inv_t - st.log_za) : acc_t(0);
    const acc_t fb = cache.live_b[k] ? scale * std::exp((cache.shift_b[k] - st.shift_b) * inv_t - st.log_zb) : acc_t(0);
    const V vfa(fa), vfb(fb), vzero(0);
    // Both products rounded before the subtraction: the compiler may not contract one of them into
    // an FMA with it (x·a − round(x·b) ≠ 0 for a = b), which would lose the exact 0 of equal inputs.
    auto grad = [&](const V& xa, const V& xb) { return at::vec::fmadd(xa, vfa, vzero) - at::vec::fmadd(xb, vfb, vzero); };
    for (int64_t c = c0; c < cv; c += L) store_vec(grad(V::loadu(ea + c), V::loadu(eb + c)), gs + c);
    if (cv < c1) store_vec_n(grad(V::loadu(ea + cv, c1 - cv), V::loadu(eb + cv, c1 - cv)), gs + cv, c1 - cv);
  }
}

template <typename acc_t>
inline bool all_finite(const Stats<acc_t>& st) {
  return std::isfinite(st.shift_a) && std::isfinite(st.shift_b) && std::isfinite(st.log_za) &&
         std::isfinite(st.log_zb);
}

// ---------------------------------------------------------------------------------------------
// Scalar fallback: any strides.

template <typename acc_t, typename s_t, typename t_t>
Stats<acc_t> scalar_pass1(const s_t* s, int64_t s_sc, const t_t* t, int64_t t_sc, int64_t C, acc_t inv_t) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  acc_t ma = ninf, mb = ninf, sa = 0, sb = 0, za = 0, zb = 0, w = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t a = static_cast<acc_t>(s[c * s_sc]);
    const acc_t b = static_cast<acc_t>(t[c * t_sc]);
    if (!(a <= ma) || !(b <= mb)) {  // a new maximum, or a NaN
      const acc_t nma = nan_max(ma, a), nmb = nan_max(mb, b);
      const Rescale<acc_t> r = rescale(ma, mb, sa, sb, nma, nmb, inv_t);
      za *= r.fa;
      if (r.zero_b) {
        zb = 0;
        w = 0;
      } else {
        w = (w + r.delta * zb) * r.fb;
        zb *= r.fb;
      }
      ma = nma;
      mb = nmb;
      sa = r.new_sa;
      sb = r.new_sb;
    }
    const acc_t xa = (a - sa) * inv_t, xb = (b - sb) * inv_t;
    const acc_t eb = std::exp(xb);
    za += std::exp(xa);
    zb += eb;
    if (eb != acc_t(0)) w += eb * (xb - xa);
  }
  return finish(ma, mb, sa, sb, za, zb, w);
}

template <typename acc_t, typename s_t, typename t_t>
void scalar_pass2(const s_t* s, int64_t s_sc, const t_t* t, int64_t t_sc, s_t* gs, int64_t gs_sc, t_t* gt,
                  int64_t gt_sc, int64_t C, acc_t inv_t, const Stats<acc_t>& st, acc_t scale) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t da = (static_cast<acc_t>(s[c * s_sc]) - st.shift_a) * inv_t - st.log_za;
    const acc_t db = (static_cast<acc_t>(t[c * t_sc]) - st.shift_b) * inv_t - st.log_zb;
    const acc_t pt = std::exp(db);
    if (gs != nullptr) gs[c * gs_sc] = static_cast<s_t>(scale * (std::exp(da) - pt));
    if (gt != nullptr) gt[c * gt_sc] = static_cast<t_t>(pt == acc_t(0) ? acc_t(0) : scale * pt * (db - da - st.kl));
  }
}

template <typename T>
void zero_strided(T* p, int64_t stride, int64_t n) {
  if (p == nullptr) return;
  for (int64_t c = 0; c < n; ++c) p[c * stride] = T(0);
}

// ---------------------------------------------------------------------------------------------
// Channels layout: inner positions contiguous; Vec::size() positions per group, one per lane.

template <typename acc_t, typename T>
inline Vec<acc_t> load_lanes(const T* p, int64_t n) {
  return n == Vec<acc_t>::size() ? load_vec<acc_t>(p) : load_vec_n<acc_t>(p, n);
}

template <typename acc_t, typename T>
inline void store_lanes(const Vec<acc_t>& v, T* p, int64_t n) {
  if (n == Vec<acc_t>::size()) {
    store_vec(v, p);
  } else {
    store_vec_n(v, p, n);
  }
}

template <typename acc_t, typename s_t, typename t_t>
void channels_group(const View<const s_t>& S, const View<const t_t>& Tt, const View<s_t>& GS, const View<t_t>& GT,
                    const bool* mask, acc_t* loss, int64_t o, int64_t i0, int64_t n, int64_t C, int64_t I,
                    acc_t inv_t, acc_t t2, acc_t scale) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  constexpr int64_t kBlock = 64;  // classes per block: 2 inputs x 64 x 64 B stay in L1
  constexpr acc_t ninf = neg_inf<acc_t>();
  const s_t* s = S.at(o, i0);
  const t_t* t = Tt.at(o, i0);
  const V vinv(inv_t), vzero(0), vninf(ninf);
  V ma(ninf), mb(ninf), sa(0), sb(0), za(0), zb(0), w(0);
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t c1 = std::min(C, c0 + kBlock);
    V bma(ninf), bmb(ninf);
    for (int64_t c = c0; c < c1; ++c) {
      bma = at::vec::maximum(bma, load_lanes<acc_t>(s + c * S.sc, n));
      bmb = at::vec::maximum(bmb, load_lanes<acc_t>(t + c * Tt.sc, n));
    }
    const V nma = at::vec::maximum(ma, bma);  // raw maxima, NaN-propagating
    const V nmb = at::vec::maximum(mb, bmb);
    const V nsa = V::blendv(nma, vzero, nma == vninf);
    const V nsb = V::blendv(nmb, vzero, nmb == vninf);
    const V a_live = ma != vninf, b_live = mb != vninf;  // lanes whose sums are not empty
    const V dsa = (sa - nsa) * vinv, dsb = (sb - nsb) * vinv;
    const V fa = dsa.exp();
    const V fb = dsb.exp();
    za = V::blendv(za, za * fa, a_live);
    V nw = (w + (dsb - dsa) * zb) * fb;
    nw = V::blendv(nw, vzero, fb == vzero);
    w = V::blendv(w, nw, b_live);
    zb = V::blendv(zb, zb * fb, b_live);
    ma = nma;
    mb = nmb;
    sa = nsa;
    sb = nsb;
    for (int64_t c = c0; c < c1; ++c) {
      const V xa = (load_lanes<acc_t>(s + c * S.sc, n) - sa) * vinv;
      const V xb = (load_lanes<acc_t>(t + c * Tt.sc, n) - sb) * vinv;
      const V ea = xa.exp();
      const V eb = xb.exp();
      za = za + ea;
      zb = zb + eb;
      w = w + V::blendv(vzero, eb * (xb - xa), eb != vzero);
    }
  }
  // Per-lane finish.
  __at_align__ acc_t ma_[L], mb_[L], sa_[L], sb_[L], za_[L], zb_[L], w_[L];
  __at_align__ acc_t lza_[L], lzb_[L], kl_[L], valid_[L], loss_[L];
  ma.store(ma_);
  mb.store(mb_);
  sa.store(sa_);
  sb.store(sb_);
  za.store(za_);
  zb.store(zb_);
  w.store(w_);
  bool any_valid = false;
  for (int64_t k = 0; k < L; ++k) {
    const Stats<acc_t> st = finish(ma_[k], mb_[k], sa_[k], sb_[k], za_[k], zb_[k], w_[k]);
    const bool valid = k < n && st.has_dist && (mask == nullptr || mask[o * I + i0 + k]);
    lza_[k] = st.log_za;
    lzb_[k] = st.log_zb;
    kl_[k] = st.kl;
    valid_[k] = valid ? acc_t(1) : acc_t(0);
    loss_[k] = valid ? t2 * st.kl : acc_t(0);
    any_valid = any_valid || valid;
  }
  store_lanes(V::loadu(loss_), loss + o * I + i0, n);

  s_t* gs = GS.data != nullptr ? GS.at(o, i0) : nullptr;
  t_t* gt = GT.data != nullptr ? GT.at(o, i0) : nullptr;
  if (gs == nullptr && gt == nullptr) return;
  if (!any_valid) {
    for (int64_t c = 0; c < C; ++c) {
      if (gs != nullptr) store_lanes(vzero, gs + c * GS.sc, n);
      if (gt != nullptr) store_lanes(vzero, gt + c * GT.sc, n);
    }
    return;
  }
  const V vscale(scale), vlza = V::loadu(lza_), vlzb = V::loadu(lzb_), vkl = V::loadu(kl_);
  const V vvalid = V::loadu(valid_) != vzero;
  for (int64_t c = 0; c < C; ++c) {
    const V da = (load_lanes<acc_t>(s + c * S.sc, n) - sa) * vinv - vlza;
    const V db = (load_lanes<acc_t>(t + c * Tt.sc, n) - sb) * vinv - vlzb;
    const V pt = db.exp();
    if (gs != nullptr) {
      const V g = vscale * (da.exp() - pt);
      store_lanes(V::blendv(vzero, g, vvalid), gs + c * GS.sc, n);
    }
    if (gt != nullptr) {
      V g = V::blendv(vscale * pt * (db - da - vkl), vzero, pt == vzero);
      store_lanes(V::blendv(vzero, g, vvalid), gt + c * GT.sc, n);
    }
  }
}

// ---------------------------------------------------------------------------------------------

template <typename s_t, typename t_t>
void kd_loss_rows_impl(const at::Tensor& student, const at::Tensor& teacher, const bool* mask, double temperature,
                       double grad_scale, at::Tensor& loss, at::Tensor& grad_student, at::Tensor& grad_teacher,
                       bool student_grad, bool teacher_grad) {
  using acc_t = acc_type_t<s_t, t_t>;
  constexpr int64_t L = Vec<acc_t>::size();
  const int64_t O = student.size(0), C = student.size(1), I = student.size(2);
  const View<const s_t> S = view_of<const s_t>(student);
  const View<const t_t> Tt = view_of<const t_t>(teacher);
  const View<s_t> GS = student_grad ? view_of<s_t>(grad_student) : View<s_t>();
  const View<t_t> GT = teacher_grad ? view_of<t_t>(grad_teacher) : View<t_t>();
  acc_t* loss_p = loss.data_ptr<acc_t>();
  const acc_t T = static_cast<acc_t>(temperature);
  const acc_t inv_t = acc_t(1) / T;
  const acc_t t2 = T * T;
  const acc_t scale = static_cast<acc_t>(grad_scale) * T;

  // A stride along a dimension of size 1 never matters.
  auto unit = [](int64_t size, int64_t stride) { return size == 1 || stride == 1; };
  const bool rows_ok = unit(C, S.sc) && unit(C, Tt.sc) && (!student_grad || unit(C, GS.sc)) &&
                       (!teacher_grad || unit(C, GT.sc));
  const bool channels_ok = unit(I, S.si) && unit(I, Tt.si) && (!student_grad || unit(I, GS.si)) &&
                           (!teacher_grad || unit(I, GT.si));
  const int64_t P = O * I;

  if (channels_ok && I > 1 && (!rows_ok || C < 4 * L)) {
    const int64_t groups_per_o = (I + L - 1) / L;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (C * L));
    at::parallel_for(0, O * groups_per_o, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t o = g / groups_per_o;
        const int64_t i0 = (g % groups_per_o) * L;
        channels_group<acc_t, s_t, t_t>(S, Tt, GS, GT, mask, loss_p, o, i0, std::min(L, I - i0), C, I, inv_t, t2,
                                        scale);
      }
    });
    return;
  }

  // The student-gradient pass reuses pass 1's exponentials (rows layout; a teacher gradient
  // needs log p_s and log p_t of every class, so it re-reads the logits in rows_pass2).
  const bool reuse_exps = rows_ok && student_grad && !teacher_grad;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    ExpCache<acc_t> cache;
    if (reuse_exps) cache.resize(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p / I, i = p % I;
      const s_t* s = S.at(o, i);
      const t_t* t = Tt.at(o, i);
      s_t* gs = student_grad ? GS.at(o, i) : nullptr;
      t_t* gt = teacher_grad ? GT.at(o, i) : nullptr;
      const bool keep = mask == nullptr || mask[p];
      if (rows_ok) {
        Stats<acc_t> st{};
        if (keep) st = rows_pass1<acc_t>(s, t, C, inv_t, reuse_exps ? &cache : nullptr);
        if (!keep || !st.has_dist) {
          loss_p[p] = acc_t(0);
          zero_strided(gs, GS.sc, C);
          zero_strided(gt, GT.sc, C);
          continue;
        }
        loss_p[p] = t2 * st.kl;
        if (reuse_exps && all_finite(st)) {
          rows_pass2_cached<acc_t>(gs, C, inv_t, st, scale, cache);
        } else if (gs != nullptr || gt != nullptr) {
          rows_pass2<acc_t>(s, t, gs, gt, C, inv_t, st, scale);
        }
      } else {
        // The scalar fallback sums one term at a time: in double, whatever acc_t, to keep fp32
        // accuracy over long rows.
        Stats<double> st{};
        if (keep) st = scalar_pass1<double>(s, S.sc, t, Tt.sc, C, 1.0 / temperature);
        if (!keep || !st.has_dist) {
          loss_p[p] = acc_t(0);
          zero_strided(gs, GS.sc, C);
          zero_strided(gt, GT.sc, C);
          continue;
        }
        loss_p[p] = static_cast<acc_t>(temperature * temperature * st.kl);
        if (gs != nullptr || gt != nullptr) {
          scalar_pass2<double>(s, S.sc, t, Tt.sc, gs, GS.sc, gt, GT.sc, C, 1.0 / temperature, st,
                               grad_scale * temperature);
        }
      }
    }
  });
}

}  // namespace

TensorTriple kd_loss_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& mask, double temperature,
                              const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "kd_loss_rows_cpu: expected CPU tensors");
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "kd_loss_rows: student and teacher must be 3-D (O, C, I)");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kd_loss_rows: student ", student.sizes(), " and teacher ",
              teacher.sizes(), " differ in shape");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()),
              "kd_loss_rows: expected floating-point logits");
  TORCH_CHECK(temperature > 0, "kd_loss_rows: temperature must be positive, got ", temperature);
  TORCH_CHECK(grad_scale.numel() == 1, "kd_loss_rows: grad_scale must have one element");
  const int64_t O = student.size(0), C = student.size(1), I = student.size(2);
  const bool* mask_p = nullptr;
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "kd_loss_rows: mask must be bool");
    TORCH_CHECK(mask->numel() == O * I, "kd_loss_rows: mask must have shape (", O, ", ", I, ")");
    mask_c = mask->contiguous();
    mask_p = mask_c.numel() > 0 ? mask_c.data_ptr<bool>() : nullptr;
  }
  const bool use_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  at::Tensor loss = at::empty({O, I}, student.options().dtype(use_double ? at::kDouble : at::kFloat));
  at::Tensor grad_student = cpu::gradient_buffer(student, student_grad);
  at::Tensor grad_teacher = cpu::gradient_buffer(teacher, teacher_grad);
  if (O * I == 0) return {loss, grad_student, grad_teacher};
  if (C == 0) {
    loss.zero_();
    return {loss, grad_student, grad_teacher};
  }
  const double gs = grad_scale.item<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_rows_cpu", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_rows_cpu", [&] {
      using t_t = scalar_t;
      kd_loss_rows_impl<s_t, t_t>(student, teacher, mask_p, temperature, gs, loss, grad_student, grad_teacher,
                                  student_grad, teacher_grad);
    });
  });
  return {loss, grad_student, grad_teacher};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(kd_loss_rows_cpu);
