// CPU kernels of weighted_soft_ce_rows: ℓ = −Σ_c w_c p_t,c log p_s,c per position, p = softmax(z/T),
// and, when asked, the gradients of grad_scale·Σℓ (see kdkernels/ops/weighted_soft_ce.py).
//
// Two layouts of the (outer, classes, inner) views, both vectorised with at::vec and split over
// threads with at::parallel_for:
//   * rows (classes contiguous): one position at a time, vectors along the classes;
//   * channels (any other strides; dense N,C,H,W maps): Vec::size() neighbouring positions at a
//     time, one lane per position, looping over the classes.
// Each position's logits are read from memory once: converted to the accumulation type (float, or
// double when an input is double) into a per-thread buffer that stays in cache, then the maxima,
// the exponentials and the gradients are passes over that buffer.
//
// With x = a − max(a) (a = s/T, b = t/T), e_b = exp(b − max(b)):
//   ℓ = S·log Σ exp(x) − Σ w e_b x / Σ e_b,   S = Σ w e_b / Σ e_b,
// two non-negative terms, so large logits lose no precision. Classes with w·p_t = 0 are selected
// out (not multiplied by 0), so a −inf student logit there gives 0, not NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"
#include "gradient_buffer.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using cpu::fast_exp;
using cpu::hmax;
using cpu::hsum;
using cpu::load_vec;
using cpu::load_vec_n;
using cpu::load_vec_strided;
using cpu::neg_inf;
using cpu::store_vec;
using cpu::store_vec_n;
using cpu::store_vec_strided;
using cpu::Vec;

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
// Rows: classes contiguous in student, teacher and both gradients.
template <typename s_t, typename t_t, typename acc_t>
void rows_kernel(const Problem<s_t, t_t, acc_t>& p) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.classes;
  const int64_t padded = (C + V - 1) / V * V;
  // Weights padded with zeros to whole vectors, so the passes below need no tail handling.
  std::vector<acc_t> weight(p.weight ? padded : 0, acc_t(0));
  if (p.weight) std::copy(p.weight, p.weight + C, weight.begin());
  const acc_t* w = p.weight ? weight.data() : nullptr;
  const int64_t positions = p.outer * p.inner;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / C);

  at::parallel_for(0, positions, grain, [&](int64_t begin, int64_t end) {
    // a: scaled student logits; ea / eb: exp(a − max a), exp(b − max b). Padding lanes hold −inf / 0.
    std::vector<acc_t> buffer(3 * padded);
    acc_t* a = buffer.data();
    acc_t* ea = a + padded;
    acc_t* eb = ea + padded;
    const Vec<acc_t> zero(acc_t(0)), inv_t(p.inv_temperature), minus_inf(neg_inf<acc_t>());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / p.inner, i = r % p.inner;
      const s_t* s = p.student + o * p.s[0] + i * p.s[2];
      const t_t* t = p.teacher + o * p.t[0] + i * p.t[2];
      s_t* gs = p.grad_student ? p.grad_student + o * p.gs[0] + i * p.gs[2] : nullptr;
      t_t* gt = p.grad_teacher ? p.grad_teacher + o * p.gt[0] + i * p.gt[2] : nullptr;

      acc_t m_b = neg_inf<acc_t>(), m_a = neg_inf<acc_t>();
      const bool counted = p.mask == nullptr || p.mask[r];
      if (counted) {
        Vec<acc_t> vm_a = minus_inf, vm_b = minus_inf;
        int64_t c = 0;
        for (; c + V <= C; c += V) {
          const Vec<acc_t> va = load_vec<acc_t>(s + c) * inv_t, vb = load_vec<acc_t>(t + c) * inv_t;
          va.store(a + c);
          vb.store(eb + c);
          vm_a = at::vec::maximum(vm_a, va);
          vm_b = at::vec::maximum(vm_b, vb);
        }
        if (c < C) {
          const Vec<acc_t> va = load_vec_n<acc_t>(s + c, C - c, neg_inf<acc_t>()) * inv_t;
          const Vec<acc_t> vb = load_vec_n<acc_t>(t + c, C - c, neg_inf<acc_t>()) * inv_t;
          va.store(a + c);
          vb.store(eb + c);
          vm_a = at::vec::maximum(vm_a, va);
          vm_b = at::vec::maximum(vm_b, vb);
        }
        m_a = hmax(vm_a);
        m_b = hmax(vm_b);
      }
      if (m_b == neg_inf<acc_t>()) {  // masked out, or no teacher distribution (NaN propagates)
        p.loss[r] = acc_t(0);
        if (gs) zero_strided(gs, C, 1);
        if (gt) zero_strided(gt, C, 1);
        continue;
      }

      const Vec<acc_t> shift_a(m_a != neg_inf<acc_t>() ? m_a : acc_t(0)), shift_b(m_b);
      Vec<acc_t> z_a = zero, z_b = zero, ws = zero, acc = zero;
      for (int64_t c = 0; c < padded; c += V) {
        const Vec<acc_t> x = Vec<acc_t>::loadu(a + c) - shift_a;
        const Vec<acc_t> e_a = fast_exp(x);
        const Vec<acc_t> e_b = fast_exp(Vec<acc_t>::loadu(eb + c) - shift_b);
        e_a.store(ea + c);
        e_b.store(eb + c);
        z_a += e_a;
        z_b += e_b;
        const Vec<acc_t> we = w ? Vec<acc_t>::loadu(w + c) * e_b : e_b;
        ws += we;
        acc += we * Vec<acc_t>::blendv(zero, x, we > zero);
      }
      // A NaN logit (m_a NaN) makes Z_a NaN whatever exp_u20 returns for NaN: the row is NaN.
      const acc_t sum_a = m_a == m_a ? hsum(z_a) : m_a, sum_b = hsum(z_b);
      const acc_t mass = hsum(ws) / sum_b;  // S = Σ w p_t
      const acc_t log_z_a = std::log(sum_a);
      const acc_t loss = mass * log_z_a - hsum(acc) / sum_b;
      p.loss[r] = loss;
      if (!gs && !gt) continue;

      const Vec<acc_t> coef(p.grad_coef), inv_z_b(acc_t(1) / sum_b), mass_over_z_a(mass / sum_a);
      const Vec<acc_t> lse_a = shift_a + Vec<acc_t>(log_z_a), vloss(loss);
      for (int64_t c = 0; c < C; c += V) {
        const int64_t n = std::min<int64_t>(V, C - c);
        const Vec<acc_t> wv = w ? Vec<acc_t>::loadu(w + c) : Vec<acc_t>(acc_t(1));
        const Vec<acc_t> p_t = Vec<acc_t>::loadu(eb + c) * inv_z_b;
        const Vec<acc_t> wp_t = wv * p_t;
        if (gs) {
          const Vec<acc_t> g = (Vec<acc_t>::loadu(ea + c) * mass_over_z_a - wp_t) * coef;
          n == V ? store_vec<s_t>(g, gs + c) : store_vec_n<s_t>(g, gs + c, n);
        }
        if (gt) {
          const Vec<acc_t> log_p_s = Vec<acc_t>::loadu(a + c) - lse_a;
          const Vec<acc_t> w_log_p_s = wv * Vec<acc_t>::blendv(zero, log_p_s, wp_t > zero);
          // p_t != 0 (not > 0): a NaN p_t keeps its NaN gradient.
          const Vec<acc_t> g = Vec<acc_t>::blendv(zero, zero - coef * p_t * (vloss + w_log_p_s), p_t != zero);
          n == V ? store_vec<t_t>(g, gt + c) : store_vec_n<t_t>(g, gt + c, n);
        }
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
