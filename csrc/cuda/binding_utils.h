// Checks and conversions shared by the torch bindings of the CUDA kernels (csrc/cuda/*bindings.cpp):
// tensor dtype -> the launchers' DType, device checks, gradient buffers. Header-only; compiled only
// in a CUDA build.
#pragma once

#include <ATen/ATen.h>

#include "common.cuh"  // cuda::DType

namespace kdkernels {
namespace binding {

inline cuda::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat;
    case at::kDouble:
      return cuda::DType::kDouble;
    default:
      break;
  }
  TORCH_CHECK(false, name, ": expected float16, bfloat16, float32 or float64, got ", t.scalar_type());
  return cuda::DType::kFloat;  // not reached
}

inline void check_cuda_on(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

inline void check_grad_scale(const at::Tensor& grad_scale, const at::Tensor& ref) {
  check_cuda_on(grad_scale, ref, "grad_scale");
  TORCH_CHECK((grad_scale.scalar_type() == at::kFloat || grad_scale.scalar_type() == at::kDouble) &&
                  grad_scale.numel() == 1,
              "grad_scale: expected a one-element float32 or float64 tensor, got ", grad_scale.scalar_type(),
              " of shape ", grad_scale.sizes());
}

// The device pointer the kernels read grad_scale from, as their accumulation type: grad_scale must
// have the loss's dtype (float32; float64 when an input is float64, so fp64 gradients are scaled in
// fp64).
inline const void* grad_scale_ptr(const at::Tensor& grad_scale, const at::Tensor& loss) {
  TORCH_CHECK(grad_scale.scalar_type() == loss.scalar_type(), "grad_scale: expected dtype ", loss.scalar_type(),
              " (the accumulation dtype), got ", grad_scale.scalar_type());
  return grad_scale.data_ptr();
}

// A gradient buffer (the input's dtype; strides as torch.empty_like gives them), or an empty
// tensor when the gradient is not requested.
inline at::Tensor gradient_buffer(const at::Tensor& input, bool wanted) {
  return wanted ? at::empty_like(input) : at::empty({0}, input.options());
}

}  // namespace binding
}  // namespace kdkernels
