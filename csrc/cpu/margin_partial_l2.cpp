// CPU kernel of kdkernels::margin_partial_l2_elements: the Margin-ReLU partial L2 of Heo et al.
// (ICCV 2019) and its student gradient in one pass over student S and teacher F_t.
//
//   T = max(F_t, m_c),  counted = !(S <= T <= 0),  l = counted ? (T - S)^2 : 0,
//   dl/dS = counted ? 2 (S - T) : 0   (times grad_scale)
//
// S and F_t are read as flat arrays in memory order: both must be non-overlapping and dense with
// the same strides (NCHW, channels_last, (N, L, C), ...). The channel of flat element i is
// (i / channel_stride) % C, so no layout is ever copied. Runs of one channel (NCHW: H*W elements)
// use a broadcast margin; when the channel changes every few elements (channels_last, tokens) the
// margin is read as a vector from a short periodic table instead.
//
// With reduce, the loss is one partial sum per fixed chunk of kChunk elements (independent of the
// thread count), so the caller's torch.sum repeats bit for bit; otherwise it is elementwise, with
// the student's strides.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "../kdkernels.h"
#include "chunked_loss.h"
#include "dispatch.h"
#include "dtype_pair.h"
#include "gradient_buffer.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;

// Elements per partial sum and per parallel work unit.
constexpr int64_t kChunk = 16384;
// A channel stride at least this long is processed as runs with one broadcast margin.
constexpr int64_t kMinRun = 1024;
// Largest periodic margin table (channel_stride * C entries, repeated to >= kMinPeriod).
constexpr int64_t kMaxPeriod = int64_t(1) << 16;
constexpr int64_t kMinPeriod = 1024;

// n elements of one segment; the margin is m[0] for all (kBroadcast) or m[k] for element k.
// The loss goes to `loss` (elementwise) when given, else it is added to acc.
template <bool kBroadcast, typename acc_t, typename s_t, typename t_t>
inline void segment(const s_t* s, const t_t* t, const acc_t* m, int64_t n, acc_t coef, acc_t* loss, s_t* grad,
                    Vec<acc_t>& acc0, Vec<acc_t>& acc1) {
  using V = Vec<acc_t>;
  const V zero(0);
  const V vcoef(coef);
  const V mb(kBroadcast ? m[0] : acc_t(0));
  auto step = [&](int64_t k, int64_t count, V& acc) {
    // Padding lanes read 0 for s, t and m: T = 0 = S there, so they are not counted.
    const V sv = load_vec_upto<acc_t>(s + k, count);
    const V tv = load_vec_upto<acc_t>(t + k, count);
    V mv = mb;
    if constexpr (!kBroadcast) mv = load_vec_upto<acc_t>(m + k, count);
    const V tm = at::vec::maximum(tv, mv);
    const V d = tm - sv;
    // Left out only when S <= T <= 0 holds: a NaN element counts, and is NaN (the official
    // (T - S)^2 * mask.float() is NaN there too). d != d is that NaN test, in the same pass.
    const V counted = (sv > tm) | (tm > zero) | (d != d);
    const V l = (d * d) & counted;
    if (loss == nullptr) {
      acc = acc + l;
    } else {
      store_vec_upto(l, loss + k, count);
    }
    if (grad != nullptr) store_vec_upto((d * vcoef) & counted, grad + k, count);
  };
  sweep_two_accumulators<acc_t>(0, n, acc0, acc1, step);
}

template <typename s_t, typename t_t>
void margin_partial_l2_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin,
                            int64_t channel_stride, double grad_scale, bool reduce, at::Tensor& loss,
                            at::Tensor& grad) {
  using acc_t = acc_type_t<s_t, t_t>;
  using V = Vec<acc_t>;
  const int64_t N = student.numel();
  const int64_t C = margin.numel();
  const int64_t cs = channel_stride;
  const s_t* S = static_cast<const s_t*>(student.data_ptr());
  const t_t* T = static_cast<const t_t*>(teacher.data_ptr());
  const acc_t* M = margin.data_ptr<acc_t>();
  acc_t* loss_p = loss.data_ptr<acc_t>();
  s_t* G = grad.numel() > 0 ? static_cast<s_t*>(grad.data_ptr()) : nullptr;
  // d = T - S, so dl/dS = -2 d.
  const acc_t coef = static_cast<acc_t>(-2.0 * grad_scale);

  // Periodic margin table: element i has margin table[i % period].
  const acc_t* table = nullptr;
  int64_t period = 0;
  std::vector<acc_t> expanded;
  if (cs == 1 && C >= kMinPeriod) {
    table = M;
    period = C;
  } else if (cs < kMinRun && cs * C <= kMaxPeriod) {
    const int64_t base = cs * C;
    period = base * ((kMinPeriod + base - 1) / base);
    expanded.resize(period);
    for (int64_t j = 0; j < period; ++j) expanded[j] = M[(j / cs) % C];
    table = expanded.data();
  }

  parallel_for_chunks(N, kChunk, 2, [&](int64_t ch, int64_t i0, int64_t i1) {
    V acc0(0), acc1(0);
    acc_t* lp = reduce ? nullptr : loss_p;
    int64_t i = i0;
    while (i < i1) {
      int64_t stop;
      if (table != nullptr) {
        const int64_t p = i % period;
        stop = std::min(i1, i + (period - p));
        segment<false>(S + i, T + i, table + p, stop - i, coef, lp ? lp + i : nullptr, G ? G + i : nullptr, acc0,
                       acc1);
      } else {
        const int64_t run = i / cs;
        stop = std::min(i1, (run + 1) * cs);
        segment<true>(S + i, T + i, M + run % C, stop - i, coef, lp ? lp + i : nullptr, G ? G + i : nullptr, acc0,
                      acc1);
      }
      i = stop;
    }
    if (reduce) loss_p[ch] = hsum<acc_t>(acc0 + acc1);
  });
}

// Same sizes and, on every dimension longer than 1, the same strides; dense in memory.
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || !a.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> margin_partial_l2_elements_cpu(const at::Tensor& student,
                                                                  const at::Tensor& teacher,
                                                                  const at::Tensor& margin, int64_t channel_stride,
                                                                  const at::Tensor& grad_scale, bool reduce,
                                                                  bool student_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && margin.device().is_cpu(),
              "margin_partial_l2_elements_cpu: expected CPU tensors");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()),
              "margin_partial_l2_elements: expected floating-point student and teacher");
  TORCH_CHECK(same_dense_layout(student, teacher), "margin_partial_l2_elements: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must be dense with the same strides");
  const auto acc_dtype = cpu::accumulation_dtype(student.scalar_type(), teacher.scalar_type());
  TORCH_CHECK(margin.dim() == 1 && margin.is_contiguous() && margin.scalar_type() == acc_dtype,
              "margin_partial_l2_elements: margin must be a contiguous 1-d ", acc_dtype, " tensor");
  TORCH_CHECK(channel_stride >= 1, "margin_partial_l2_elements: channel_stride must be >= 1, got ", channel_stride);
  TORCH_CHECK(grad_scale.numel() == 1, "margin_partial_l2_elements: grad_scale must have one element");
  const int64_t N = student.numel();
  TORCH_CHECK(N == 0 || margin.numel() >= 1, "margin_partial_l2_elements: empty margin for a non-empty input");
  const auto acc_options = student.options().dtype(acc_dtype);
  at::Tensor loss =
      reduce ? cpu::partial_sums_buffer(N, kChunk, acc_options) : at::empty_like(student, acc_options);
  at::Tensor grad = cpu::gradient_buffer(student, student_grad);
  if (N == 0) return {loss, grad};
  const double gs = grad_scale.item<double>();
  const at::ScalarType s_type = student.scalar_type(), t_type = teacher.scalar_type();
  KDKERNELS_DISPATCH_FLOATING_PAIR(s_type, t_type, "margin_partial_l2_cpu", s_t, t_t, [&] {
    margin_partial_l2_impl<s_t, t_t>(student, teacher, margin, channel_stride, gs, reduce, loss, grad);
  });
  return {loss, grad};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(margin_partial_l2_elements_cpu);
