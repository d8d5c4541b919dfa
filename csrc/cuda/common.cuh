// What every CUDA kernel of kdkernels shares. Torch-free: no torch / ATen / c10 header may be
// included here, which is what lets `nvcc -c` compile-check the kernels on a machine without a
// CUDA build of torch.
//
// The top part is plain C++ with only <cuda_runtime_api.h>, so the bindings (host compiler) can
// include it through the kernel headers: the dtype enum and the accumulation-type rule. The
// device helpers (conversions, vector accesses, exp/log, NaN-propagating max, the deterministic
// block sum and the dtype dispatch of the launchers) sit in the `#ifdef __CUDACC__` part.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>
#include <utility>
#endif

namespace kdkernels {
namespace cuda {

// Element types the kernels accept. The bindings map at::ScalarType onto it.
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// A read-only device array the kernels take as input, and its element type.
struct TypedInput {
  const void* data = nullptr;
  DType dtype = DType::kFloat;
};

// The loss (and accumulation) type is double iff either input is double, else float.
inline bool loss_is_double(DType a, DType b) { return a == DType::kDouble || b == DType::kDouble; }

#ifdef __CUDACC__
namespace detail {

// gridDim.x limit; kernels that may need more blocks loop over their work (grid-stride).
constexpr int64_t kMaxGrid = 2147483647;

// A VEC-element chunk loaded or stored with one instruction (up to 16 bytes per input). The
// alignment makes the compiler emit a single vector load/store; callers must check the address.
template <typename X, int N>
struct alignas(sizeof(X) * N) Vec {
  X v[N];
};

// Elements per vector access for a pair of element types: 16 bytes of the wider one, so both
// tensors advance by the same number of elements per access (a bf16 student with a float teacher
// loads 8 + 16 bytes per step).
template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

// The accumulation type: fp32 for half/bf16/float, fp64 if either input is double.
template <typename A, typename B>
using acc_t = typename std::conditional<std::is_same<A, double>::value || std::is_same<B, double>::value,
                                        double, float>::type;

// Conversions between element types and the accumulation type.
__host__ __device__ __forceinline__ float widen(float x) { return x; }
__host__ __device__ __forceinline__ double widen(double x) { return x; }
__host__ __device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Acc, typename X>
__host__ __device__ __forceinline__ Acc to_acc(X x) {
  return static_cast<Acc>(widen(x));
}

template <typename X>
struct Narrow {
  template <typename Acc>
  __host__ __device__ __forceinline__ static X from(Acc v) {
    return static_cast<X>(v);
  }
};
template <>
struct Narrow<__half> {
  template <typename Acc>
  __host__ __device__ __forceinline__ static __half from(Acc v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct Narrow<__nv_bfloat16> {
  template <typename Acc>
  __host__ __device__ __forceinline__ static __nv_bfloat16 from(Acc v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

template <typename X, typename Acc>
__host__ __device__ __forceinline__ X from_acc(Acc v) {
  return Narrow<X>::from(v);
}

// exp / log (and tanh, expm1, log1p for the divergences) in the accumulation type (the build may
// map the float ones to fast intrinsics).
__host__ __device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__host__ __device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__host__ __device__ __forceinline__ float acc_log(float x) { return logf(x); }
__host__ __device__ __forceinline__ double acc_log(double x) { return log(x); }
__host__ __device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__host__ __device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }
__host__ __device__ __forceinline__ float acc_expm1(float x) { return expm1f(x); }
__host__ __device__ __forceinline__ double acc_expm1(double x) { return expm1(x); }
__host__ __device__ __forceinline__ float acc_log1p(float x) { return log1pf(x); }
__host__ __device__ __forceinline__ double acc_log1p(double x) { return log1p(x); }

template <typename Acc>
__host__ __device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// max(x, y) that is NaN when either is (x NaN: x; else y NaN: x > y fails, so y), so a NaN logit
// becomes and stays the running maximum (the NaN rule of kdkernels/ops/reference).
template <typename Acc>
__host__ __device__ __forceinline__ Acc nan_max(Acc x, Acc y) {
  return (x != x || x > y) ? x : y;
}

// One step of a loop over super-tiles of vectors: thread x of `threads` owns the vectors
// v = base + u·threads + x, u < UNROLL; calls f(u, v) for those below nvec, u ascending.
template <int UNROLL, typename F>
__device__ __forceinline__ void for_each_tile_vector(int64_t base, int64_t nvec, int threads, F&& f) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t v = base + static_cast<int64_t>(u) * threads + threadIdx.x;
    if (v < nvec) f(u, v);
  }
}

// This thread's vectors of a super-tile of two arrays (vector v starts at element v·VEC), all
// loads issued before any value is used, so that they are in flight together.
template <int VEC, int UNROLL, typename A, typename B>
__device__ __forceinline__ void load_tile(const A* a, const B* b, int64_t base, int64_t nvec, int threads,
                                          Vec<A, VEC> (&av)[UNROLL], Vec<B, VEC> (&bv)[UNROLL]) {
  for_each_tile_vector<UNROLL>(base, nvec, threads, [&](int u, int64_t v) {
    av[u] = *reinterpret_cast<const Vec<A, VEC>*>(a + v * VEC);
    bv[u] = *reinterpret_cast<const Vec<B, VEC>*>(b + v * VEC);
  });
}

// Element index of `p` modulo N, or -1 if `p` is not even aligned to its element size. Two
// pointers with the same residue reach a N-element (vector-aligned) boundary after the same number
// of scalar elements, so one scalar "head" serves both.
template <int N, typename X>
__host__ __device__ __forceinline__ int element_misalignment(const X* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (address % sizeof(X) != 0) return -1;
  return static_cast<int>((address / sizeof(X)) % N);
}

// Deterministic block-wide sum: fixed butterfly inside each warp, then warp 0 over the per-warp
// sums in a fixed order. Every thread gets the result. `scratch` needs 33 entries. Must be
// called by all threads of the block.
template <typename Acc>
__device__ Acc block_sum(Acc value, Acc* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : Acc(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) scratch[32] = value;
  }
  __syncthreads();
  const Acc total = scratch[32];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// The block's partial sum of the losses its threads gathered: block_sum of `value`, written by
// thread 0 to partials[blockIdx.x]. Must be called by all threads of the block.
template <typename Acc>
__device__ __forceinline__ void store_block_partial_sum(Acc value, Acc* partials) {
  __shared__ Acc scratch[33];
  const Acc total = block_sum(value, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// The chunked work split of the elementwise kernels: block b owns the items
// [b·Chunk, (b + 1)·Chunk) ∩ [0, count), and its thread x the items b·Chunk + k·Threads + x,
// k ascending (consecutive threads on consecutive items: coalesced). Calls f(item) for each;
// Unroll is the loop's unroll factor.
template <int64_t Chunk, int Threads, int Unroll, typename F>
__device__ __forceinline__ void for_each_chunk_item(int64_t count, F&& f) {
  static_assert(Chunk % Threads == 0, "a chunk must be a multiple of the block size");
  const int64_t base = static_cast<int64_t>(blockIdx.x) * Chunk;
#pragma unroll Unroll
  for (int k = 0; k < static_cast<int>(Chunk / Threads); ++k) {
    const int64_t item = base + static_cast<int64_t>(k) * Threads + threadIdx.x;
    if (item >= count) break;
    f(item);
  }
}

// Type tags for the host-side dtype dispatch.
template <typename X>
struct Tag {
  using type = X;
};

// Calls f(Tag<X>{}) for the element type X of `dtype`; false for an unknown dtype.
template <typename F>
bool dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf:
      f(Tag<__half>{});
      return true;
    case DType::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      return true;
    case DType::kFloat:
      f(Tag<float>{});
      return true;
    case DType::kDouble:
      f(Tag<double>{});
      return true;
  }
  return false;
}

// Calls f(Tag<A>{}, Tag<B>{}) for the element types of (a, b); false if either is unknown.
template <typename F>
bool dispatch_dtype_pair(DType a, DType b, F&& f) {
  bool ok_b = true;
  const bool ok_a = dispatch_dtype(a, [&](auto tag_a) {
    ok_b = dispatch_dtype(b, [&](auto tag_b) { f(tag_a, tag_b); });
  });
  return ok_a && ok_b;
}

}  // namespace detail
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace kdkernels
