// Torch-free CUDA kernel of kdkernels::kl_div_pointwise (torch.nn.functional.kl_div, fused with its
// gradients). Plain C++ header (included by kl_div_bindings.cpp too): parameters and launcher only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"  // TypedInput, loss_is_double

namespace kdkernels {
namespace cuda {

// Elements summed into one partial sum when reduce == true. The partition depends only on the
// element count, so the partial sums (and the caller's torch.sum over them) repeat bit for bit.
constexpr int64_t kKlDivChunk = 8192;
// At most this many partial sums (= thread blocks); blocks loop over chunks beyond that.
constexpr int64_t kKlDivMaxPartials = 4096;

// Length of the partial-sum vector for `numel` elements (0 for an empty input): the binding
// allocates it, the kernel writes every entry.
inline int64_t kl_div_num_partials(int64_t numel) {
  const int64_t chunks = (numel + kKlDivChunk - 1) / kKlDivChunk;
  return chunks < kKlDivMaxPartials ? chunks : kKlDivMaxPartials;
}

// input x and target y: contiguous, `numel` elements each, dtypes may differ.
//   log_target == false: loss = xlogy(y, y) − y·x,  grad_input = gs·(−y),
//                        grad_target = gs·(log y + 1 − x) where y > 0, else 0
//   log_target == true:  loss = e^y·(y − x),        grad_input = gs·(−e^y),
//                        grad_target = gs·e^y·(y − x + 1)
// gs = *grad_scale (device). `loss` is float (double if either input is double): with
// reduce == false, `numel` elementwise values; with reduce == true, kl_div_num_partials(numel)
// partial sums over fixed chunks. Gradients have the dtype of their input (nullptr: not requested).
struct KlDivParams {
  TypedInput input;
  TypedInput target;
  int64_t numel = 0;
  bool log_target = false;
  bool reduce = false;
  const void* grad_scale = nullptr;  // one value of the accumulation type (fp32/fp64) on the device
  void* loss = nullptr;
  void* grad_input = nullptr;
  void* grad_target = nullptr;
};

// Enqueues the kernel on `stream`; never synchronises. cudaErrorInvalidValue for bad arguments,
// else the launch status. Nothing is launched when numel == 0.
cudaError_t launch_kl_div_pointwise(const KlDivParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
