// The one TORCH_LIBRARY of kdkernels._C: schemas of the kernel ops. Implementations register per
// device in csrc/cpu/*.cpp and csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL); fake implementations
// and autograd live in kdkernels/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "kdkernels.h"

extern "C" {
// Importing kdkernels._C registers the ops; the module itself only says whether CUDA kernels are in.
static struct PyModuleDef kdkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyObject* PyInit__C(void) {
  PyObject* module = PyModule_Create(&kdkernels_module);
  if (module == nullptr) return nullptr;
#ifdef KDKERNELS_WITH_CUDA
  PyModule_AddObject(module, "WITH_CUDA", Py_True);
  Py_INCREF(Py_True);
#else
  PyModule_AddObject(module, "WITH_CUDA", Py_False);
  Py_INCREF(Py_False);
#endif
  return module;
}
}

TORCH_LIBRARY(kdkernels, m) {
  m.def(
      "margin_partial_l2_elements(Tensor student, Tensor teacher, Tensor margin, int channel_stride, "
      "Tensor grad_scale, bool reduce, bool student_grad) -> (Tensor, Tensor)");
  m.def(
      "bounded_regression_rows(Tensor student, Tensor teacher, Tensor target, Tensor? mask, float margin, "
      "Tensor grad_scale, bool reduce, bool student_grad) -> (Tensor, Tensor)");
  m.def(
      "kd_loss_rows(Tensor student, Tensor teacher, Tensor? mask, float temperature, Tensor grad_scale, "
      "bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kl_div_pointwise(Tensor input, Tensor target, bool log_target, Tensor grad_scale, bool reduce, "
      "bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "weighted_soft_ce_rows(Tensor student, Tensor teacher, Tensor? class_weight, Tensor? mask, float temperature, "
      "Tensor grad_scale, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
}
