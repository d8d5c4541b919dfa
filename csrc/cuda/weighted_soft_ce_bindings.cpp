// CUDA implementation of kdkernels::weighted_soft_ce_rows: check the tensors, allocate the outputs,
// and hand raw pointers, sizes and strides to the torch-free launcher in weighted_soft_ce_kernel.cu
// on the current stream. Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kdkernels.h"
#include "binding_utils.h"
#include "weighted_soft_ce_kernel.cuh"

namespace kdkernels {

namespace {

void wsce_copy_strides(const at::Tensor& t, int64_t* out) {
  for (int d = 0; d < 3; ++d) out[d] = t.stride(d);
}

}  // namespace

TensorTriple weighted_soft_ce_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& class_weight,
                                        const c10::optional<at::Tensor>& mask, double temperature,
                                        const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  TORCH_CHECK(student.is_cuda(), "student: expected a CUDA tensor, got device ", student.device());
  binding::check_cuda_on(teacher, student, "teacher");
  binding::check_grad_scale(grad_scale, student);
  TORCH_CHECK(student.dim() == 3, "student: expected a 3-d (outer, classes, inner) view, got shape ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher: expected shape ", student.sizes(), ", got ",
              teacher.sizes());
  TORCH_CHECK(temperature > 0.0, "temperature: expected a positive value, got ", temperature);
  const cuda::DType student_dtype = binding::to_dtype(student, "student");
  const cuda::DType teacher_dtype = binding::to_dtype(teacher, "teacher");
  const int64_t outer = student.size(0), classes = student.size(1), inner = student.size(2);
  const at::ScalarType acc_type = cuda::loss_is_double(student_dtype, teacher_dtype) ? at::kDouble : at::kFloat;

  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor weight;
  if (class_weight.has_value()) {
    binding::check_cuda_on(*class_weight, student, "class_weight");
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == classes, "class_weight: expected shape (",
                classes, "), got ", class_weight->sizes());
    weight = class_weight->to(acc_type).contiguous();  // C elements: a no-op or a tiny kernel, no sync
  }
  at::Tensor mask_c;
  if (mask.has_value()) {
    binding::check_cuda_on(*mask, student, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == outer && mask->size(1) == inner, "mask: expected shape (",
                outer, ", ", inner, "), got ", mask->sizes());
    mask_c = mask->contiguous();
  }

  at::Tensor loss = at::empty({outer, inner}, student.options().dtype(acc_type));
  at::Tensor grad_student = binding::gradient_buffer(student, student_grad);
  at::Tensor grad_teacher = binding::gradient_buffer(teacher, teacher_grad);
  if (outer * inner == 0) return {loss, grad_student, grad_teacher};
  if (classes == 0) {
    loss.zero_();
    return {loss, grad_student, grad_teacher};
  }

  cuda::WeightedSoftCeParams p;
  p.student = student.data_ptr();
  p.student_dtype = student_dtype;
  wsce_copy_strides(student, p.student_strides);
  p.teacher = teacher.data_ptr();
  p.teacher_dtype = teacher_dtype;
  wsce_copy_strides(teacher, p.teacher_strides);
  p.outer = outer;
  p.classes = classes;
  p.inner = inner;
  p.class_weight = weight.defined() ? weight.data_ptr() : nullptr;
  p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  p.grad_scale = binding::grad_scale_ptr(grad_scale, loss);
  p.temperature = temperature;
  p.loss = loss.data_ptr();
  if (student_grad) {
    p.grad_student = grad_student.data_ptr();
    wsce_copy_strides(grad_student, p.grad_student_strides);
  }
  if (teacher_grad) {
    p.grad_teacher = grad_teacher.data_ptr();
    wsce_copy_strides(grad_teacher, p.grad_teacher_strides);
  }
  C10_CUDA_CHECK(cuda::launch_weighted_soft_ce_rows(p, at::cuda::getCurrentCUDAStream().stream()));
  return {loss, grad_student, grad_teacher};
}

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("weighted_soft_ce_rows", &weighted_soft_ce_rows_cuda); }

}  // namespace kdkernels
