// CUDA kernel of kdkernels::margin_partial_l2_elements (see margin_partial_l2_kernel.cuh):
//
//   T = max(F_t, m_c),  counted = !(S <= T <= 0),  l = counted ? (T - S)^2 : 0,
//   dl/dS = counted ? 2 (S - T) : 0   (times *grad_scale)
//
// One block of kThreads threads owns one chunk of kMarginPartialL2Chunk consecutive elements,
// each thread a strided (coalesced) subset; the chunk's loss is a deterministic block sum.
#include "margin_partial_l2_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
    margin_partial_l2_kernel(const S* __restrict__ student, const T* __restrict__ teacher,
                             const acc_t<S, T>* __restrict__ margin, int64_t numel, int64_t channels,
                             int64_t channel_stride, const void* __restrict__ grad_scale, acc_t<S, T>* __restrict__ loss,
                             bool reduce, S* __restrict__ grad_student) {
  using Acc = acc_t<S, T>;
  const Acc coef = grad_student != nullptr ? Acc(-2) * *static_cast<const Acc*>(grad_scale) : Acc(0);
  Acc sum = 0;
  for_each_chunk_item<kMarginPartialL2Chunk, kThreads, 4>(numel, [&](int64_t i) {
    const Acc s = to_acc<Acc>(student[i]);
    const Acc t = to_acc<Acc>(teacher[i]);
    const Acc m = margin[(i / channel_stride) % channels];
    const Acc tm = (t > m || t != t) ? t : m;  // max, NaN-propagating like torch.maximum
    const Acc d = tm - s;
    // Left out only when S <= T <= 0 holds: a NaN element counts, and is NaN (reference rules).
    const bool counted = !(s <= tm && tm <= Acc(0));
    const Acc l = counted ? d * d : Acc(0);
    if (reduce) {
      sum += l;
    } else {
      loss[i] = l;
    }
    if (grad_student != nullptr) grad_student[i] = from_acc<S>(counted ? d * coef : Acc(0));
  });
  if (reduce) store_block_partial_sum(sum, loss);
}

}  // namespace

cudaError_t launch_margin_partial_l2(const MarginPartialL2Params& params, cudaStream_t stream) {
  if (params.numel < 0 || params.channels < 1 || params.channel_stride < 1) return cudaErrorInvalidValue;
  if (params.numel == 0) return cudaSuccess;
  if (params.student.data == nullptr || params.teacher.data == nullptr || params.margin == nullptr ||
      params.loss == nullptr || (params.grad_student != nullptr && params.grad_scale == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = (params.numel + kMarginPartialL2Chunk - 1) / kMarginPartialL2Chunk;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  dispatch_dtype_pair(params.student.dtype, params.teacher.dtype, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    using Acc = acc_t<S, T>;
    margin_partial_l2_kernel<S, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const S*>(params.student.data), static_cast<const T*>(params.teacher.data),
        static_cast<const Acc*>(params.margin), params.numel, params.channels, params.channel_stride,
        params.grad_scale, static_cast<Acc*>(params.loss), params.reduce, static_cast<S*>(params.grad_student));
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace cuda
}  // namespace kdkernels
