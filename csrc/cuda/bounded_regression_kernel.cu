// CUDA kernel of kdkernels::bounded_regression_rows (see bounded_regression_kernel.cuh):
//
//   d_s = |R_s - y|^2,  d_t = |R_t - y|^2,  active = !(d_s + m <= d_t) (and mask),
//   l = active ? d_s : 0,   dl/dR_s = active ? 2 (R_s - y) : 0   (times *grad_scale)
//
// One thread per row (boxes have few coordinates); a block of kThreads threads owns
// kBoundedRegressionRowChunk consecutive rows, and the chunk's loss is a deterministic block sum.
#include "bounded_regression_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <typename X>
__global__ void __launch_bounds__(kThreads) bounded_regression_kernel(const BoundedRegressionParams p) {
  using Acc = acc_t<X, X>;
  const X* __restrict__ student = static_cast<const X*>(p.student);
  const X* __restrict__ teacher = static_cast<const X*>(p.teacher);
  const X* __restrict__ target = static_cast<const X*>(p.target);
  X* __restrict__ grad = static_cast<X*>(p.grad_student);
  Acc* __restrict__ loss = static_cast<Acc*>(p.loss);
  const int64_t K = p.coords;
  const Acc margin = static_cast<Acc>(p.margin);
  const Acc coef = grad != nullptr ? Acc(2) * *static_cast<const Acc*>(p.grad_scale) : Acc(0);
  Acc sum = 0;
  for_each_chunk_item<kBoundedRegressionRowChunk, kThreads, 1>(p.rows, [&](int64_t r) {
    const X* s = student + r * p.student_strides[0];
    const X* t = teacher + r * p.teacher_strides[0];
    const X* y = target + r * p.target_strides[0];
    bool active = false, teacher_nan = false;
    Acc d_s = 0;
    if (p.mask == nullptr || p.mask[r]) {
      Acc d_t = 0;
      for (int64_t k = 0; k < K; ++k) {
        const Acc yk = to_acc<Acc>(y[k * p.target_strides[1]]);
        const Acc es = to_acc<Acc>(s[k * p.student_strides[1]]) - yk;
        const Acc et = to_acc<Acc>(t[k * p.teacher_strides[1]]) - yk;
        d_s += es * es;
        d_t += et * et;
      }
      // Inactive only when d_s + m <= d_t holds: a NaN student or target is active (and NaN); a
      // NaN teacher makes the row NaN, value and gradient (kdkernels/ops/reference rules).
      active = !(d_s + margin <= d_t);
      teacher_nan = d_t != d_t;
      if (teacher_nan) d_s = d_t;
    }
    const Acc l = active ? d_s : Acc(0);
    if (p.reduce) {
      sum += l;
    } else {
      loss[r] = l;
    }
    if (grad != nullptr) {
      X* g = grad + r * K;
      for (int64_t k = 0; k < K; ++k) {
        Acc gk = active ? coef * (to_acc<Acc>(s[k * p.student_strides[1]]) - to_acc<Acc>(y[k * p.target_strides[1]]))
                        : Acc(0);
        if (teacher_nan) gk = d_s;  // NaN
        g[k] = from_acc<X>(gk);
      }
    }
  });
  if (p.reduce) store_block_partial_sum(sum, loss);
}

}  // namespace

cudaError_t launch_bounded_regression(const BoundedRegressionParams& params, cudaStream_t stream) {
  if (params.rows < 0 || params.coords < 0) return cudaErrorInvalidValue;
  if (params.rows == 0) return cudaSuccess;
  if (params.student == nullptr || params.teacher == nullptr || params.target == nullptr || params.loss == nullptr ||
      (params.grad_student != nullptr && params.grad_scale == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = (params.rows + kBoundedRegressionRowChunk - 1) / kBoundedRegressionRowChunk;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  dispatch_dtype(params.dtype, [&](auto tag) {
    using X = typename decltype(tag)::type;
    bounded_regression_kernel<X><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace cuda
}  // namespace kdkernels
