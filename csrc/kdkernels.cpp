// The one TORCH_LIBRARY of kdkernels._C: schemas of the kernel ops. Implementations register per
// device in csrc/cpu_dispatch.cpp (the CPU kernels of csrc/cpu, one copy per CPU capability) and
// csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL); fake implementations and autograd live in
// kdkernels/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

namespace {

// _C.cpu_capability(): the capability whose CPU kernels run ("DEFAULT", "AVX2", "AVX512").
PyObject* cpu_capability(PyObject*, PyObject*) {
  const int capability = kdkernels::cpu_dispatch::selected_capability();
  return PyUnicode_FromString(kdkernels::cpu_dispatch::capability_name(capability));
}

// _C.cpu_capabilities(): the capabilities the CPU kernels were compiled for, baseline first.
PyObject* cpu_capabilities(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (int c = 0; c < kdkernels::cpu_dispatch::kNumCapabilities; ++c) {
    if ((kdkernels::cpu_dispatch::compiled_mask & (1u << c)) == 0) continue;
    PyObject* name = PyUnicode_FromString(kdkernels::cpu_dispatch::capability_name(c));
    if (name == nullptr || PyList_Append(names, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return names;
}

PyMethodDef kdkernels_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "Capability of the CPU kernels that run (DEFAULT, AVX2, AVX512)."},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS, "Capabilities the CPU kernels were compiled for."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing kdkernels._C registers the ops; the module itself says whether CUDA kernels are in
// and which CPU kernels run.
static struct PyModuleDef kdkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kdkernels_methods};

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
  m.def(
      "pairwise_similarity_batches(Tensor student, Tensor teacher, Tensor grad_scale, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rkd_angle_anchors(Tensor student, Tensor teacher, Tensor grad_scale, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
}
