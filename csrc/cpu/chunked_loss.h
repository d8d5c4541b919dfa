// The fixed-chunk reduction of the elementwise CPU kernels (margin_partial_l2_elements,
// bounded_regression_rows, kl_div_pointwise): the items
// (elements or rows) are cut into chunks of a fixed size, each chunk is one parallel work unit, and
// with reduce the loss is one partial sum per chunk. The partition depends on the item count only,
// never on the thread count, so the caller's sum over the partial sums repeats bit for bit.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>

namespace kdkernels {
namespace cpu {

inline int64_t chunk_count(int64_t items, int64_t chunk) { return (items + chunk - 1) / chunk; }

// The partial-sum loss of `items` items: one entry per chunk, and a single zero when there are no
// items (the kernel then has nothing to write).
inline at::Tensor partial_sums_buffer(int64_t items, int64_t chunk, const at::TensorOptions& options) {
  if (items == 0) return at::zeros({1}, options);
  return at::empty({chunk_count(items, chunk)}, options);
}

// Calls f(chunk_index, first_item, end_item) for every chunk, in parallel over chunks (at least
// `grain` chunks per task).
template <typename F>
inline void parallel_for_chunks(int64_t items, int64_t chunk, int64_t grain, const F& f) {
  at::parallel_for(0, chunk_count(items, chunk), grain, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) f(ch, ch * chunk, std::min(items, ch * chunk + chunk));
  });
}

}  // namespace cpu
}  // namespace kdkernels
