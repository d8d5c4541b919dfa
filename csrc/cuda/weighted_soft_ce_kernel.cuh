// Torch-free CUDA kernels of kdkernels::weighted_soft_ce_rows: per position
// ℓ = −Σ_c w_c p_t,c log p_s,c (p = softmax(z / T)) and its gradients.
//
// Plain C++ with only <cuda_runtime_api.h> (through kd_loss_kernel.cuh, whose DType enum and
// device helpers are shared), so that the binding compiles with the host compiler and `nvcc -c`
// compile-checks the kernels on a machine without a CUDA build of torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kd_loss_kernel.cuh"

namespace kdkernels {
namespace cuda {

// Everything weighted_soft_ce_rows needs, as raw pointers, sizes and element strides (int64).
// `student`/`teacher` are (outer, classes, inner) views of any strides and of possibly different
// dtypes; the loss is (outer, inner) contiguous in the accumulation type (double iff an input is
// double, see loss_is_double), and so is `class_weight` ((classes,) contiguous, or nullptr = ones).
struct WeightedSoftCeParams {
  const void* student = nullptr;
  DType student_dtype = DType::kFloat;
  int64_t student_strides[3] = {0, 0, 0};

  const void* teacher = nullptr;
  DType teacher_dtype = DType::kFloat;
  int64_t teacher_strides[3] = {0, 0, 0};

  int64_t outer = 0;
  int64_t classes = 0;
  int64_t inner = 0;

  const void* class_weight = nullptr;  // accumulation type, (classes,) contiguous; nullptr = ones
  const bool* mask = nullptr;          // (outer, inner) contiguous; nullptr = every position counts
  const void* grad_scale = nullptr;   // one value of the accumulation type (fp32/fp64) on the device
  double temperature = 1.0;

  void* loss = nullptr;  // (outer, inner) contiguous, accumulation type

  // Gradients in the input's dtype with their own strides; nullptr = not requested.
  void* grad_student = nullptr;
  int64_t grad_student_strides[3] = {0, 0, 0};
  void* grad_teacher = nullptr;
  int64_t grad_teacher_strides[3] = {0, 0, 0};
};

// Enqueues the kernel on `stream`; never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status. Nothing is launched when there are no positions.
cudaError_t launch_weighted_soft_ce_rows(const WeightedSoftCeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
