// CPU kernels of weighted_soft_ce_rows: ℓ = −Σ_c w_c p_t,c log p_s,c per position, p = softmax(z/T),
// and, when asked, the gradients of grad_scale·Σℓ (see kdkernels/ops/weighted_soft_ce.py).
//
// Two layouts of the (outer, classes, inner) views, both vectorised with at::vec and split over
// threads with at::parallel_for:
//   * rows (classes contiguous): one position at a time, vectors along the classes, by the shared
//     two-distribution row walker (two_distribution_row.h) with WeightedCePolicy below: each logit
//     read once and each exponential evaluated once (the student gradient alone is a rescale of
//     pass 1's cached exponentials);
//   * channels (any other strides; dense N,C,H,W maps): Vec::size() neighbouring positions at a
//     time, one lane per position, looping over the classes; each position's logits are converted
//     once into a per-thread buffer that stays in cache, and the maxima, the exponentials and the
//     gradients are passes over that buffer.
//
// With x = (s − max s)/T, e_a = exp(x), e_b = exp((t − max t)/T):
//   ℓ = S·log Σ e_a − Σ w e_b x / Σ e_b,   S = Σ w e_b / Σ e_b,
// two non-negative terms, so large logits lose no precision. Classes with w·p_t = 0 are selected
// out (not multiplied by 0), so a −inf student logit there gives 0, not NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "gradient_buffer.h"
#include "two_distribution_row.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;  // the at::vec helpers of vec_utils.h

using Strides = std::array<int64_t, 3>;  // (outer, classes, inner)

// Work per parallel_for chunk, in logits: enough to amortise a task, small enough to balance.
constexpr int64_t kGrainElements = 32768;

template <typename s_t, typename t_t, typename acc_t>
struct Problem {
  const s_t* student;
  const t_t* teacher;
  const acc_t* weight;  // (classes,) contiguous, nullptr = all ones
  const bool* mask;     // (outer, inner) contiguous, nullptr = all counted
  acc_t* loss;          // (outer, inner) contiguous
  s_t* grad_student;    // nullptr = not wanted
  t_t* grad_teacher;    // nullptr = not wanted
  int64_t outer, classes, inner;
  Strides s, t, gs, gt;
  acc_t inv_temperature;
  acc_t grad_coef;  // grad_scale / T
};

template <typename scalar_t>
void zero_strided(scalar_t* p, int64_t n, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) p[c * stride] = scalar_t(0);
}

// ---------------------------------------------------------------------------------------------
// Rows: classes contiguous in student, teacher and both gradients. The shared walker
// (two_distribution_row.h) with cross terms WS = Σ w e_b and ACC = Σ w e_b x_a, x_a = (s − m_s)/T.
template <typename acc_t>
struct WeightedCePolicy {
  using V = Vec<acc_t>;
  static constexpr int kTerms = 2;
  const acc_t* weight;  // padded with zeros to whole vectors; nullptr = all ones
  acc_t coef;           // grad_scale / T
  acc_t mass = 0;       // the row's S = Σ w p_t
  acc_t loss = 0;       // the row's ℓ

  V weight_at(int64_t c) const { return weight != nullptr ? V::loadu(weight + c) : V(acc_t(1)); }
  V accumulate(V* terms, const V& xa, const V& /*xb*/, const V& /*ea*/, const V& eb, int64_t c) const {
    const V we = weight != nullptr ? V::loadu(weight + c) * eb : eb;
    terms[0] = terms[0] + we;
    // Classes with w·p_t = 0 are selected out: a −inf student logit there gives 0, not NaN. (The
    // weights are ≥ 0, so w·p_t ≠ 0 is w·p_t > 0.)
    terms[1] = fmadd_where_nonzero(we, we, xa, terms[1]);
    return we;  // what the exponential cache keeps: the student gradient needs w·p_t, not p_t
  }
  static void rescale(V* terms, const row::Rescale<acc_t>& r, const V& /*zb*/) {
    if (r.zero_b) {
      terms[0] = V(0);
      terms[1] = V(0);
    } else {
      terms[1] = (terms[1] + V(r.da) * terms[0]) * V(r.fb);
      terms[0] = terms[0] * V(r.fb);
    }
  }
  // grad_s = (S·p_s − w·p_t)·grad_scale/T
  // (the cache holds e_a and w·e_b: see accumulate)
  struct StudentGrad {
    V fa, fb;
    V operator()(const V& ea, const V& we, int64_t /*c*/) const { return ea * fa - we * fb; }
  };
  StudentGrad student_grad_block(acc_t fa, acc_t fb) const { return {V(coef * mass * fa), V(coef * fb)}; }
  //   grad_s = (S·p_s − w·p_t)·gs/T,  grad_t = −p_t·(ℓ + w·log p_s)·gs/T
  void grads(const V& log_ps, const V& log_pt, int64_t c, V* g_s, V* g_t) const {
    const V zero(0), vcoef(coef);
    const V wv = weight_at(c);
    const V p_t = log_pt.exp();
    const V wp_t = wv * p_t;
    if (g_s != nullptr) *g_s = (log_ps.exp() * V(mass) - wp_t) * vcoef;
    if (g_t != nullptr) {
      const V w_log_p_s = wv * V::blendv(zero, log_ps, wp_t > zero);
      // p_t != 0 (not > 0): a NaN p_t keeps its NaN gradient.
      *g_t = where_nonzero(p_t, zero - vcoef * p_t * (V(loss) + w_log_p_s));
    }
  }
};

template <typename s_t, typename t_t, typename acc_t>
void rows_kernel(const Problem<s_t, t_t, acc_t>& p) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.classes;
  const int64_t padded = (C + V - 1) / V * V;
  // Weights padded with zeros to whole vectors: the tail vector reads no memory past them.
  std::vector<acc_t> weight(p.weight ? padded : 0, acc_t(0));
  if (p.weight) std::copy(p.weight, p.weight + C, weight.begin());
  const WeightedCePolicy<acc_t> policy{p.weight ? weight.data() : nullptr, p.grad_coef};
  const acc_t inv_t = p.inv_temperature;
  const int64_t positions = p.outer * p.inner;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / C);
  // The student gradient alone reuses pass 1's exponentials; a teacher gradient re-reads the logits.
  const bool reuse_exps = p.grad_student != nullptr && p.grad_teacher == nullptr;

  at::parallel_for(0, positions, grain, [&](int64_t begin, int64_t end) {
    row::ExpCache<acc_t> cache;
    if (reuse_exps) cache.resize(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / p.inner, i = r % p.inner;
      const s_t* s = p.student + o * p.s[0] + i * p.s[2];
      const t_t* t = p.teacher + o * p.t[0] + i * p.t[2];
      s_t* gs = p.grad_student ? p.grad_student + o * p.gs[0] + i * p.gs[2] : nullptr;
      t_t* gt = p.grad_teacher ? p.grad_teacher + o * p.gt[0] + i * p.gt[2] : nullptr;
      const bool counted = p.mask == nullptr || p.mask[r];
      row::RowStats<acc_t, 2> st{};
      if (counted) st = row::walk_row(policy, s, t, C, inv_t, reuse_exps ? &cache : nullptr);
      if (!counted || !st.has_dist()) {  // masked out, or no teacher distribution (NaN propagates)
        p.loss[r] = acc_t(0);
        if (gs) zero_strided(gs, C, 1);
        if (gt) zero_strided(gt, C, 1);
        continue;
      }
      WeightedCePolicy<acc_t> row_policy = policy;
      row_policy.mass = st.terms[0] / st.z_b;  // S = Σ w p_t
      // ℓ = S·log Z_a − Σ w e_b x_a / Z_b: two non-negative terms. A NaN or +inf logit: NaN.
      row_policy.loss = st.nonfinite_max() ? std::numeric_limits<acc_t>::quiet_NaN()
                                           : row_policy.mass * st.log_za - st.terms[1] / st.z_b;
      p.loss[r] = row_policy.loss;
      if (reuse_exps && st.finite()) {
        row::student_grad_from_cache(row_policy, gs, C, inv_t, st, cache);
      } else if (gs || gt) {
        row::grads_from_logits(row_policy, s, t, gs, gt, C, inv_t, st);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Channels (and any other strides): V positions neighbouring along `inner`, one per lane.
template <typename s_t, typename t_t, typename acc_t>
void channels_kernel(const Problem<s_t, t_t, acc_t>& p) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.classes;
  const int64_t tiles_per_outer = (p.inner + V - 1) / V;
  const int64_t tiles = p.outer * tiles_per_outer;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (C * V));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(3 * C * V);  // [class][lane]
    acc_t* a = buffer.data();
    acc_t* ea = a + C * V;
    acc_t* eb = ea + C * V;
    const Vec<acc_t> zero(acc_t(0)), one(acc_t(1)), inv_t(p.inv_temperature), minus_inf(neg_inf<acc_t>());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t o = tile / tiles_per_outer, i0 = tile % tiles_per_outer * V;
      const int64_t n = std::min<int64_t>(V, p.inner - i0);
      const int64_t first = o * p.inner + i0;  // index of lane 0 in loss and mask
      const s_t* s = p.student + o * p.s[0] + i0 * p.s[2];
      const t_t* t = p.teacher + o * p.t[0] + i0 * p.t[2];
      s_t* gs = p.grad_student ? p.grad_student + o * p.gs[0] + i0 * p.gs[2] : nullptr;
      t_t* gt = p.grad_teacher ? p.grad_teacher + o * p.gt[0] + i0 * p.gt[2] : nullptr;

      __at_align__ acc_t lane_flags[V];
      bool any = false;
      for (int64_t k = 0; k < V; ++k) {
        const bool on = k < n && (p.mask == nullptr || p.mask[first + k]);
        lane_flags[k] = on ? acc_t(1) : acc_t(0);
        any = any || on;
      }
      if (!any) {
        std::fill(p.loss + first, p.loss + first + n, acc_t(0));
        for (int64_t c = 0; c < C; ++c)
          for (int64_t k = 0; k < n; ++k) {
            if (gs) gs[c * p.gs[1] + k * p.gs[2]] = s_t(0);
            if (gt) gt[c * p.gt[1] + k * p.gt[2]] = t_t(0);
          }
        continue;
      }

      const bool dense_s = n == V && p.s[2] == 1, dense_t = n == V && p.t[2] == 1;
      Vec<acc_t> m_a = minus_inf, m_b = minus_inf;
      for (int64_t c = 0; c < C; ++c) {
        const s_t* sc = s + c * p.s[1];
        const t_t* tc = t + c * p.t[1];
        const Vec<acc_t> va = (dense_s ? load_vec<acc_t>(sc) : load_vec_strided<acc_t>(sc, p.s[2], n)) * inv_t;
        const Vec<acc_t> vb = (dense_t ? load_vec<acc_t>(tc) : load_vec_strided<acc_t>(tc, p.t[2], n)) * inv_t;
        va.store(a + c * V);
        vb.store(eb + c * V);
        m_a = at::vec::maximum(m_a, va);
        m_b = at::vec::maximum(m_b, vb);
      }
      // A lane counts if it is in range, unmasked and its teacher has a distribution.
      const Vec<acc_t> counted = (Vec<acc_t>::loadu(lane_flags) > zero) & (m_b != minus_inf);
      const Vec<acc_t> shift_a = Vec<acc_t>::blendv(m_a, zero, m_a == minus_inf);
      const Vec<acc_t> shift_b = Vec<acc_t>::blendv(m_b, zero, m_b == minus_inf);
      Vec<acc_t> z_a = zero, z_b = zero, ws = zero, acc = zero;
      for (int64_t c = 0; c < C; ++c) {
        const Vec<acc_t> x = Vec<acc_t>::loadu(a + c * V) - shift_a;
        const Vec<acc_t> e_a = fast_exp(x);
        const Vec<acc_t> e_b = fast_exp(Vec<acc_t>::loadu(eb + c * V) - shift_b);
        e_a.store(ea + c * V);
        e_b.store(eb + c * V);
        z_a += e_a;
        z_b += e_b;
        const Vec<acc_t> we = p.weight ? Vec<acc_t>(p.weight[c]) * e_b : e_b;
        ws += we;
        acc += we * Vec<acc_t>::blendv(zero, x, we > zero);
      }
      z_a = Vec<acc_t>::blendv(one, z_a, counted);
      z_a = Vec<acc_t>::blendv(z_a, m_a, m_a != m_a);  // a NaN logit: NaN lane (see the rows kernel)
      z_b = Vec<acc_t>::blendv(one, z_b, counted);
      const Vec<acc_t> mass = ws / z_b;
      const Vec<acc_t> log_z_a = z_a.log();
      const Vec<acc_t> loss = Vec<acc_t>::blendv(zero, mass * log_z_a - acc / z_b, counted);
      store_vec_n<acc_t>(loss, p.loss + first, n);
      if (!gs && !gt) continue;

      const Vec<acc_t> coef(p.grad_coef), inv_z_b = one / z_b, mass_over_z_a = mass / z_a;
      const Vec<acc_t> lse_a = shift_a + log_z_a;
      const bool dense_gs = n == V && p.gs[2] == 1, dense_gt = n == V && p.gt[2] == 1;
      for (int64_t c = C - 1; c >= 0; --c) {
        const Vec<acc_t> wv(p.weight ? p.weight[c] : acc_t(1));
        const Vec<acc_t> p_t = Vec<acc_t>::loadu(eb + c * V) * inv_z_b;
        const Vec<acc_t> wp_t = wv * p_t;
        if (gs) {
          const Vec<acc_t> g =
              Vec<acc_t>::blendv(zero, (Vec<acc_t>::loadu(ea + c * V) * mass_over_z_a - wp_t) * coef, counted);
          s_t* out = gs + c * p.gs[1];
          dense_gs ? store_vec<s_t>(g, out) : store_vec_strided<s_t>(g, out, p.gs[2], n);
        }
        if (gt) {
          const Vec<acc_t> log_p_s = Vec<acc_t>::loadu(a + c * V) - lse_a;
          const Vec<acc_t> w_log_p_s = wv * Vec<acc_t>::blendv(zero, log_p_s, wp_t > zero);
          const Vec<acc_t> g =
              Vec<acc_t>::blendv(zero, zero - coef * p_t * (loss + w_log_p_s), counted & (p_t != zero));
          t_t* out = gt + c * p.gt[1];
          dense_gt ? store_vec<t_t>(g, out) : store_vec_strided<t_t>(g, out, p.gt[2], n);
        }
      }
    }
  });
}

Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

}  // namespace

TensorTriple weighted_soft_ce_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                       const c10::optional<at::Tensor>& class_weight,
                                       const c10::optional<at::Tensor>& mask, double temperature,
                                       const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  TORCH_CHECK(student.dim() == 3, "weighted_soft_ce_rows: student must be (outer, classes, inner), got ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "weighted_soft_ce_rows: teacher shape ", teacher.sizes(),
              " != student shape ", student.sizes());
  TORCH_CHECK(temperature > 0, "weighted_soft_ce_rows: temperature must be > 0, got ", temperature);
  TORCH_CHECK(grad_scale.numel() == 1, "weighted_soft_ce_rows: grad_scale must have one element");
  const int64_t outer = student.size(0), classes = student.size(1), inner = student.size(2);
  const bool use_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto acc_dtype = use_double ? at::kDouble : at::kFloat;

  at::Tensor weight;
  if (class_weight.has_value()) {
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == classes,
                "weighted_soft_ce_rows: class_weight must be (classes,) = (", classes, "), got ",
                class_weight->sizes());
    weight = class_weight->to(acc_dtype).contiguous();
  }
  at::Tensor mask_c;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "weighted_soft_ce_rows: mask must be bool");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == outer && mask->size(1) == inner,
                "weighted_soft_ce_rows: mask must be (outer, inner) = (", outer, ", ", inner, "), got ",
                mask->sizes());
    mask_c = mask->contiguous();
  }

  at::Tensor loss = at::empty({outer, inner}, student.options().dtype(acc_dtype));
  at::Tensor grad_student = cpu::gradient_buffer(student, student_grad);
  at::Tensor grad_teacher = cpu::gradient_buffer(teacher, teacher_grad);
  if (outer * inner == 0) return {loss, grad_student, grad_teacher};
  if (classes == 0) {
    loss.zero_();
    return {loss, grad_student, grad_teacher};
  }
  const double scale = grad_scale.item<double>() / temperature;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "weighted_soft_ce_rows_cpu", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "weighted_soft_ce_rows_cpu", [&] {
      using t_t = scalar_t;
      using acc_t = cpu::acc_type_t<s_t, t_t>;
      Problem<s_t, t_t, acc_t> p{};
      p.student = student.const_data_ptr<s_t>();
      p.teacher = teacher.const_data_ptr<t_t>();
      p.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
      p.mask = mask_c.defined() ? mask_c.const_data_ptr<bool>() : nullptr;
      p.loss = loss.mutable_data_ptr<acc_t>();
      p.grad_student = student_grad ? grad_student.mutable_data_ptr<s_t>() : nullptr;
      p.grad_teacher = teacher_grad ? grad_teacher.mutable_data_ptr<t_t>() : nullptr;
      p.outer = outer;
      p.classes = classes;
      p.inner = inner;
      p.s = strides_of(student);
      p.t = strides_of(teacher);
      p.gs = student_grad ? strides_of(grad_student) : Strides{0, 0, 0};
      p.gt = teacher_grad ? strides_of(grad_teacher) : Strides{0, 0, 0};
      p.inv_temperature = static_cast<acc_t>(1.0 / temperature);
      p.grad_coef = static_cast<acc_t>(scale);
      const bool rows = p.s[1] == 1 && p.t[1] == 1 && (!student_grad || p.gs[1] == 1) &&
                        (!teacher_grad || p.gt[1] == 1);
      rows ? rows_kernel(p) : channels_kernel(p);
    });
  });
  return {loss, grad_student, grad_teacher};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(weighted_soft_ce_rows_cpu);
