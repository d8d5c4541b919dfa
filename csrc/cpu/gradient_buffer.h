// The gradient buffers the CPU kernels return: the input's shape, strides and dtype, backed by
// transparent huge pages where the OS allows it.
//
// A gradient is a fresh allocation on every step (optimizer.zero_grad() sets .grad to None), and
// at N×V sizes glibc maps it anew each time: the kernel's first write of every 4 KiB page faults.
// At N=512, V=32000 fp32 (64 MiB) those faults cost 24 ms here, three times the 8 ms of a whole
// torch.add(s, t, out=g) on the same tensors. madvise(MADV_HUGEPAGE) before the first write makes
// them 2 MiB faults (what torch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation); it only
// changes how the memory is mapped, never its contents. Linux only; elsewhere a plain empty_like.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdkernels {
namespace cpu {

static inline at::Tensor gradient_buffer(const at::Tensor& like, bool wanted) {
  if (!wanted) return at::empty({0}, like.options());
  at::Tensor grad = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + grad.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
  return grad;
}

}  // namespace cpu
}  // namespace kdkernels
