// CUDA implementation of kdkernels::bounded_regression_rows: check the tensors, allocate the
// outputs, and hand raw pointers, sizes and strides to the torch-free launcher in
// bounded_regression_kernel.cu on the current stream. Compiled only in a CUDA build (setup.py
// defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "bounded_regression_kernel.cuh"

namespace kdkernels {
namespace {

std::tuple<at::Tensor, at::Tensor> bounded_regression_rows_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                const at::Tensor& target,
                                                                const c10::optional<at::Tensor>& mask, double margin,
                                                                const at::Tensor& grad_scale, bool reduce,
                                                                bool student_grad) {
  TORCH_CHECK(student.is_cuda(), "student: expected a CUDA tensor, got device ", student.device());
  binding::check_cuda_on(teacher, student, "teacher");
  binding::check_cuda_on(target, student, "target");
  binding::check_grad_scale(grad_scale, student);
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes() && target.sizes() == student.sizes(),
              "bounded_regression_rows: expected (rows, K) student, teacher and target of one shape, got ",
              student.sizes(), ", ", teacher.sizes(), ", ", target.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type() && target.scalar_type() == student.scalar_type(),
              "bounded_regression_rows: expected student, teacher and target of one dtype");
  const cuda::DType dtype = binding::to_dtype(student, "student");
  const int64_t R = student.size(0);
  at::Tensor mask_c;
  if (mask.has_value()) {
    binding::check_cuda_on(*mask, student, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == R, "mask: expected a bool tensor of ", R,
                " rows, got ", mask->scalar_type(), " of shape ", mask->sizes());
    mask_c = mask->contiguous();
  }

  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_options = student.options().dtype(dtype == cuda::DType::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = reduce ? binding::partial_sums_buffer(R, cuda::kBoundedRegressionRowChunk, acc_options)
                           : at::empty({R}, acc_options);
  at::Tensor grad = student_grad ? at::empty({R, student.size(1)}, student.options()) : at::empty({0}, student.options());
  if (R == 0) return {loss, grad};
  cuda::BoundedRegressionParams p;
  p.dtype = dtype;
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.target = target.data_ptr();
  for (int d = 0; d < 2; ++d) {
    p.student_strides[d] = student.stride(d);
    p.teacher_strides[d] = teacher.stride(d);
    p.target_strides[d] = target.stride(d);
  }
  p.rows = R;
  p.coords = student.size(1);
  p.mask = mask.has_value() ? mask_c.data_ptr<bool>() : nullptr;
  p.margin = margin;
  binding::fill_student_grad_outputs(p, grad_scale, loss, reduce, grad, student_grad);
  C10_CUDA_CHECK(cuda::launch_bounded_regression(p, binding::current_stream(student)));
  return {loss, grad};
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("bounded_regression_rows", &kdkernels::bounded_regression_rows_cuda);
}
