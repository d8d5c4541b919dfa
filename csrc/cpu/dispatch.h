// Run-time choice of the CPU kernels' SIMD capability, the way ATen's DispatchStub does it.
//
// setup.py compiles every csrc/cpu/*.cpp once per capability (DEFAULT = baseline x86-64 / any
// other architecture, AVX2, AVX512), each time with -DCPU_CAPABILITY=<NAME> and that ISA's
// compiler flags -- except the files with no vector code of their own (setup.py's
// BASELINE_ONLY_CPU_SOURCES), compiled for DEFAULT only, whose stubs then always pick that copy. at::vec puts its code in `inline namespace CPU_CAPABILITY`, and the kernel file
// puts its entry points in `namespace kdkernels::CPU_CAPABILITY`, so the copies have distinct
// symbols and live side by side in kdkernels._C. csrc/cpu_dispatch.cpp (compiled once, baseline
// flags) registers one CPU kernel per op with torch; it forwards each call to the copy that
// matches at::get_cpu_capability() -- what `torch.backends.cpu.get_cpu_capability()` reports, so
// ATEN_CPU_CAPABILITY=default|avx2|avx512 selects ours too -- or to the best compiled one below it.
//
// A kernel file follows four rules:
//   1. declare its entry point (the dispatched signature) in csrc/kdkernels.h, e.g.
//        TensorTriple kd_loss_rows_cpu(const at::Tensor& student, ...);
//   2. put that entry point (and everything else it defines outside an anonymous namespace) in
//        namespace kdkernels { namespace CPU_CAPABILITY { ... } }
//   3. end with  KDKERNELS_REGISTER_CPU_KERNEL(kd_loss_rows_cpu);  (outside the namespaces)
//   4. add  KDKERNELS_CPU_STUB(kd_loss_rows_cpu);  below, and in csrc/cpu_dispatch.cpp
//        m.impl("kd_loss_rows", KDKERNELS_CPU_DISPATCHER(kd_loss_rows_cpu));
// No TORCH_LIBRARY_IMPL in a kernel file: it would be registered once per capability.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../kdkernels.h"

namespace kdkernels {
namespace cpu_dispatch {

// Index order = preference order: a higher index needs a superset of the lower ones' ISA.
enum Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, kNumCapabilities = 3 };

const char* capability_name(int capability);

// The capability torch runs its own kernels with (at::get_cpu_capability(), read once).
int runtime_capability();

// Bit c set when some kernel was compiled (and registered) for capability c.
inline uint32_t compiled_mask = 0;

// The capability the kernels actually run: the runtime one, or the best compiled one below it.
int selected_capability();

// One op's implementations, one per compiled capability. Constant-initialised (constexpr
// constructor), so it is filled before any registrar runs whatever the static-init order.
template <typename Fn>
struct Stub;

template <typename R, typename... Args>
struct Stub<R (*)(Args...)> {
  using Fn = R (*)(Args...);
  const char* name;
  Fn impl[kNumCapabilities];

  constexpr explicit Stub(const char* op_name) : name(op_name), impl{nullptr, nullptr, nullptr} {}

  Fn select() const {
    for (int c = runtime_capability(); c >= 0; --c) {
      if (impl[c] != nullptr) return impl[c];
    }
    TORCH_CHECK(false, "kdkernels: no CPU kernel of ", name, " was compiled for capability ",
                capability_name(runtime_capability()), " or below");
  }
};

template <typename Fn>
bool register_kernel(Stub<Fn>& stub, int capability, Fn fn) {
  stub.impl[capability] = fn;
  compiled_mask |= 1u << capability;
  return true;
}

// The function registered with torch: forwards to the selected implementation.
template <auto& stub, typename Fn = typename std::remove_reference_t<decltype(stub)>::Fn>
struct Forward;

template <auto& stub, typename R, typename... Args>
struct Forward<stub, R (*)(Args...)> {
  static R call(Args... args) { return stub.select()(std::forward<Args>(args)...); }
};

}  // namespace cpu_dispatch
}  // namespace kdkernels

// One stub per dispatched entry point declared in kdkernels.h (an inline variable: one object
// however many translation units see it).
#define KDKERNELS_CPU_STUB(fn)                                                           \
  namespace kdkernels {                                                                  \
  namespace cpu_dispatch {                                                               \
  inline Stub<decltype(&::kdkernels::fn)> fn##_stub{#fn};                                \
  }                                                                                      \
  }

// In a kernel file compiled per capability: put this capability's `fn` into the stub.
#define KDKERNELS_REGISTER_CPU_KERNEL(fn)                                                         \
  static const bool kdkernels_cpu_registered_##fn = ::kdkernels::cpu_dispatch::register_kernel( \
      ::kdkernels::cpu_dispatch::fn##_stub, ::kdkernels::cpu_dispatch::CPU_CAPABILITY,          \
      &::kdkernels::CPU_CAPABILITY::fn)

// In csrc/cpu_dispatch.cpp: the function pointer to give TORCH_LIBRARY_IMPL's m.impl.
#define KDKERNELS_CPU_DISPATCHER(fn) (&::kdkernels::cpu_dispatch::Forward<::kdkernels::cpu_dispatch::fn##_stub>::call)

KDKERNELS_CPU_STUB(kd_loss_rows_cpu)
KDKERNELS_CPU_STUB(kl_div_pointwise_cpu)
KDKERNELS_CPU_STUB(weighted_soft_ce_rows_cpu)
KDKERNELS_CPU_STUB(margin_partial_l2_elements_cpu)
KDKERNELS_CPU_STUB(bounded_regression_rows_cpu)
KDKERNELS_CPU_STUB(pairwise_similarity_batches_cpu)
KDKERNELS_CPU_STUB(rkd_angle_anchors_cpu)
KDKERNELS_CPU_STUB(divergence_rows_cpu)
KDKERNELS_CPU_STUB(sparse_divergence_rows_cpu)
