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

template <typename X, typename Y, typename Acc>
struct KlArgs {
  const X* input;
  const Y* target;
  Acc* loss;      // numel values (reduce == false) or one partial sum per block (reduce == true)
  X* grad_input;  // nullptr: not requested
  Y* grad_target; // nullptr: not requested
  const void* grad_scale;  // the accumulation type
  int64_t numel;
  bool log_target;
  bool reduce;
  bool vectorized;  // every pointer used is aligned for VEC-element accesses
};

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

template <typename X, typename Y, int VEC>
__global__ void __launch_bounds__(kThreads) kl_div_kernel(const KlArgs<X, Y, acc_t<X, Y>> args) {
  using Acc = acc_t<X, Y>;
  __shared__ Acc scratch[33];

  const int tid = threadIdx.x;
  const bool want_gx = args.grad_input != nullptr;
  const bool want_gy = args.grad_target != nullptr;
  const bool store_loss = !args.reduce;
  const Acc gs = (want_gx || want_gy) ? *static_cast<const Acc*>(args.grad_scale) : Acc(0);
  const int64_t chunks = (args.numel + kKlDivChunk - 1) / kKlDivChunk;

  // One element at flat index j (scalar path, and the few elements after the last vector).
  auto scalar = [&](int64_t j, Acc& sum) {
    Acc loss, grad_x, grad_y;
    kl_point(to_acc<Acc>(args.input[j]), to_acc<Acc>(args.target[j]), args.log_target, gs, loss, grad_x, grad_y);
    sum += loss;
    if (store_loss) args.loss[j] = loss;
    if (want_gx) args.grad_input[j] = from_acc<X>(grad_x);
    if (want_gy) args.grad_target[j] = from_acc<Y>(grad_y);
  };

  Acc sum = Acc(0);
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t start = chunk * kKlDivChunk;
    const int64_t rest = args.numel - start;
    const int64_t count = rest < kKlDivChunk ? rest : kKlDivChunk;
    int64_t done = 0;
    if (args.vectorized) {
      const int64_t nvec = count / VEC;
      for (int64_t base = 0; base < nvec; base += static_cast<int64_t>(kThreads) * kUnroll) {
        Vec<X, VEC> xv[kUnroll];
        Vec<Y, VEC> yv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = base + u * kThreads + tid;
          if (v < nvec) {
            xv[u] = *reinterpret_cast<const Vec<X, VEC>*>(args.input + start + v * VEC);
            yv[u] = *reinterpret_cast<const Vec<Y, VEC>*>(args.target + start + v * VEC);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = base + u * kThreads + tid;
          if (v < nvec) {
            Vec<Acc, VEC> lv;
            Vec<X, VEC> gxv;
            Vec<Y, VEC> gyv;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              Acc loss, grad_x, grad_y;
              kl_point(to_acc<Acc>(xv[u].v[k]), to_acc<Acc>(yv[u].v[k]), args.log_target, gs, loss, grad_x, grad_y);
              sum += loss;
              lv.v[k] = loss;
              gxv.v[k] = from_acc<X>(grad_x);
              gyv.v[k] = from_acc<Y>(grad_y);
            }
            const int64_t j = start + v * VEC;
            if (store_loss) *reinterpret_cast<Vec<Acc, VEC>*>(args.loss + j) = lv;
            if (want_gx) *reinterpret_cast<Vec<X, VEC>*>(args.grad_input + j) = gxv;
            if (want_gy) *reinterpret_cast<Vec<Y, VEC>*>(args.grad_target + j) = gyv;
          }
        }
      }
      done = nvec * VEC;
    }
    for (int64_t j = done + tid; j < count; j += kThreads) scalar(start + j, sum);
  }

  if (args.reduce) {
    const Acc total = block_sum(sum, scratch);  // all threads take part (uniform branch)
    if (tid == 0) args.loss[blockIdx.x] = total;
  }
}

template <int N, typename P>
bool aligned_for(const P* p, size_t element_size) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (N * element_size) == 0;
}

template <typename X, typename Y>
cudaError_t launch_typed(const KlDivParams& p, cudaStream_t stream) {
  using Acc = acc_t<X, Y>;
  constexpr int VEC = vec_width<X, Y>();
  KlArgs<X, Y, Acc> a;
  a.input = static_cast<const X*>(p.input);
  a.target = static_cast<const Y*>(p.target);
  a.loss = static_cast<Acc*>(p.loss);
  a.grad_input = static_cast<X*>(p.grad_input);
  a.grad_target = static_cast<Y*>(p.grad_target);
  a.grad_scale = p.grad_scale;
  a.numel = p.numel;
  a.log_target = p.log_target;
  a.reduce = p.reduce;
  // Chunk starts are multiples of kKlDivChunk (a multiple of VEC), so aligned base pointers keep
  // every vector access aligned.
  a.vectorized = aligned_for<VEC>(a.input, sizeof(X)) && aligned_for<VEC>(a.target, sizeof(Y)) &&
                 (p.reduce || aligned_for<VEC>(a.loss, sizeof(Acc))) && aligned_for<VEC>(a.grad_input, sizeof(X)) &&
                 aligned_for<VEC>(a.grad_target, sizeof(Y));
  const unsigned grid = static_cast<unsigned>(kl_div_num_partials(p.numel));
  kl_div_kernel<X, Y, VEC><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kl_div_pointwise(const KlDivParams& params, cudaStream_t stream) {
  if (params.numel < 0) return cudaErrorInvalidValue;
  if (params.numel == 0) return cudaSuccess;
  if (params.input == nullptr || params.target == nullptr || params.loss == nullptr ||
      ((params.grad_input != nullptr || params.grad_target != nullptr) && params.grad_scale == nullptr))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaSuccess;
  const bool known = detail::dispatch_dtype_pair(params.input_dtype, params.target_dtype, [&](auto x_tag, auto y_tag) {
    using X = typename decltype(x_tag)::type;
    using Y = typename decltype(y_tag)::type;
    status = launch_typed<X, Y>(params, stream);
  });
  return known ? status : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdkernels
