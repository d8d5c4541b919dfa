// CUDA implementation of kdkernels::sparse_divergence_rows (declared in
// kdkernels/ops/sparse_divergences.py): check the tensors, allocate the outputs, and hand raw
// pointers, sizes, strides and the options to the torch-free launcher in
// sparse_divergences_kernel.cu on the current stream. Compiled only in a CUDA build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "binding_utils.h"
#include "sparse_divergences_kernel.cuh"

namespace kdkernels {
namespace {

binding::TensorTriple sparse_divergence_rows_cuda(
    const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
    const c10::optional<at::Tensor>& mask, c10::string_view divergence, double beta, double temperature,
    bool scale_by_t2, c10::string_view tail, c10::string_view teacher_values, double stored_temperature,
    c10::optional<double> student_softcap, c10::optional<double> teacher_softcap,
    c10::optional<double> student_logit_scale, c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
    bool student_grad, bool values_grad) {
  TORCH_CHECK(student.is_cuda(), "student: expected a CUDA tensor, got device ", student.device());
  binding::check_cuda_on(values, student, "values");
  binding::check_cuda_on(indices, student, "indices");
  binding::check_grad_scale(grad_scale, student);
  TORCH_CHECK(student.dim() == 3, "student: expected a 3-d (outer, classes, inner) view, got shape ", student.sizes());
  TORCH_CHECK(values.dim() == 3 && values.size(0) == student.size(0) && values.size(2) == student.size(2),
              "values: expected a 3-d (", student.size(0), ", k, ", student.size(2), ") view, got shape ",
              values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices: expected shape ", values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices: expected int64, got ", indices.scalar_type());
  TORCH_CHECK(temperature > 0.0, "temperature: expected a positive value, got ", temperature);
  TORCH_CHECK(stored_temperature > 0.0, "stored_temperature: expected a positive value, got ", stored_temperature);
  const std::string tail_s(tail), values_s(teacher_values);
  TORCH_CHECK(tail_s == "renormalize" || tail_s == "tail_bucket", "tail: expected 'renormalize' or 'tail_bucket', got '",
              tail_s, "'");
  TORCH_CHECK(values_s == "logits" || values_s == "logprobs", "teacher_values: expected 'logits' or 'logprobs', got '",
              values_s, "'");
  cuda::SparseDivergenceParams p;
  p.student = binding::typed_input(student, "student");
  p.values = binding::typed_input(values, "values");
  p.kind = binding::divergence_kind(divergence, beta);
  p.beta = beta;
  p.temperature = temperature;
  p.stored_temperature = stored_temperature;
  p.scale_by_t2 = scale_by_t2;
  p.tail_bucket = tail_s == "tail_bucket";
  p.logprob_values = values_s == "logprobs";
  p.student_transform = binding::logit_transform(student_logit_scale, student_softcap);
  p.teacher_transform = binding::logit_transform(teacher_logit_scale, teacher_softcap);
  const at::Tensor mask_c = binding::check_position_mask(mask, student);

  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor loss = at::empty({student.size(0), student.size(2)},
                              student.options().dtype(binding::accumulation_type(student, values)));
  at::Tensor grad_student = binding::gradient_buffer(student, student_grad);
  at::Tensor grad_values = binding::gradient_buffer(values, values_grad);
  p.indices = indices.data_ptr<int64_t>();
  binding::copy_strides(student, p.student_strides);
  binding::copy_strides(values, p.values_strides);
  binding::copy_strides(indices, p.indices_strides);
  p.outer = student.size(0);
  p.classes = student.size(1);
  p.inner = student.size(2);
  p.k = values.size(1);
  p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  p.grad_scale = binding::grad_scale_ptr(grad_scale, loss);
  p.loss = loss.data_ptr();
  if (student_grad) {
    p.grad_student = grad_student.data_ptr();
    binding::copy_strides(grad_student, p.grad_student_strides);
  }
  if (values_grad) {
    p.grad_values = grad_values.data_ptr();
    binding::copy_strides(grad_values, p.grad_values_strides);
  }
  C10_CUDA_CHECK(cuda::launch_sparse_divergence_rows(p, binding::current_stream(student)));
  return {loss, grad_student, grad_values};
}

}  // namespace
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("sparse_divergence_rows", &kdkernels::sparse_divergence_rows_cuda);
}
