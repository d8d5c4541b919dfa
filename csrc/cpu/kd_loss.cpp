// CPU kernel of kdkernels::kd_loss_rows: per-position T²·KL(softmax(t/T) ‖ softmax(s/T)) over the
// class dimension of (outer, classes, inner) views, and its gradients.
//
// Per position, an online softmax over the classes with x_a = (s - m_s)/T, x_b = (t - m_t)/T
// (m = the raw maxima) accumulates
//   Z_a = Σ e^{x_a},  Z_b = Σ e^{x_b},  W = Σ e^{x_b} (x_b - x_a),
// so that  L' = Σ p_t (log p_t - log p_s) = W/Z_b - log Z_b + log Z_a.
// (Shifting by the maxima inside W keeps every term small: no cancellation of two large lse.)
// The shift is taken before the scaling, (s - m_s)·(1/T): every x is ≤ 0 and the maximum's is
// exactly 0, so no exponential overflows for any finite logits (a fused s·(1/T) - m/T would leave
// the maximum's rounding error, up to +128 at 1e10/3, in the exponent), V = 1 gives exactly 0, and
// identical inputs give W = 0, Z_a = Z_b: exactly 0. Maxima propagate NaN, so a NaN logit makes
// its position NaN (kdkernels/ops/reference/__init__.py has the rules).
// The gradient pass, only when a gradient is asked for, writes
//   grad_s = gs·T·(p_s - p_t),  grad_t = gs·T·p_t·(log p_t - log p_s - L').
//
// Three layouts: "rows" (class stride 1: the shared walker of two_distribution_row.h with
// row::KlPolicy of kl_row_policy.h; the student gradient alone comes from pass 1's cached exponentials, one exp per
// element and input in all), "channels" (inner stride 1: vectorised across Vec::size()
// neighbouring positions, looping over the classes), and a scalar fallback for any other strides
// (which sums in double). Each position is computed by one thread: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "kl_row_policy.h"
#include "row_op_inputs.h"
#include "two_distribution_row.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;  // the at::vec helpers of vec_utils.h

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

// What the gradient pass needs of a position (scalar fallback and channels layout).
template <typename acc_t>
struct Stats {
  acc_t shift_a, shift_b;  // the raw maxima, 0 where a maximum is -inf
  acc_t log_za, log_zb;
  acc_t kl;       // L'
  bool has_dist;  // some teacher logit > -inf
};

// L' from the maxima, normalisers and W = Σ e^{x_b}(x_b − x_a), with the rules of the edge cases.
template <typename acc_t>
inline acc_t kl_of(acc_t ma, acc_t mb, acc_t log_za, acc_t log_zb, acc_t zb, acc_t w) {
  constexpr acc_t ninf = neg_inf<acc_t>();
  if (mb == ninf) return 0;                                              // no teacher distribution
  if (ma == ninf) return std::numeric_limits<acc_t>::infinity();         // student 0 where the teacher is not
  // A NaN or +inf logit: the position is NaN. Said here because fast_exp need not carry NaN
  // through the sums (the gradient pass then recomputes with exp, which does).
  if (!std::isfinite(ma) || !std::isfinite(mb)) return std::numeric_limits<acc_t>::quiet_NaN();
  return w / zb - log_zb + log_za;
}

template <typename acc_t>
inline Stats<acc_t> finish(acc_t ma, acc_t mb, acc_t sa, acc_t sb, acc_t za, acc_t zb, acc_t w) {
  Stats<acc_t> r;
  r.shift_a = sa;
  r.shift_b = sb;
  r.log_za = std::log(za);
  r.log_zb = std::log(zb);
  r.has_dist = !(mb == neg_inf<acc_t>());
  r.kl = kl_of(ma, mb, r.log_za, r.log_zb, zb, w);
  return r;
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
      const row::Rescale<acc_t> r = row::rescale(ma, mb, sa, sb, nma, nmb, inv_t);
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
      bma = at::vec::maximum(bma, load_vec_upto<acc_t>(s + c * S.sc, n));
      bmb = at::vec::maximum(bmb, load_vec_upto<acc_t>(t + c * Tt.sc, n));
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
      const V xa = (load_vec_upto<acc_t>(s + c * S.sc, n) - sa) * vinv;
      const V xb = (load_vec_upto<acc_t>(t + c * Tt.sc, n) - sb) * vinv;
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
  store_vec_upto(V::loadu(loss_), loss + o * I + i0, n);

  s_t* gs = GS.data != nullptr ? GS.at(o, i0) : nullptr;
  t_t* gt = GT.data != nullptr ? GT.at(o, i0) : nullptr;
  if (gs == nullptr && gt == nullptr) return;
  if (!any_valid) {
    for (int64_t c = 0; c < C; ++c) {
      if (gs != nullptr) store_vec_upto(vzero, gs + c * GS.sc, n);
      if (gt != nullptr) store_vec_upto(vzero, gt + c * GT.sc, n);
    }
    return;
  }
  const V vscale(scale), vlza = V::loadu(lza_), vlzb = V::loadu(lzb_), vkl = V::loadu(kl_);
  const V vvalid = V::loadu(valid_) != vzero;
  for (int64_t c = 0; c < C; ++c) {
    const V da = (load_vec_upto<acc_t>(s + c * S.sc, n) - sa) * vinv - vlza;
    const V db = (load_vec_upto<acc_t>(t + c * Tt.sc, n) - sb) * vinv - vlzb;
    const V pt = db.exp();
    if (gs != nullptr) {
      const V g = vscale * (da.exp() - pt);
      store_vec_upto(V::blendv(vzero, g, vvalid), gs + c * GS.sc, n);
    }
    if (gt != nullptr) {
      V g = V::blendv(vscale * pt * (db - da - vkl), vzero, pt == vzero);
      store_vec_upto(V::blendv(vzero, g, vvalid), gt + c * GT.sc, n);
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
  // needs log p_s and log p_t of every class, so it re-reads the logits).
  const bool reuse_exps = rows_ok && student_grad && !teacher_grad;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  const row::KlPolicy<acc_t> policy{scale};
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    row::ExpCache<acc_t> cache;
    if (reuse_exps) cache.resize(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t o = p / I, i = p % I;
      const s_t* s = S.at(o, i);
      const t_t* t = Tt.at(o, i);
      s_t* gs = student_grad ? GS.at(o, i) : nullptr;
      t_t* gt = teacher_grad ? GT.at(o, i) : nullptr;
      const bool keep = mask == nullptr || mask[p];
      if (rows_ok) {
        row::RowStats<acc_t, 1> st{};
        if (keep) st = row::walk_row(policy, s, t, C, inv_t, reuse_exps ? &cache : nullptr);
        if (!keep || !st.has_dist()) {
          loss_p[p] = acc_t(0);
          zero_strided(gs, GS.sc, C);
          zero_strided(gt, GT.sc, C);
          continue;
        }
        row::KlPolicy<acc_t> row_policy = policy;
        row_policy.kl = kl_of(st.max_a, st.max_b, st.log_za, st.log_zb, st.z_b, st.terms[0]);
        loss_p[p] = t2 * row_policy.kl;
        if (reuse_exps && st.finite()) {
          row::student_grad_from_cache(row_policy, gs, C, inv_t, st, cache);
        } else if (gs != nullptr || gt != nullptr) {
          row::grads_from_logits(row_policy, s, t, gs, gt, C, inv_t, st);
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
  cpu::check_row_op_inputs("kd_loss_rows", student, teacher, temperature, grad_scale);
  const int64_t O = student.size(0), I = student.size(2);
  at::Tensor mask_c;
  const bool* mask_p = cpu::row_op_mask("kd_loss_rows", mask, O, I, mask_c);
  cpu::RowOpOutputs out = cpu::row_op_outputs(student, teacher, student_grad, teacher_grad);
  at::Tensor &loss = out.loss, &grad_student = out.grad_student, &grad_teacher = out.grad_teacher;
  if (out.done) return {loss, grad_student, grad_teacher};
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
