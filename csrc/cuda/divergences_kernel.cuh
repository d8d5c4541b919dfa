// Torch-free launcher of kdkernels::divergence_rows: the LLM divergence family (forward / reverse
// KL, generalized JSD, skew KLs, total variation) per position of two (outer, classes, inner)
// views, with logit transforms, and its gradients (formulas in divergences_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "divergence_terms.cuh"
#include "softmax_pair_walker.cuh"

namespace kdkernels {
namespace cuda {

// The softmax pair arguments (student, teacher, mask, temperature, grad_scale, loss, gradients)
// and the divergence's own.
struct DivergenceParams : SoftmaxPairParams {
  DivergenceKind kind = DivergenceKind::kForwardKl;
  double beta = 0.5;
  bool scale_by_t2 = true;  // the loss (and its gradients) times T²
  LogitTransformParams student_transform;
  LogitTransformParams teacher_transform;
};

// Enqueues the kernel on `stream`. Never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status (cudaGetLastError()). Nothing is launched when there are no
// positions (outer * inner == 0).
cudaError_t launch_divergence_rows(const DivergenceParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
