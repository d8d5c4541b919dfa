// The CPU kernels' registration with torch: one kernel per op that forwards to the copy compiled
// for the CPU capability torch runs with (see csrc/cpu/dispatch.h for the scheme and the rules a
// kernel file follows). Compiled once, with baseline flags: nothing here may use AVX.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "cpu/dispatch.h"

namespace kdkernels {
namespace cpu_dispatch {

const char* capability_name(int capability) {
  switch (capability) {
    case DEFAULT:
      return "DEFAULT";
    case AVX2:
      return "AVX2";
    case AVX512:
      return "AVX512";
    default:
      return "unknown";
  }
}

namespace {

int capability_from_torch() {
  // "DEFAULT", "AVX2", "AVX512" on x86 (what torch.backends.cpu.get_cpu_capability() returns);
  // other architectures report their own names (VSX, ZVECTOR, SVE256, ...) and get DEFAULT.
  const std::string name = at::get_cpu_capability();
  if (name == "AVX512") return AVX512;
  if (name == "AVX2") return AVX2;
  return DEFAULT;
}

}  // namespace

int runtime_capability() {
  static const int capability = capability_from_torch();
  return capability;
}

int selected_capability() {
  for (int c = runtime_capability(); c > DEFAULT; --c) {
    if (compiled_mask & (1u << c)) return c;
  }
  return DEFAULT;
}

}  // namespace cpu_dispatch
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("kd_loss_rows", KDKERNELS_CPU_DISPATCHER(kd_loss_rows_cpu));
  m.impl("kl_div_pointwise", KDKERNELS_CPU_DISPATCHER(kl_div_pointwise_cpu));
  m.impl("weighted_soft_ce_rows", KDKERNELS_CPU_DISPATCHER(weighted_soft_ce_rows_cpu));
  m.impl("margin_partial_l2_elements", KDKERNELS_CPU_DISPATCHER(margin_partial_l2_elements_cpu));
  m.impl("bounded_regression_rows", KDKERNELS_CPU_DISPATCHER(bounded_regression_rows_cpu));
  m.impl("pairwise_similarity_batches", KDKERNELS_CPU_DISPATCHER(pairwise_similarity_batches_cpu));
  m.impl("rkd_angle_anchors", KDKERNELS_CPU_DISPATCHER(rkd_angle_anchors_cpu));
  m.impl("divergence_rows", KDKERNELS_CPU_DISPATCHER(divergence_rows_cpu));
  m.impl("sparse_divergence_rows", KDKERNELS_CPU_DISPATCHER(sparse_divergence_rows_cpu));
}
