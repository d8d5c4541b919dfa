// CUDA implementation of kdkernels::margin_partial_l2_elements: check the tensors, allocate the
// outputs, and hand raw pointers and sizes to the torch-free launcher in margin_partial_l2_kernel.cu
// on the current stream. Compiled only in a CUDA build (setup.py defines KDKERNELS_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "margin_partial_l2_kernel.cuh"

namespace kdkernels {

namespace {

// Same sizes and, on every dimension longer than 1, the same strides; dense in memory.
bool mpl2_same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || !a.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> margin_partial_l2_elements_cuda(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const at::Tensor& margin, int64_t channel_stride,
                                                                   const at::Tensor& grad_scale, bool reduce,
                                                                   bool student_grad) {
  TORCH_CHECK(student.is_cuda(), "student: expected a CUDA tensor, got device ", student.device());
  binding::check_cuda_on(teacher, student, "teacher");
  binding::check_cuda_on(margin, student, "margin");
  binding::check_grad_scale(grad_scale, student);
  TORCH_CHECK(mpl2_same_dense_layout(student, teacher), "margin_partial_l2_elements: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must be dense with the same strides");
  const at::ScalarType acc_dtype = binding::accumulation_type(student, teacher);
  TORCH_CHECK(margin.dim() == 1 && margin.is_contiguous() && margin.scalar_type() == acc_dtype,
              "margin: expected a contiguous 1-d ", acc_dtype, " tensor, got ", margin.scalar_type(), " of shape ",
              margin.sizes());
  TORCH_CHECK(channel_stride >= 1, "channel_stride: expected >= 1, got ", channel_stride);
  const int64_t N = student.numel();
  TORCH_CHECK(N == 0 || margin.numel() >= 1, "margin: empty for a non-empty input");

  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_options = student.options().dtype(acc_dtype);
  at::Tensor loss = reduce ? binding::partial_sums_buffer(N, cuda::kMarginPartialL2Chunk, acc_options)
                           : at::empty_like(student, acc_options);
  at::Tensor grad = binding::gradient_buffer(student, student_grad);
  if (N == 0) return {loss, grad};
  cuda::MarginPartialL2Params p;
  p.student = binding::typed_input(student, "student");
  p.teacher = binding::typed_input(teacher, "teacher");
  p.numel = N;
  p.margin = margin.data_ptr();
  p.channels = margin.numel();
  p.channel_stride = channel_stride;
  binding::fill_student_grad_outputs(p, grad_scale, loss, reduce, grad, student_grad);
  C10_CUDA_CHECK(cuda::launch_margin_partial_l2(p, binding::current_stream(student)));
  return {loss, grad};
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("margin_partial_l2_elements", &kdkernels::margin_partial_l2_elements_cuda);
}
