// CUDA implementation of kdkernels::divergence_rows (declared in kdkernels/ops/divergences.py):
// check the tensors, allocate the outputs, and hand raw pointers, sizes, strides and the
// divergence's options to the torch-free launcher in divergences_kernel.cu on the current stream.
// Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "divergences_kernel.cuh"

namespace kdkernels {
namespace {

binding::TensorTriple divergence_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                           const c10::optional<at::Tensor>& mask, c10::string_view divergence,
                                           double beta, double temperature, bool scale_by_t2,
                                           c10::optional<double> student_softcap, c10::optional<double> teacher_softcap,
                                           c10::optional<double> student_logit_scale,
                                           c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
                                           bool student_grad, bool teacher_grad) {
  const at::Tensor mask_c = binding::check_softmax_pair_inputs(student, teacher, mask, temperature, grad_scale);
  cuda::DivergenceParams p;
  p.kind = binding::divergence_kind(divergence, beta);
  p.beta = beta;
  p.scale_by_t2 = scale_by_t2;
  p.student_transform = binding::logit_transform(student_logit_scale, student_softcap);
  p.teacher_transform = binding::logit_transform(teacher_logit_scale, teacher_softcap);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const binding::TensorTriple outputs = binding::softmax_pair_outputs(student, teacher, student_grad, teacher_grad);
  binding::fill_softmax_pair_params(p, student, teacher, mask_c, temperature, grad_scale, outputs, student_grad,
                                    teacher_grad);
  C10_CUDA_CHECK(cuda::launch_divergence_rows(p, binding::current_stream(student)));
  return outputs;
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("divergence_rows", &kdkernels::divergence_rows_cuda); }
