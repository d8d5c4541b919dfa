// CUDA implementations of the kdkernels ops: check the tensors, allocate the outputs, and hand raw
// pointers, sizes and strides to the torch-free launchers in kd_loss_kernel.cu / kl_div_kernel.cu
// on the current stream. Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (alias of c10::cuda's)
#include <torch/library.h>

#include "../kdkernels.h"
#include "binding_utils.h"
#include "kd_loss_kernel.cuh"
#include "kl_div_kernel.cuh"

namespace kdkernels {

TensorTriple kd_loss_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
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

  const int64_t outer = student.size(0);
  const int64_t classes = student.size(1);
  const int64_t inner = student.size(2);

  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    binding::check_cuda_on(m, student, "mask");
    TORCH_CHECK(m.scalar_type() == at::kBool, "mask: expected a bool tensor, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == outer && m.size(1) == inner, "mask: expected shape (", outer, ", ",
                inner, "), got ", m.sizes());
    TORCH_CHECK(m.is_contiguous(), "mask: expected a contiguous tensor");
    mask_ptr = m.data_ptr<bool>();
  }

  const c10::cuda::CUDAGuard device_guard(student.device());
  const bool wide = cuda::loss_is_double(student_dtype, teacher_dtype);
  at::Tensor loss = at::empty({outer, inner}, student.options().dtype(wide ? at::kDouble : at::kFloat));
  at::Tensor grad_student = binding::gradient_buffer(student, student_grad);
  at::Tensor grad_teacher = binding::gradient_buffer(teacher, teacher_grad);

  cuda::KdLossRowsParams p;
  p.student = student.data_ptr();
  p.student_dtype = student_dtype;
  p.teacher = teacher.data_ptr();
  p.teacher_dtype = teacher_dtype;
  for (int d = 0; d < 3; ++d) {
    p.student_strides[d] = student.stride(d);
    p.teacher_strides[d] = teacher.stride(d);
  }
  p.outer = outer;
  p.classes = classes;
  p.inner = inner;
  p.mask = mask_ptr;
  p.grad_scale = binding::grad_scale_ptr(grad_scale, loss);
  p.temperature = temperature;
  p.loss = loss.data_ptr();
  if (student_grad) {
    p.grad_student = grad_student.data_ptr();
    for (int d = 0; d < 3; ++d) p.grad_student_strides[d] = grad_student.stride(d);
  }
  if (teacher_grad) {
    p.grad_teacher = grad_teacher.data_ptr();
    for (int d = 0; d < 3; ++d) p.grad_teacher_strides[d] = grad_teacher.stride(d);
  }
  C10_CUDA_CHECK(cuda::launch_kd_loss_rows(p, at::cuda::getCurrentCUDAStream().stream()));
  return {loss, grad_student, grad_teacher};
}

TensorTriple kl_div_pointwise_cuda(const at::Tensor& input, const at::Tensor& target, bool log_target,
                                   const at::Tensor& grad_scale, bool reduce, bool input_grad, bool target_grad) {
  TORCH_CHECK(input.is_cuda(), "input: expected a CUDA tensor, got device ", input.device());
  binding::check_cuda_on(target, input, "target");
  binding::check_grad_scale(grad_scale, input);
  TORCH_CHECK(target.sizes() == input.sizes(), "target: expected shape ", input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(input.is_contiguous(), "input: expected a contiguous tensor");
  TORCH_CHECK(target.is_contiguous(), "target: expected a contiguous tensor");
  const cuda::DType input_dtype = binding::to_dtype(input, "input");
  const cuda::DType target_dtype = binding::to_dtype(target, "target");
  const int64_t numel = input.numel();

  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::ScalarType loss_type = cuda::loss_is_double(input_dtype, target_dtype) ? at::kDouble : at::kFloat;
  at::Tensor loss = reduce ? at::empty({cuda::kl_div_num_partials(numel)}, input.options().dtype(loss_type))
                           : at::empty(input.sizes(), input.options().dtype(loss_type));
  at::Tensor grad_input = binding::gradient_buffer(input, input_grad);
  at::Tensor grad_target = binding::gradient_buffer(target, target_grad);

  cuda::KlDivParams p;
  p.input = input.data_ptr();
  p.input_dtype = input_dtype;
  p.target = target.data_ptr();
  p.target_dtype = target_dtype;
  p.numel = numel;
  p.log_target = log_target;
  p.reduce = reduce;
  p.grad_scale = binding::grad_scale_ptr(grad_scale, loss);
  p.loss = loss.data_ptr();
  p.grad_input = input_grad ? grad_input.data_ptr() : nullptr;
  p.grad_target = target_grad ? grad_target.data_ptr() : nullptr;
  C10_CUDA_CHECK(cuda::launch_kl_div_pointwise(p, at::cuda::getCurrentCUDAStream().stream()));
  return {loss, grad_input, grad_target};
}

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("kd_loss_rows", &kd_loss_rows_cuda);
  m.impl("kl_div_pointwise", &kl_div_pointwise_cuda);
}

}  // namespace kdkernels
