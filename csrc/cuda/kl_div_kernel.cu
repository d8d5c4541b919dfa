// CUDA kernel of kdkernels::kl_div_pointwise: torch.nn.functional.kl_div's pointwise term and both
// gradients in one pass over the inputs (formulas in kl_div_kernel.cuh). Torch-free.
//
// Work split: the elements are cut into fixed chunks of kKlDivChunk; block b handles chunks
// b, b + gridDim.x, ... (a grid-stride loop over chunks), with grid = kl_div_num_partials(numel),
// a function of numel only. Inside a chunk each thread takes 16-byte vectors (when every pointer
// involved is aligned for it), several in flight at once. With reduce == true each block writes
// one partial sum, summed in a fixed order: no atomics, so the result repeats bit for bit.

#include "kl_div_kernel.cuh"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // vectors loaded per thread before use (memory-level parallelism)

// One element: loss and the gradients (already times gs).
template <typename Acc>
__device__ __forceinline__ void kl_point(Acc x, Acc y, bool log_target, Acc gs, Acc& loss, Acc& grad_x, Acc& grad_y) {
  if (log_target) {
    const Acc e = acc_exp(y);
    loss = e * (y - x);
    grad_x = -(gs * e);
    grad_y = gs * e * (y - x + Acc(1));
  } else {
    // xlogy(y, y) = 0 at y = 0 (where log y = −inf); y = 0 gives 0 − 0·x as torch does.
    const Acc log_y = acc_log(y);
    loss = (y == Acc(0) ? Acc(0) : y * log_y) - y * x;
    grad_x = -(gs * y);
    // y == 0: 0 by our convention, NaN where x is not finite; NaN for a negative or NaN target, as torch.
    grad_y = y == Acc(0) ? x * Acc(0) : gs * (log_y + Acc(1) - x);
  }
}

// `vectorized`: every pointer used is aligned for VEC-element accesses.
template <typename X, typename Y, int VEC>
__global__ void __launch_bounds__(kThreads) kl_div_kernel(const KlDivParams p, bool vectorized) {
  using Acc = acc_t<X, Y>;
  const X* input = static_cast<const X*>(p.input.data);
  const Y* target = static_cast<const Y*>(p.target.data);
  // numel values (reduce == false) or one partial sum per block (reduce == true)
  Acc* loss_out = static_cast<Acc*>(p.loss);
  X* grad_input = static_cast<X*>(p.grad_input);     // nullptr: not requested
  Y* grad_target = static_cast<Y*>(p.grad_target);  // nullptr: not requested

  const int tid = threadIdx.x;
  const bool want_gx = grad_input != nullptr;
  const bool want_gy = grad_target != nullptr;
  const bool store_loss = !p.reduce;
  const Acc gs = (want_gx || want_gy) ? *static_cast<const Acc*>(p.grad_scale) : Acc(0);
  const int64_t chunks = (p.numel + kKlDivChunk - 1) / kKlDivChunk;

  // One element at flat index j (scalar path, and the few elements after the last vector).
  auto scalar = [&](int64_t j, Acc& sum) {
    Acc loss, grad_x, grad_y;
    kl_point(to_acc<Acc>(input[j]), to_acc<Acc>(target[j]), p.log_target, gs, loss, grad_x, grad_y);
    sum += loss;
    if (store_loss) loss_out[j] = loss;
    if (want_gx) grad_input[j] = from_acc<X>(grad_x);
    if (want_gy) grad_target[j] = from_acc<Y>(grad_y);
  };

  Acc sum = Acc(0);
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t start = chunk * kKlDivChunk;
    const int64_t rest = p.numel - start;
    const int64_t count = rest < kKlDivChunk ? rest : kKlDivChunk;
    int64_t done = 0;
    if (vectorized) {
      const int64_t nvec = count / VEC;
      for (int64_t base = 0; base < nvec; base += static_cast<int64_t>(kThreads) * kUnroll) {
        Vec<X, VEC> xv[kUnroll];
        Vec<Y, VEC> yv[kUnroll];
        load_tile(input + start, target + start, base, nvec, kThreads, xv, yv);
        for_each_tile_vector<kUnroll>(base, nvec, kThreads, [&](int u, int64_t v) {
          Vec<Acc, VEC> lv;
          Vec<X, VEC> gxv;
          Vec<Y, VEC> gyv;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            Acc loss, grad_x, grad_y;
            kl_point(to_acc<Acc>(xv[u].v[k]), to_acc<Acc>(yv[u].v[k]), p.log_target, gs, loss, grad_x, grad_y);
            sum += loss;
            lv.v[k] = loss;
            gxv.v[k] = from_acc<X>(grad_x);
            gyv.v[k] = from_acc<Y>(grad_y);
          }
          const int64_t j = start + v * VEC;
          if (store_loss) *reinterpret_cast<Vec<Acc, VEC>*>(loss_out + j) = lv;
          if (want_gx) *reinterpret_cast<Vec<X, VEC>*>(grad_input + j) = gxv;
          if (want_gy) *reinterpret_cast<Vec<Y, VEC>*>(grad_target + j) = gyv;
        });
      }
      done = nvec * VEC;
    }
    for (int64_t j = done + tid; j < count; j += kThreads) scalar(start + j, sum);
  }

  if (p.reduce) store_block_partial_sum(sum, loss_out);  // all threads take part (uniform branch)
}

template <int N, typename P>
bool aligned_for(const P* p, size_t element_size) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (N * element_size) == 0;
}

template <typename X, typename Y>
cudaError_t launch_typed(const KlDivParams& p, cudaStream_t stream) {
  using Acc = acc_t<X, Y>;
  constexpr int VEC = vec_width<X, Y>();
  // Chunk starts are multiples of kKlDivChunk (a multiple of VEC), so aligned base pointers keep
  // every vector access aligned.
  const bool vectorized = aligned_for<VEC>(p.input.data, sizeof(X)) && aligned_for<VEC>(p.target.data, sizeof(Y)) &&
                          (p.reduce || aligned_for<VEC>(p.loss, sizeof(Acc))) &&
                          aligned_for<VEC>(p.grad_input, sizeof(X)) && aligned_for<VEC>(p.grad_target, sizeof(Y));
  const unsigned grid = static_cast<unsigned>(kl_div_num_partials(p.numel));
  kl_div_kernel<X, Y, VEC><<<grid, kThreads, 0, stream>>>(p, vectorized);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kl_div_pointwise(const KlDivParams& params, cudaStream_t stream) {
  if (params.numel < 0) return cudaErrorInvalidValue;
  if (params.numel == 0) return cudaSuccess;
  if (params.input.data == nullptr || params.target.data == nullptr || params.loss == nullptr ||
      ((params.grad_input != nullptr || params.grad_target != nullptr) && params.grad_scale == nullptr))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaSuccess;
  const bool known = detail::dispatch_dtype_pair(params.input.dtype, params.target.dtype, [&](auto x_tag, auto y_tag) {
    using X = typename decltype(x_tag)::type;
    using Y = typename decltype(y_tag)::type;
    status = launch_typed<X, Y>(params, stream);
  });
  return known ? status : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdkernels
