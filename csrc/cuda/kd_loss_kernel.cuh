// Torch-free launcher of kdkernels::kd_loss_rows: per-position T²·KL(p_t ‖ p_s) of two
// (outer, classes, inner) views and its gradients (formulas in kd_loss_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "softmax_pair_walker.cuh"

namespace kdkernels {
namespace cuda {

// Student, teacher, mask, temperature, loss and gradients: the fields of SoftmaxPairParams.
using KdLossRowsParams = SoftmaxPairParams;

// Enqueues the kernel on `stream`. Never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status (cudaGetLastError()). Nothing is launched when there are no
// positions (outer * inner == 0).
cudaError_t launch_kd_loss_rows(const KdLossRowsParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
