// The argument checks and outputs shared by the CPU kernels of the two-distribution row ops
// (kd_loss_rows, divergence_rows). The Python front ends validate first; these checks guard
// direct calls of the ops (torch.ops.kdkernels.*), with the op's name in every message.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "gradient_buffer.h"

namespace kdkernels {
namespace cpu {

// Student and teacher: (outer, classes, inner) CPU tensors of one shape, floating; T > 0; a
// one-element grad_scale.
inline void check_row_op_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                double temperature, const at::Tensor& grad_scale) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, op, ": student and teacher must be 3-D (O, C, I)");
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(), " and teacher ", teacher.sizes(),
              " differ in shape");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()), op,
              ": expected floating-point logits");
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(grad_scale.numel() == 1, op, ": grad_scale must have one element");
}

// The (outer, inner) bool mask's contiguous data, nullptr when every position counts; `storage`
// keeps the contiguous copy alive.
inline const bool* row_op_mask(const char* op, const c10::optional<at::Tensor>& mask, int64_t outer, int64_t inner,
                               at::Tensor& storage) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool");
  TORCH_CHECK(mask->numel() == outer * inner, op, ": mask must have shape (", outer, ", ", inner, ")");
  storage = mask->contiguous();
  return storage.numel() > 0 ? storage.const_data_ptr<bool>() : nullptr;
}

// What a row op returns: the per-position loss (float32; float64 if either input is) and the
// gradient buffers (the logits' shapes, strides and dtypes; empty when not wanted). `done`: there
// is nothing to compute (no positions, or no classes: the loss is 0).
struct RowOpOutputs {
  at::Tensor loss, grad_student, grad_teacher;
  bool done = false;
};

inline RowOpOutputs row_op_outputs(const at::Tensor& student, const at::Tensor& teacher, bool student_grad,
                                   bool teacher_grad) {
  const int64_t outer = student.size(0), classes = student.size(1), inner = student.size(2);
  const bool use_double = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  RowOpOutputs out;
  out.loss = at::empty({outer, inner}, student.options().dtype(use_double ? at::kDouble : at::kFloat));
  out.grad_student = gradient_buffer(student, student_grad);
  out.grad_teacher = gradient_buffer(teacher, teacher_grad);
  if (outer * inner == 0) {
    out.done = true;
  } else if (classes == 0) {
    out.loss.zero_();
    out.done = true;
  }
  return out;
}

}  // namespace cpu
}  // namespace kdkernels
