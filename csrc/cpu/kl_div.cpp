// CPU kernel of kdkernels::kl_div_pointwise: torch.nn.functional.kl_div's pointwise loss and both
// gradients in one pass over input x (log-probabilities) and target y.
//
//   log_target = false: l = xlogy(y, y) - y·x,   dl/dx = -y,       dl/dy = log y + 1 - x (0·x where y == 0)
//   log_target = true:  l = e^y · (y - x),       dl/dx = -e^y,     dl/dy = e^y · (y - x + 1)
//
// Gradients are multiplied by grad_scale. With reduce, the loss is one partial sum per fixed chunk
// of kChunk flattened elements (independent of the thread count), so the caller's sum repeats bit
// for bit; an empty input gives one zero.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "../kdkernels.h"
#include "chunked_loss.h"
#include "dispatch.h"
#include "gradient_buffer.h"
#include "vec_utils.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

using cpu::acc_type_t;
using cpu::hsum;
using cpu::load_vec;
using cpu::load_vec_n;
using cpu::store_vec;
using cpu::store_vec_n;
using cpu::sweep_two_accumulators;
using cpu::Vec;

// Elements per loss partial sum (and per parallel task unit). Python's fake implementation must
// give the same length: max(1, ceil(numel / kChunk)).
constexpr int64_t kChunk = 16384;

template <typename x_t, typename y_t>
void kl_div_impl(const at::Tensor& input, const at::Tensor& target, bool log_target, double grad_scale, bool reduce,
                 at::Tensor& loss, at::Tensor& grad_input, at::Tensor& grad_target) {
  using acc_t = acc_type_t<x_t, y_t>;
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const int64_t N = input.numel();
  const x_t* x = static_cast<const x_t*>(input.data_ptr());
  const y_t* y = static_cast<const y_t*>(target.data_ptr());
  acc_t* loss_p = loss.data_ptr<acc_t>();
  x_t* gx = grad_input.numel() > 0 ? grad_input.data_ptr<x_t>() : nullptr;
  y_t* gy = grad_target.numel() > 0 ? grad_target.data_ptr<y_t>() : nullptr;
  const acc_t gs = static_cast<acc_t>(grad_scale);

  // One vector of L (or count < L) elements at offset k; adds its loss lanes to acc.
  auto block = [&](int64_t k, int64_t count, V& acc) {
    const bool full = count == L;
    const V xv = full ? load_vec<acc_t>(x + k) : load_vec_n<acc_t>(x + k, count);
    const V yv = full ? load_vec<acc_t>(y + k) : load_vec_n<acc_t>(y + k, count);
    const V vzero(0), vone(1), vgs(gs);
    V l, g_x, g_y;
    if (log_target) {
      const V ey = yv.exp();
      const V d = yv - xv;
      l = ey * d;
      g_x = V(-gs) * ey;
      g_y = vgs * ey * (d + vone);
    } else {
      const V logy = yv.log();
      const V is_zero = yv == vzero;
      l = V::blendv(yv * logy, vzero, is_zero) - yv * xv;  // xlogy(y, y) - y·x
      g_x = V(-gs) * yv;
      // y == 0: 0 by our convention, NaN where x is not finite (the loss is NaN there too).
      g_y = V::blendv(vgs * (logy + vone - xv), xv * vzero, is_zero);
    }
    if (reduce) {
      // Padding lanes of a partial vector are 0: their loss is 0 (both formulas), harmless.
      acc = acc + l;
    } else if (full) {
      l.store(loss_p + k);
    } else {
      l.store(loss_p + k, count);
    }
    if (gx != nullptr) {
      if (full) {
        store_vec(g_x, gx + k);
      } else {
        store_vec_n(g_x, gx + k, count);
      }
    }
    if (gy != nullptr) {
      if (full) {
        store_vec(g_y, gy + k);
      } else {
        store_vec_n(g_y, gy + k, count);
      }
    }
  };

  cpu::parallel_for_chunks(N, kChunk, 2, [&](int64_t ch, int64_t k0, int64_t k1) {
    V acc0(0), acc1(0);
    sweep_two_accumulators<acc_t>(k0, k1, acc0, acc1, block);
    if (reduce) loss_p[ch] = hsum<acc_t>(acc0 + acc1);
  });
}

}  // namespace

TensorTriple kl_div_pointwise_cpu(const at::Tensor& input_, const at::Tensor& target_, bool log_target,
                                  const at::Tensor& grad_scale, bool reduce, bool input_grad, bool target_grad) {
  TORCH_CHECK(input_.device().is_cpu() && target_.device().is_cpu(), "kl_div_pointwise_cpu: expected CPU tensors");
  TORCH_CHECK(input_.sizes() == target_.sizes(), "kl_div_pointwise: input ", input_.sizes(), " and target ",
              target_.sizes(), " differ in shape");
  TORCH_CHECK(at::isFloatingType(input_.scalar_type()) && at::isFloatingType(target_.scalar_type()),
              "kl_div_pointwise: expected floating-point input and target");
  TORCH_CHECK(grad_scale.numel() == 1, "kl_div_pointwise: grad_scale must have one element");
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  const bool use_double = input.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  const auto acc_options = input.options().dtype(use_double ? at::kDouble : at::kFloat);
  const int64_t N = input.numel();
  at::Tensor loss = reduce ? cpu::partial_sums_buffer(N, kChunk, acc_options) : at::empty(input.sizes(), acc_options);
  at::Tensor grad_input = cpu::gradient_buffer(input, input_grad);
  at::Tensor grad_target = cpu::gradient_buffer(target, target_grad);
  if (N == 0) {
    loss.zero_();
    return {loss, grad_input, grad_target};
  }
  const double gs = grad_scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "kl_div_pointwise_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target.scalar_type(), "kl_div_pointwise_cpu", [&] {
      using y_t = scalar_t;
      kl_div_impl<x_t, y_t>(input, target, log_target, gs, reduce, loss, grad_input, grad_target);
    });
  });
  return {loss, grad_input, grad_target};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(kl_div_pointwise_cpu);
