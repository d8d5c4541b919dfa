// Torch-free CUDA kernel of kdkernels::margin_partial_l2_elements: the Margin-ReLU partial L2 of
// Heo et al. (ICCV 2019) and its student gradient.
//
// Plain C++ with only <cuda_runtime_api.h> (and common.cuh's TypedInput), so that the binding compiles
// with the host compiler and `nvcc -c` compile-checks the kernel on a machine without a CUDA build
// of torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace kdkernels {
namespace cuda {

// Elements per block and per loss partial sum (reduce = true).
constexpr int64_t kMarginPartialL2Chunk = 4096;

// Student and teacher are read as flat arrays of `numel` elements in memory order (the binding
// checks they are dense with the same strides); element i lies in channel
// (i / channel_stride) % channels.
struct MarginPartialL2Params {
  TypedInput student;
  TypedInput teacher;
  int64_t numel = 0;

  const void* margin = nullptr;  // (channels,) contiguous, accumulation type (see loss_is_double)
  int64_t channels = 1;
  int64_t channel_stride = 1;

  const void* grad_scale = nullptr;  // one value of the accumulation type (fp32/fp64) on the device
  // reduce: ceil(numel / kMarginPartialL2Chunk) partial sums; else numel elementwise losses in
  // the student's memory order. Accumulation type.
  void* loss = nullptr;
  bool reduce = true;
  void* grad_student = nullptr;  // the student's dtype and memory order; nullptr: not requested
};

// Enqueues the kernel on `stream`. Never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status. Nothing is launched when numel == 0.
cudaError_t launch_margin_partial_l2(const MarginPartialL2Params& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
