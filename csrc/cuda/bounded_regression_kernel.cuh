// Torch-free CUDA kernel of kdkernels::bounded_regression_rows: the teacher-bounded regression loss
// of Chen et al. (NeurIPS 2017) per row and its student gradient.
//
// Plain C++ with only <cuda_runtime_api.h> (and common.cuh's DType), so that the binding compiles
// with the host compiler and `nvcc -c` compile-checks the kernel on a machine without a CUDA build
// of torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace kdkernels {
namespace cuda {

// Rows per block and per loss partial sum (reduce = true).
constexpr int64_t kBoundedRegressionRowChunk = 1024;

// student, teacher and target: (rows, K) views of one dtype with element strides (row, coordinate).
struct BoundedRegressionParams {
  DType dtype = DType::kFloat;
  const void* student = nullptr;
  int64_t student_strides[2] = {0, 0};
  const void* teacher = nullptr;
  int64_t teacher_strides[2] = {0, 0};
  const void* target = nullptr;
  int64_t target_strides[2] = {0, 0};
  int64_t rows = 0;
  int64_t coords = 0;  // K

  const bool* mask = nullptr;  // (rows,) contiguous, or nullptr: every row counts
  double margin = 0.0;
  const void* grad_scale = nullptr;  // one value of the accumulation type (fp32/fp64) on the device
  // reduce: ceil(rows / kBoundedRegressionRowChunk) partial sums; else one loss per row.
  // Accumulation type (double iff dtype is double).
  void* loss = nullptr;
  bool reduce = true;
  void* grad_student = nullptr;  // (rows, K) contiguous, the inputs' dtype; nullptr: not requested
};

// Enqueues the kernel on `stream`. Never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status. Nothing is launched when rows == 0.
cudaError_t launch_bounded_regression(const BoundedRegressionParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
