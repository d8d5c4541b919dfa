// CUDA implementation of kdkernels::kl_div_pointwise: check the tensors, allocate the outputs, and
// hand raw pointers and sizes to the torch-free launcher in kl_div_kernel.cu on the current stream.
// Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "kl_div_kernel.cuh"

namespace kdkernels {
namespace {

binding::TensorTriple kl_div_pointwise_cuda(const at::Tensor& input, const at::Tensor& target, bool log_target,
                                            const at::Tensor& grad_scale, bool reduce, bool input_grad,
                                            bool target_grad) {
  TORCH_CHECK(input.is_cuda(), "input: expected a CUDA tensor, got device ", input.device());
  binding::check_cuda_on(target, input, "target");
  binding::check_grad_scale(grad_scale, input);
  TORCH_CHECK(target.sizes() == input.sizes(), "target: expected shape ", input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(input.is_contiguous(), "input: expected a contiguous tensor");
  TORCH_CHECK(target.is_contiguous(), "target: expected a contiguous tensor");
  cuda::KlDivParams p;
  p.input = binding::typed_input(input, "input");
  p.target = binding::typed_input(target, "target");
  p.numel = input.numel();
  p.log_target = log_target;
  p.reduce = reduce;

  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::ScalarType loss_type = cuda::loss_is_double(p.input.dtype, p.target.dtype) ? at::kDouble : at::kFloat;
  at::Tensor loss = reduce ? at::empty({cuda::kl_div_num_partials(p.numel)}, input.options().dtype(loss_type))
                           : at::empty(input.sizes(), input.options().dtype(loss_type));
  at::Tensor grad_input = binding::gradient_buffer(input, input_grad);
  at::Tensor grad_target = binding::gradient_buffer(target, target_grad);
  p.grad_scale = binding::grad_scale_ptr(grad_scale, loss);
  p.loss = loss.data_ptr();
  p.grad_input = input_grad ? grad_input.data_ptr() : nullptr;
  p.grad_target = target_grad ? grad_target.data_ptr() : nullptr;
  C10_CUDA_CHECK(cuda::launch_kl_div_pointwise(p, binding::current_stream(input)));
  return {loss, grad_input, grad_target};
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("kl_div_pointwise", &kdkernels::kl_div_pointwise_cuda); }
