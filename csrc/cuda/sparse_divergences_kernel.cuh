// Torch-free launcher of kdkernels::sparse_divergence_rows: the LLM divergence family between a
// student's logits (outer, classes, inner) and a sparse teacher, its top-k (indices, values)
// (outer, k, inner), per position, with the gradients of the student's logits (dense) and of the
// values (formulas in sparse_divergences_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"
#include "divergence_terms.cuh"

namespace kdkernels {
namespace cuda {

// Raw pointers, sizes and element strides (int64) of (outer, ·, inner) views of any strides.
struct SparseDivergenceParams {
  TypedInput student;  // (outer, classes, inner)
  int64_t student_strides[3] = {0, 0, 0};
  TypedInput values;  // (outer, k, inner): teacher logits or log-probs
  int64_t values_strides[3] = {0, 0, 0};
  const int64_t* indices = nullptr;  // (outer, k, inner): class ids in [0, classes), distinct per position
  int64_t indices_strides[3] = {0, 0, 0};

  int64_t outer = 0;
  int64_t classes = 0;
  int64_t inner = 0;
  int64_t k = 0;

  const bool* mask = nullptr;        // (outer, inner) contiguous, or nullptr for "all positions"
  const void* grad_scale = nullptr;  // one value of the accumulation type on the device

  DivergenceKind kind = DivergenceKind::kForwardKl;
  double beta = 0.5;
  double temperature = 1.0;
  double stored_temperature = 1.0;  // T₀ of log-prob values (re-tempered by T₀/T)
  bool scale_by_t2 = true;
  bool tail_bucket = false;     // k + 1 buckets (the missing mass as one more), else renormalize over the k
  bool logprob_values = false;  // values are log-probs at T₀, else (untransformed) logits
  LogitTransformParams student_transform;
  LogitTransformParams teacher_transform;  // logit values only

  // (outer, inner) contiguous; float, or double when student or values is double.
  void* loss = nullptr;
  // Gradients in the input's dtype with their own strides; nullptr: not requested.
  void* grad_student = nullptr;
  int64_t grad_student_strides[3] = {0, 0, 0};
  void* grad_values = nullptr;
  int64_t grad_values_strides[3] = {0, 0, 0};
};

// cudaErrorInvalidValue for arguments no launch can take, else cudaSuccess.
inline cudaError_t check_sparse_divergence_params(const SparseDivergenceParams& p) {
  if (p.outer < 0 || p.classes < 0 || p.inner < 0 || p.k < 0 || !(p.temperature > 0.0) ||
      !(p.stored_temperature > 0.0))
    return cudaErrorInvalidValue;
  const int64_t positions = p.outer * p.inner;
  if (positions > 0 && p.loss == nullptr) return cudaErrorInvalidValue;
  if (positions > 0 && p.k > 0 &&
      (p.values.data == nullptr || p.indices == nullptr || (p.classes > 0 && p.student.data == nullptr) ||
       ((p.grad_student != nullptr || p.grad_values != nullptr) && p.grad_scale == nullptr)))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Enqueues the kernel on `stream`. Never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status. Nothing is launched when there are no positions.
cudaError_t launch_sparse_divergence_rows(const SparseDivergenceParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
