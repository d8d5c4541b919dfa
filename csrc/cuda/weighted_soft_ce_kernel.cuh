// Torch-free launcher of kdkernels::weighted_soft_ce_rows: per position
// ℓ = −Σ_c w_c p_t,c log p_s,c (p = softmax(z / T)) of two (outer, classes, inner) views and its
// gradients (formulas in weighted_soft_ce_kernel.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "softmax_pair_walker.cuh"

namespace kdkernels {
namespace cuda {

// The fields of SoftmaxPairParams (the loss in the accumulation type, see loss_is_double) and the
// class weights.
struct WeightedSoftCeParams : SoftmaxPairParams {
  const void* class_weight = nullptr;  // accumulation type, (classes,) contiguous; nullptr = ones
};

// Enqueues the kernel on `stream`; never synchronises. Returns cudaErrorInvalidValue for bad
// arguments, else the launch status. Nothing is launched when there are no positions.
cudaError_t launch_weighted_soft_ce_rows(const WeightedSoftCeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
