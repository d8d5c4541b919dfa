// Who works on one position of the divergence kernels: a thread block (BlockTeam, the kernels) or
// one host thread (SerialTeam, the host test). The per-position code is written once against this
// interface, __host__ __device__, so that the host test runs the kernels' own row code:
//   rank(), size()          this worker's index and the team size: loops are
//                           `for (c = rank(); c < n; c += size())`
//   sync()                  a barrier (global and shared writes before it are visible after it)
//   reduce(x, identity, op) the op-combination of every worker's x, the same for all (fixed tree:
//                           deterministic); X trivially copyable, a multiple of 4 bytes
//   mark(bits, i)           sets bit i of a shared bitmap (integer atomics across the block)
//   test(bits, i)           reads it
// Torch-free, like common.cuh.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include "common.cuh"

namespace kdkernels {
namespace cuda {
namespace detail {

// A warp shuffle of any trivially copyable X, word by word.
template <typename X>
__device__ __forceinline__ X shfl_xor_words(const X& x, int offset) {
  static_assert(sizeof(X) % 4 == 0, "shfl_xor_words: a multiple of 4 bytes");
  constexpr int kWords = sizeof(X) / 4;
  unsigned words[kWords];
  memcpy(words, &x, sizeof(X));
#pragma unroll
  for (int k = 0; k < kWords; ++k) words[k] = __shfl_xor_sync(0xffffffffu, words[k], offset);
  X r;
  memcpy(&r, words, sizeof(X));
  return r;
}

// The threads of a block (blockDim.x a multiple of 32, at most 1024).
struct BlockTeam {
  __host__ __device__ int rank() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x;
#else
    return 0;
#endif
  }
  __host__ __device__ int size() const {
#ifdef __CUDA_ARCH__
    return blockDim.x;
#else
    return 1;
#endif
  }
  __host__ __device__ void sync() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  // Butterfly inside each warp, then warp 0 over the per-warp results in a fixed order; everyone
  // reads the result back from shared memory (lanes of a butterfly may differ in the last bit).
  template <typename X, typename Op>
  __host__ __device__ X reduce(X x, const X& identity, Op op) const {
#ifdef __CUDA_ARCH__
    __shared__ X scratch[33];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x = op(x, shfl_xor_words(x, offset));
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
      x = lane < warps ? scratch[lane] : identity;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) x = op(x, shfl_xor_words(x, offset));
      if (lane == 0) scratch[32] = x;
    }
    __syncthreads();
    const X total = scratch[32];
    __syncthreads();  // scratch is reused by the next reduction
    return total;
#else
    (void)identity;
    (void)op;
    return x;
#endif
  }
  __host__ __device__ void mark(uint32_t* bits, int64_t i) const {
#ifdef __CUDA_ARCH__
    atomicOr(bits + (i >> 5), 1u << (i & 31));
#else
    bits[i >> 5] |= 1u << (i & 31);
#endif
  }
  __host__ __device__ bool test(const uint32_t* bits, int64_t i) const { return (bits[i >> 5] >> (i & 31)) & 1u; }
};

// Threads per block for positions of `work` elements each: about 8 per thread, from 32 up to
// `max_threads` (a power of two). Depends on the shape only, so results repeat bit for bit.
inline int team_threads(int64_t work, int max_threads) {
  int threads = 32;
  while (threads < max_threads && static_cast<int64_t>(threads) * 8 < work) threads *= 2;
  return threads;
}

// The launchers' dispatch: for the element types (A, B) of the two inputs, calls
// launch(Tag<A>{}, Tag<B>{}, grid), which enqueues a kernel of one team (block) per position on
// `grid` blocks (grid-stride beyond); returns its launch status. Nothing is launched without
// positions; cudaErrorInvalidValue for an unknown dtype.
template <typename Launch>
cudaError_t launch_position_teams(DType a, DType b, int64_t positions, Launch&& launch) {
  cudaError_t status = cudaSuccess;
  const unsigned grid = static_cast<unsigned>(positions < kMaxGrid ? positions : kMaxGrid);
  const bool known = dispatch_dtype_pair(a, b, [&](auto tag_a, auto tag_b) {
    if (positions == 0) return;
    launch(tag_a, tag_b, grid);
    status = cudaGetLastError();
  });
  return known ? status : cudaErrorInvalidValue;
}

// One host thread: what the host test walks a position with.
struct SerialTeam {
  __host__ __device__ int rank() const { return 0; }
  __host__ __device__ int size() const { return 1; }
  __host__ __device__ void sync() const {}
  template <typename X, typename Op>
  __host__ __device__ X reduce(X x, const X&, Op) const {
    return x;
  }
  __host__ __device__ void mark(uint32_t* bits, int64_t i) const { bits[i >> 5] |= 1u << (i & 31); }
  __host__ __device__ bool test(const uint32_t* bits, int64_t i) const { return (bits[i >> 5] >> (i & 31)) & 1u; }
};

}  // namespace detail
}  // namespace cuda
}  // namespace kdkernels
#endif  // __CUDACC__
