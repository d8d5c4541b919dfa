// Declarations of the CPU entry points of the kernel ops of kdkernels._C (defined in csrc/cpu/*.cpp,
// registered through csrc/cpu/dispatch.h and csrc/cpu_dispatch.cpp). The ops' schemas come from
// each loss's declaration in kdkernels/ops/<loss>.py (its kernel signature), which also documents
// what the op computes. The CUDA ops need no declaration: each csrc/cuda/<loss>_bindings.cpp
// defines and registers its own.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace kdkernels {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// kd_loss_rows: student/teacher (outer, classes, inner) any strides; mask (outer, inner) bool.
TensorTriple kd_loss_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& mask, double temperature,
                              const at::Tensor& grad_scale, bool student_grad, bool teacher_grad);

// kl_div_pointwise: input/target contiguous, same shape.
TensorTriple kl_div_pointwise_cpu(const at::Tensor& input, const at::Tensor& target, bool log_target,
                                  const at::Tensor& grad_scale, bool reduce, bool input_grad, bool target_grad);

// weighted_soft_ce_rows: student/teacher (outer, classes, inner) any strides; class_weight (classes,);
// mask (outer, inner) bool.
TensorTriple weighted_soft_ce_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                       const c10::optional<at::Tensor>& class_weight,
                                       const c10::optional<at::Tensor>& mask, double temperature,
                                       const at::Tensor& grad_scale, bool student_grad, bool teacher_grad);

// margin_partial_l2_elements: student/teacher dense with the same strides; margin (C,) in the
// accumulation dtype; the channel of flat element i is (i / channel_stride) % C.
std::tuple<at::Tensor, at::Tensor> margin_partial_l2_elements_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                  const at::Tensor& margin, int64_t channel_stride,
                                                                  const at::Tensor& grad_scale, bool reduce,
                                                                  bool student_grad);

// bounded_regression_rows: student/teacher/target (rows, K) of one dtype, any strides; mask (rows,) bool.
std::tuple<at::Tensor, at::Tensor> bounded_regression_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& mask, double margin,
                                                               const at::Tensor& grad_scale, bool reduce,
                                                               bool student_grad);

// pairwise_similarity_batches: student (B, N, Cs), teacher (B, N, Ct), any strides and dtypes.
TensorTriple pairwise_similarity_batches_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                             const at::Tensor& grad_scale, bool student_grad, bool teacher_grad);

// rkd_angle_anchors: student (B, Ds), teacher (B, Dt), any strides and dtypes.
TensorTriple rkd_angle_anchors_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad_scale,
                                   bool student_grad, bool teacher_grad);

// divergence_rows: student/teacher (outer, classes, inner) any strides and dtypes; mask (outer, inner) bool.
TensorTriple divergence_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                 const c10::optional<at::Tensor>& mask, c10::string_view divergence, double beta,
                                 double temperature, bool scale_by_t2, c10::optional<double> student_softcap,
                                 c10::optional<double> teacher_softcap, c10::optional<double> student_logit_scale,
                                 c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
                                 bool student_grad, bool teacher_grad);

// sparse_divergence_rows: student (outer, classes, inner); values/indices (outer, k, inner) any strides,
// indices int64; mask (outer, inner) bool. Gradients: student and values.
TensorTriple sparse_divergence_rows_cpu(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                        const c10::optional<at::Tensor>& mask, c10::string_view divergence,
                                        double beta, double temperature, bool scale_by_t2, c10::string_view tail,
                                        c10::string_view teacher_values, double stored_temperature,
                                        c10::optional<double> student_softcap, c10::optional<double> teacher_softcap,
                                        c10::optional<double> student_logit_scale,
                                        c10::optional<double> teacher_logit_scale, const at::Tensor& grad_scale,
                                        bool student_grad, bool values_grad);

}  // namespace kdkernels
