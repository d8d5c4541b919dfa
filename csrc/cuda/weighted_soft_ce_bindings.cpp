// CUDA implementation of kdkernels::weighted_soft_ce_rows: check the tensors, allocate the outputs,
// and hand raw pointers, sizes and strides to the torch-free launcher in weighted_soft_ce_kernel.cu
// on the current stream. Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "weighted_soft_ce_kernel.cuh"

namespace kdkernels {
namespace {

binding::TensorTriple weighted_soft_ce_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                 const c10::optional<at::Tensor>& class_weight,
                                                 const c10::optional<at::Tensor>& mask, double temperature,
                                                 const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  const at::Tensor mask_c = binding::check_softmax_pair_inputs(student, teacher, mask, temperature, grad_scale);
  const int64_t classes = student.size(1);
  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor weight;
  if (class_weight.has_value()) {
    binding::check_cuda_on(*class_weight, student, "class_weight");
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == classes, "class_weight: expected shape (",
                classes, "), got ", class_weight->sizes());
    // C elements: a no-op or a tiny kernel, no sync
    weight = class_weight->to(binding::accumulation_type(student, teacher)).contiguous();
  }
  const binding::TensorTriple outputs = binding::softmax_pair_outputs(student, teacher, student_grad, teacher_grad);
  cuda::WeightedSoftCeParams p;
  binding::fill_softmax_pair_params(p, student, teacher, mask_c, temperature, grad_scale, outputs, student_grad,
                                    teacher_grad);
  p.class_weight = weight.defined() ? weight.data_ptr() : nullptr;
  C10_CUDA_CHECK(cuda::launch_weighted_soft_ce_rows(p, binding::current_stream(student)));
  return outputs;
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("weighted_soft_ce_rows", &kdkernels::weighted_soft_ce_rows_cuda);
}
