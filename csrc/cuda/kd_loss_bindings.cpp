// CUDA implementation of kdkernels::kd_loss_rows: check the tensors, allocate the outputs, and hand
// raw pointers, sizes and strides to the torch-free launcher in kd_loss_kernel.cu on the current
// stream. Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "kd_loss_kernel.cuh"

namespace kdkernels {
namespace {

binding::TensorTriple kd_loss_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& mask, double temperature,
                                        const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  const at::Tensor mask_c = binding::check_softmax_pair_inputs(student, teacher, mask, temperature, grad_scale);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const binding::TensorTriple outputs = binding::softmax_pair_outputs(student, teacher, student_grad, teacher_grad);
  cuda::KdLossRowsParams p;
  binding::fill_softmax_pair_params(p, student, teacher, mask_c, temperature, grad_scale, outputs, student_grad,
                                    teacher_grad);
  C10_CUDA_CHECK(cuda::launch_kd_loss_rows(p, binding::current_stream(student)));
  return outputs;
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("kd_loss_rows", &kdkernels::kd_loss_rows_cuda); }
