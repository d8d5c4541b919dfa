// CPU kernel of kdkernels::bounded_regression_rows: the teacher-bounded regression loss of Chen et
// al. (NeurIPS 2017) and its student gradient, one row (box) at a time.
//
//   d_s = |R_s - y|^2,  d_t = |R_t - y|^2,  active = !(d_s + m <= d_t) (and mask),
//   l = active ? d_s : 0,   dl/dR_s = active ? 2 (R_s - y) : 0   (times grad_scale)
//
// student, teacher and target are (rows, K) views of one dtype with any strides; the gradient is
// (rows, K) contiguous. With reduce, the loss is one partial sum per fixed chunk of kRowChunk rows
// (independent of the thread count), so the caller's torch.sum repeats bit for bit; otherwise it
// is one value per row.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../kdkernels.h"
#include "chunked_loss.h"
#include "dispatch.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using namespace cpu;

// Rows per partial sum and per parallel work unit.
constexpr int64_t kRowChunk = 1024;

template <typename scalar_t>
void bounded_regression_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                             const bool* mask, double margin, double grad_scale, bool reduce, at::Tensor& loss,
                             at::Tensor& grad) {
  using acc_t = acc_type_t<scalar_t, scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const int64_t R = student.size(0);
  const int64_t K = student.size(1);
  const scalar_t* S = static_cast<const scalar_t*>(student.data_ptr());
  const scalar_t* T = static_cast<const scalar_t*>(teacher.data_ptr());
  const scalar_t* Y = static_cast<const scalar_t*>(target.data_ptr());
  const int64_t ss_r = student.stride(0), ss_k = student.stride(1);
  const int64_t ts_r = teacher.stride(0), ts_k = teacher.stride(1);
  const int64_t ys_r = target.stride(0), ys_k = target.stride(1);
  acc_t* loss_p = loss.data_ptr<acc_t>();
  scalar_t* G = grad.numel() > 0 ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr;
  const acc_t m = static_cast<acc_t>(margin);
  const acc_t coef = static_cast<acc_t>(2.0 * grad_scale);
  // Long rows of contiguous coordinates go through at::vec; boxes (K = 4) are scalar.
  const bool vectorised = K >= L && ss_k == 1 && ts_k == 1 && ys_k == 1;

  parallel_for_chunks(R, kRowChunk, 1, [&](int64_t ch, int64_t r0, int64_t r1) {
    acc_t total = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* s = S + r * ss_r;
      const scalar_t* t = T + r * ts_r;
      const scalar_t* y = Y + r * ys_r;
      scalar_t* g = G ? G + r * K : nullptr;
      bool active = false, teacher_nan = false;
      acc_t d_s = 0;
      if (mask == nullptr || mask[r]) {
        acc_t d_t = 0;
        if (vectorised) {
          V vs(0), vt(0);
          for (int64_t k = 0; k < K; k += L) {
            const int64_t count = std::min(L, K - k);  // padding lanes are 0 in all three: add 0
            const V yv = load_vec_upto<acc_t>(y + k, count);
            const V es = load_vec_upto<acc_t>(s + k, count) - yv;
            const V et = load_vec_upto<acc_t>(t + k, count) - yv;
            vs = at::vec::fmadd(es, es, vs);
            vt = at::vec::fmadd(et, et, vt);
          }
          d_s = hsum<acc_t>(vs);
          d_t = hsum<acc_t>(vt);
        } else {
          for (int64_t k = 0; k < K; ++k) {
            const acc_t yk = static_cast<acc_t>(y[k * ys_k]);
            const acc_t es = static_cast<acc_t>(s[k * ss_k]) - yk;
            const acc_t et = static_cast<acc_t>(t[k * ts_k]) - yk;
            d_s += es * es;
            d_t += et * et;
          }
        }
        // Inactive only when d_s + m <= d_t holds: a NaN student or target is active (and NaN);
        // a NaN teacher makes the row NaN, value and gradient (kdkernels/ops/reference).
        active = !(d_s + m <= d_t);
        teacher_nan = d_t != d_t;
        if (teacher_nan) d_s = std::numeric_limits<acc_t>::quiet_NaN();
      }
      const acc_t l = active ? d_s : acc_t(0);
      if (reduce) {
        total += l;
      } else {
        loss_p[r] = l;
      }
      if (g == nullptr) continue;
      if (!active) {
        std::fill(g, g + K, scalar_t(0));
      } else if (teacher_nan) {
        std::fill(g, g + K, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
      } else if (vectorised) {
        const V vc(coef);
        for (int64_t k = 0; k < K; k += L) {
          const int64_t count = std::min(L, K - k);
          store_vec_upto(vc * (load_vec_upto<acc_t>(s + k, count) - load_vec_upto<acc_t>(y + k, count)), g + k, count);
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          g[k] = static_cast<scalar_t>(coef * (static_cast<acc_t>(s[k * ss_k]) - static_cast<acc_t>(y[k * ys_k])));
        }
      }
    }
    if (reduce) loss_p[ch] = total;
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bounded_regression_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& mask, double margin,
                                                               const at::Tensor& grad_scale, bool reduce,
                                                               bool student_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && target.device().is_cpu(),
              "bounded_regression_rows_cpu: expected CPU tensors");
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes() && student.sizes() == target.sizes(),
              "bounded_regression_rows: expected (rows, K) student, teacher and target of one shape, got ",
              student.sizes(), ", ", teacher.sizes(), ", ", target.sizes());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && teacher.scalar_type() == student.scalar_type() &&
                  target.scalar_type() == student.scalar_type(),
              "bounded_regression_rows: expected student, teacher and target of one floating dtype");
  TORCH_CHECK(grad_scale.numel() == 1, "bounded_regression_rows: grad_scale must have one element");
  const int64_t R = student.size(0);
  const bool* mask_p = nullptr;
  at::Tensor mask_c;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == R && mask->device().is_cpu(),
                "bounded_regression_rows: mask must be a CPU bool tensor of ", R, " rows");
    mask_c = mask->contiguous();
    mask_p = mask_c.data_ptr<bool>();
  }
  const auto acc_options = student.options().dtype(student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = reduce ? cpu::partial_sums_buffer(R, kRowChunk, acc_options) : at::empty({R}, acc_options);
  at::Tensor grad = student_grad ? at::empty({R, student.size(1)}, student.options()) : at::empty({0}, student.options());
  if (R == 0) return {loss, grad};
  const double gs = grad_scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "bounded_regression_cpu", [&] {
    bounded_regression_impl<scalar_t>(student, teacher, target, mask_p, margin, gs, reduce, loss, grad);
  });
  return {loss, grad};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(bounded_regression_rows_cpu);
