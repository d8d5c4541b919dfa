// Checks and conversions shared by the torch bindings of the CUDA kernels (csrc/cuda/*_bindings.cpp):
// tensor dtype -> the launchers' DType and TypedInput, device checks, the current stream, loss and
// gradient buffers, the arguments every softmax pair loss (kd_loss_rows, weighted_soft_ce_rows,
// divergence_rows) takes, and the LLM divergences' options. Header-only; compiled only in a CUDA build.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

#include "common.cuh"               // cuda::DType
#include "divergence_terms.cuh"     // cuda::DivergenceKind, cuda::LogitTransformParams
#include "softmax_pair_walker.cuh"  // cuda::SoftmaxPairParams (its host part)

namespace kdkernels {
namespace binding {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

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

// A checked input tensor as the launchers take it: its data pointer and element type.
inline cuda::TypedInput typed_input(const at::Tensor& t, const char* name) { return {t.data_ptr(), to_dtype(t, name)}; }

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

// The stream the launchers enqueue on: the current CUDA stream of t's device.
inline cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

// The partial-sum loss of a chunked op (reduce = true) over `items` items: one entry per chunk
// of `chunk` items, and a single zero when there are no items (nothing is launched then).
inline at::Tensor partial_sums_buffer(int64_t items, int64_t chunk, const at::TensorOptions& options) {
  if (items == 0) return at::zeros({1}, options);
  return at::empty({(items + chunk - 1) / chunk}, options);
}

// A gradient buffer (the input's dtype; strides as torch.empty_like gives them), or an empty
// tensor when the gradient is not requested.
inline at::Tensor gradient_buffer(const at::Tensor& input, bool wanted) {
  return wanted ? at::empty_like(input) : at::empty({0}, input.options());
}

// Fills the outputs of a launcher whose only gradient is the student's (bounded_regression,
// margin_partial_l2): grad_scale as the loss's dtype, the loss (partial sums when `reduce`), and
// the student's gradient buffer, or nullptr when it is not requested.
template <typename Params>
void fill_student_grad_outputs(Params& p, const at::Tensor& grad_scale, const at::Tensor& loss, bool reduce,
                               const at::Tensor& grad_student, bool student_grad) {
  p.grad_scale = grad_scale_ptr(grad_scale, loss);
  p.loss = loss.data_ptr();
  p.reduce = reduce;
  p.grad_student = student_grad ? grad_student.data_ptr() : nullptr;
}

// An optional (outer, inner) bool mask of the positions of an (outer, classes, inner) student, as a
// contiguous tensor (undefined if absent): the caller keeps it alive until the launch.
inline at::Tensor check_position_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& student) {
  if (!mask.has_value()) return at::Tensor();
  const int64_t outer = student.size(0), inner = student.size(2);
  check_cuda_on(*mask, student, "mask");
  TORCH_CHECK(mask->scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == outer && mask->size(1) == inner, "mask: expected shape (", outer,
              ", ", inner, "), got ", mask->sizes());
  return mask->contiguous();
}

// The element strides of a 3-d view.
inline void copy_strides(const at::Tensor& t, int64_t (&strides)[3]) {
  for (int d = 0; d < 3; ++d) strides[d] = t.stride(d);
}

// The kernels' kind of an LLM divergence name at β (β's endpoints resolved).
inline cuda::DivergenceKind divergence_kind(c10::string_view divergence, double beta) {
  const std::string name(divergence);
  cuda::DivergenceKind kind = cuda::DivergenceKind::kForwardKl;
  TORCH_CHECK(cuda::divergence_kind_of(name.c_str(), beta, kind), "divergence: unknown divergence '", name, "'");
  return kind;
}

// A logit transform from its optional logit scale and soft-cap.
inline cuda::LogitTransformParams logit_transform(const c10::optional<double>& logit_scale,
                                                  const c10::optional<double>& softcap) {
  cuda::LogitTransformParams t;
  t.has_scale = logit_scale.has_value();
  t.scale = logit_scale.value_or(1.0);
  t.has_cap = softcap.has_value();
  t.cap = softcap.value_or(1.0);
  TORCH_CHECK(!t.has_cap || t.cap > 0.0, "softcap: expected a positive value, got ", t.cap);
  return t;
}

// The checks every softmax pair op makes on its (outer, classes, inner) student and teacher views,
// mask, temperature and grad_scale. Returns the mask as a contiguous tensor (undefined if absent):
// the caller keeps it alive until the launch.
inline at::Tensor check_softmax_pair_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                            const c10::optional<at::Tensor>& mask, double temperature,
                                            const at::Tensor& grad_scale) {
  TORCH_CHECK(student.is_cuda(), "student: expected a CUDA tensor, got device ", student.device());
  check_cuda_on(teacher, student, "teacher");
  check_grad_scale(grad_scale, student);
  TORCH_CHECK(student.dim() == 3, "student: expected a 3-d (outer, classes, inner) view, got shape ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "teacher: expected shape ", student.sizes(), ", got ",
              teacher.sizes());
  TORCH_CHECK(temperature > 0.0, "temperature: expected a positive value, got ", temperature);
  to_dtype(student, "student");
  to_dtype(teacher, "teacher");
  return check_position_mask(mask, student);
}

// The accumulation (and loss) dtype of a student/teacher pair: float64 iff either is.
inline at::ScalarType accumulation_type(const at::Tensor& student, const at::Tensor& teacher) {
  return cuda::loss_is_double(to_dtype(student, "student"), to_dtype(teacher, "teacher")) ? at::kDouble : at::kFloat;
}

// The outputs of a softmax pair op: the (outer, inner) loss in the accumulation dtype and the
// gradient buffers (empty when not requested).
inline TensorTriple softmax_pair_outputs(const at::Tensor& student, const at::Tensor& teacher, bool student_grad,
                                         bool teacher_grad) {
  at::Tensor loss =
      at::empty({student.size(0), student.size(2)}, student.options().dtype(accumulation_type(student, teacher)));
  return {loss, gradient_buffer(student, student_grad), gradient_buffer(teacher, teacher_grad)};
}

// Fills the launcher arguments shared by the softmax pair ops from checked inputs and their outputs.
inline void fill_softmax_pair_params(cuda::SoftmaxPairParams& p, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& mask, double temperature, const at::Tensor& grad_scale,
                                     const TensorTriple& outputs, bool student_grad, bool teacher_grad) {
  const at::Tensor& loss = std::get<0>(outputs);
  const at::Tensor& grad_student = std::get<1>(outputs);
  const at::Tensor& grad_teacher = std::get<2>(outputs);
  p.student = typed_input(student, "student");
  p.teacher = typed_input(teacher, "teacher");
  copy_strides(student, p.student_strides);
  copy_strides(teacher, p.teacher_strides);
  p.outer = student.size(0);
  p.classes = student.size(1);
  p.inner = student.size(2);
  p.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  p.grad_scale = grad_scale_ptr(grad_scale, loss);
  p.temperature = temperature;
  p.loss = loss.data_ptr();
  if (student_grad) {
    p.grad_student = grad_student.data_ptr();
    copy_strides(grad_student, p.grad_student_strides);
  }
  if (teacher_grad) {
    p.grad_teacher = grad_teacher.data_ptr();
    copy_strides(grad_teacher, p.grad_teacher_strides);
  }
}

}  // namespace binding
}  // namespace kdkernels
