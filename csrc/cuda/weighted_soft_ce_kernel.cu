// CUDA kernels of kdkernels::weighted_soft_ce_rows. Torch-free: raw pointers, int64 sizes and strides.
//
// Per position (o, i) of (outer, classes, inner) views, with a = s/T, b = t/T in the accumulation
// type (fp32; fp64 if an input is fp64) and gs = *grad_scale read on the device:
//   ℓ = −Σ_c w_c p_t,c log p_s,c = S·log Z_a − A / Z_b                     (0 where masked out)
//   grad_student_c = gs/T · (S p_s,c − w_c p_t,c)
//   grad_teacher_c = −gs/T · p_t,c (ℓ + w_c log p_s,c)      (exactly 0 where p_t,c = 0)
// from one pass of online-softmax statistics, kept per thread and merged across the block:
//   Z_a = Σ e^{a − m_a},  Z_b = Σ e^{b − m_b},  W = Σ w e^{b − m_b},  A = Σ w e^{b − m_b} (a − m_a),
//   S = W / Z_b.
// Maxima are of the RAW logits and every exponent is (x − m)/T: <= 0, exactly 0 at the maximum
// (no overflow for finite logits, V = 1 gives exactly 0); maxima propagate NaN (!(x <= m) takes a
// NaN as the new maximum), so a NaN logit makes its position NaN (kdkernels/ops/reference rules).
// A stays relative to the running student max (shifted by −W·Δm_a when it grows), so ℓ is a sum of
// two non-negative terms and large logits lose no precision. A class with w·p_t = 0 is selected
// out, never multiplied by 0, so a −inf student logit there gives 0, not NaN; a position whose
// teacher logits are all −inf gets loss 0 and zero gradients.
//
// Two kernels:
// * rows: one block per position (grid-stride), threads striding over contiguous classes, block
//   merge of the per-thread states in a fixed tree; the gradient pass walks each thread's classes
//   in reverse, so the last-read (cached) classes come first.
// * channels: one thread per position, consecutive threads on consecutive inner indices, so each
//   class step of a contiguous NCHW map is one coalesced load per warp. Any strides are correct.
// No atomics: results repeat bit for bit.

#include "weighted_soft_ce_kernel.cuh"

#include <algorithm>

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxRowThreads = 512;
constexpr int kMinRowThreads = 32;
constexpr int kChannelThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;

template <typename S, typename T, typename Acc>
struct Args {
  const S* student;
  const T* teacher;
  const Acc* weight;  // nullptr = ones
  const bool* mask;   // nullptr = all counted
  const void* grad_scale;  // the accumulation type
  Acc* loss;
  S* grad_student;  // nullptr = not requested
  T* grad_teacher;  // nullptr = not requested
  int64_t classes, inner, positions;
  int64_t s0, s1, s2, t0, t1, t2, gs0, gs1, gs2, gt0, gt1, gt2;
  Acc inv_temperature;
};

// Online statistics of one position (or of the classes one thread has seen).
template <typename Acc>
struct State {
  Acc m_a, z_a, m_b, z_b, ws, acc;

  __device__ static State empty() {
    return {neg_inf<Acc>(), Acc(0), neg_inf<Acc>(), Acc(0), Acc(0), Acc(0)};
  }

  // One class: raw logits a, b and weight w.
  __device__ void add(Acc a, Acc b, Acc w, Acc inv_t) {
    if (!(a <= m_a)) {  // new student max (or NaN): re-reference acc, rescale z_a
      if (ws > Acc(0)) acc -= ws * ((a - (m_a == neg_inf<Acc>() ? a : m_a)) * inv_t);
      z_a = (m_a == neg_inf<Acc>() ? Acc(0) : z_a * acc_exp((m_a - a) * inv_t)) + Acc(1);
      m_a = a;
    } else if (m_a != neg_inf<Acc>()) {
      z_a += acc_exp((a - m_a) * inv_t);
    }
    if (!(b <= m_b)) {  // new teacher max (or NaN): rescale the teacher sums
      const Acc r = m_b == neg_inf<Acc>() ? Acc(0) : acc_exp((m_b - b) * inv_t);
      z_b = z_b * r + Acc(1);
      ws = ws * r;
      acc = r > Acc(0) ? acc * r : Acc(0);  // r = 0: nothing seen yet, or contributions underflowed
      m_b = b;
    } else if (m_b != neg_inf<Acc>()) {
      z_b += acc_exp((b - m_b) * inv_t);
    }
    if (m_b != neg_inf<Acc>()) {
      const Acc we = w * acc_exp((b - m_b) * inv_t);
      ws += we;
      if (we > Acc(0)) acc += we * ((a - m_a) * inv_t);
    }
  }

  __device__ static Acc nan_max(Acc x, Acc y) { return (x != x || x > y) ? x : y; }

  // Combines the statistics of two disjoint sets of classes (commutative, so a butterfly gives
  // every lane the same bits).
  __device__ static State merge(const State& x, const State& y, Acc inv_t) {
    State r;
    r.m_a = nan_max(x.m_a, y.m_a);
    r.m_b = nan_max(x.m_b, y.m_b);
    const Acc fa_x = x.m_a == neg_inf<Acc>() ? Acc(0) : acc_exp((x.m_a - r.m_a) * inv_t);
    const Acc fa_y = y.m_a == neg_inf<Acc>() ? Acc(0) : acc_exp((y.m_a - r.m_a) * inv_t);
    const Acc fb_x = x.m_b == neg_inf<Acc>() ? Acc(0) : acc_exp((x.m_b - r.m_b) * inv_t);
    const Acc fb_y = y.m_b == neg_inf<Acc>() ? Acc(0) : acc_exp((y.m_b - r.m_b) * inv_t);
    r.z_a = x.z_a * fa_x + y.z_a * fa_y;
    r.z_b = x.z_b * fb_x + y.z_b * fb_y;
    r.ws = x.ws * fb_x + y.ws * fb_y;
    const Acc acc_x = x.ws > Acc(0) ? (x.acc - x.ws * ((r.m_a - x.m_a) * inv_t)) * fb_x : Acc(0);
    const Acc acc_y = y.ws > Acc(0) ? (y.acc - y.ws * ((r.m_a - y.m_a) * inv_t)) * fb_y : Acc(0);
    r.acc = acc_x + acc_y;
    return r;
  }
};

template <typename Acc>
__device__ __forceinline__ State<Acc> shfl_xor(const State<Acc>& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.m_a, offset), __shfl_xor_sync(0xffffffffu, s.z_a, offset),
          __shfl_xor_sync(0xffffffffu, s.m_b, offset), __shfl_xor_sync(0xffffffffu, s.z_b, offset),
          __shfl_xor_sync(0xffffffffu, s.ws, offset),  __shfl_xor_sync(0xffffffffu, s.acc, offset)};
}

// Block-wide merge: butterfly in each warp, then warp 0 over the warps in order. All threads get it.
template <typename Acc>
__device__ State<Acc> block_merge(State<Acc> s, State<Acc>* scratch, Acc inv_t) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s = State<Acc>::merge(s, shfl_xor(s, offset), inv_t);
  if (warps == 1) return s;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? scratch[lane] : State<Acc>::empty();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) s = State<Acc>::merge(s, shfl_xor(s, offset), inv_t);
    if (lane == 0) scratch[32] = s;
  }
  __syncthreads();
  s = scratch[32];
  __syncthreads();  // scratch is reused by the next position
  return s;
}

// Loss of a position from its statistics; `counted` false gives 0.
template <typename Acc>
struct Finished {
  bool counted;
  Acc loss, mass, z_a, z_b, log_z_a, shift_a, shift_b, inv_t;  // shifts: raw maxima (0 for −inf)
};

template <typename Acc>
__device__ __forceinline__ Finished<Acc> finish(const State<Acc>& s, bool unmasked, Acc inv_t) {
  Finished<Acc> f;
  f.counted = unmasked && s.m_b != neg_inf<Acc>();
  f.z_a = f.counted ? s.z_a : Acc(1);
  f.z_b = f.counted ? s.z_b : Acc(1);
  f.mass = s.ws / f.z_b;
  f.log_z_a = acc_log(f.z_a);
  f.loss = f.counted ? f.mass * f.log_z_a - s.acc / f.z_b : Acc(0);
  f.shift_a = s.m_a == neg_inf<Acc>() ? Acc(0) : s.m_a;
  f.shift_b = s.m_b == neg_inf<Acc>() ? Acc(0) : s.m_b;
  f.inv_t = inv_t;
  return f;
}

// The two gradients of one class.
template <typename Acc>
__device__ __forceinline__ void class_gradients(const Finished<Acc>& f, Acc a, Acc b, Acc w, Acc coef, Acc& g_s,
                                                Acc& g_t) {
  if (!f.counted) {
    g_s = Acc(0);
    g_t = Acc(0);
    return;
  }
  // a, b: raw logits.
  const Acc p_t = acc_exp((b - f.shift_b) * f.inv_t) / f.z_b;
  const Acc wp_t = w * p_t;
  const Acc log_p_s = (a - f.shift_a) * f.inv_t - f.log_z_a;
  g_s = coef * (f.mass * acc_exp(log_p_s) - wp_t);
  g_t = p_t != Acc(0) ? -coef * p_t * (f.loss + (wp_t > Acc(0) ? w * log_p_s : Acc(0))) : Acc(0);
}

template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kMaxRowThreads) wsce_rows_kernel(const Args<S, T, Acc> args) {
  __shared__ State<Acc> scratch[33];
  const Acc coef = *static_cast<const Acc*>(args.grad_scale) * args.inv_temperature;
  for (int64_t pos = blockIdx.x; pos < args.positions; pos += gridDim.x) {
    const int64_t o = pos / args.inner, i = pos % args.inner;
    const S* s = args.student + o * args.s0 + i * args.s2;
    const T* t = args.teacher + o * args.t0 + i * args.t2;
    const bool unmasked = args.mask == nullptr || args.mask[pos];
    State<Acc> st = State<Acc>::empty();
    if (unmasked) {
      for (int64_t c = threadIdx.x; c < args.classes; c += blockDim.x) {
        const Acc a = to_acc<Acc>(s[c * args.s1]);
        const Acc b = to_acc<Acc>(t[c * args.t1]);
        st.add(a, b, args.weight ? args.weight[c] : Acc(1), args.inv_temperature);
      }
    }
    st = block_merge(st, scratch, args.inv_temperature);
    const Finished<Acc> f = finish(st, unmasked, args.inv_temperature);
    if (threadIdx.x == 0) args.loss[pos] = f.loss;
    if (args.grad_student == nullptr && args.grad_teacher == nullptr) continue;
    S* gs = args.grad_student ? args.grad_student + o * args.gs0 + i * args.gs2 : nullptr;
    T* gt = args.grad_teacher ? args.grad_teacher + o * args.gt0 + i * args.gt2 : nullptr;
    const int64_t mine = args.classes > threadIdx.x ? (args.classes - 1 - threadIdx.x) / blockDim.x : -1;
    for (int64_t k = mine; k >= 0; --k) {  // this thread's classes, last read first
      const int64_t c = threadIdx.x + k * blockDim.x;
      Acc g_s, g_t;
      if (f.counted) {
        const Acc a = to_acc<Acc>(s[c * args.s1]);
        const Acc b = to_acc<Acc>(t[c * args.t1]);
        class_gradients(f, a, b, args.weight ? args.weight[c] : Acc(1), coef, g_s, g_t);
      } else {
        g_s = g_t = Acc(0);
      }
      if (gs) gs[c * args.gs1] = from_acc<S>(g_s);
      if (gt) gt[c * args.gt1] = from_acc<T>(g_t);
    }
  }
}

template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kChannelThreads) wsce_channels_kernel(const Args<S, T, Acc> args) {
  const Acc coef = *static_cast<const Acc*>(args.grad_scale) * args.inv_temperature;
  for (int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pos < args.positions;
       pos += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = pos / args.inner, i = pos % args.inner;
    const S* s = args.student + o * args.s0 + i * args.s2;
    const T* t = args.teacher + o * args.t0 + i * args.t2;
    const bool unmasked = args.mask == nullptr || args.mask[pos];
    State<Acc> st = State<Acc>::empty();
    if (unmasked) {
      for (int64_t c = 0; c < args.classes; ++c) {
        const Acc a = to_acc<Acc>(s[c * args.s1]);
        const Acc b = to_acc<Acc>(t[c * args.t1]);
        st.add(a, b, args.weight ? args.weight[c] : Acc(1), args.inv_temperature);
      }
    }
    const Finished<Acc> f = finish(st, unmasked, args.inv_temperature);
    args.loss[pos] = f.loss;
    if (args.grad_student == nullptr && args.grad_teacher == nullptr) continue;
    S* gs = args.grad_student ? args.grad_student + o * args.gs0 + i * args.gs2 : nullptr;
    T* gt = args.grad_teacher ? args.grad_teacher + o * args.gt0 + i * args.gt2 : nullptr;
    for (int64_t c = args.classes - 1; c >= 0; --c) {
      Acc g_s = Acc(0), g_t = Acc(0);
      if (f.counted) {
        const Acc a = to_acc<Acc>(s[c * args.s1]);
        const Acc b = to_acc<Acc>(t[c * args.t1]);
        class_gradients(f, a, b, args.weight ? args.weight[c] : Acc(1), coef, g_s, g_t);
      }
      if (gs) gs[c * args.gs1] = from_acc<S>(g_s);
      if (gt) gt[c * args.gt1] = from_acc<T>(g_t);
    }
  }
}

template <typename S, typename T>
cudaError_t launch_typed(const WeightedSoftCeParams& p, cudaStream_t stream) {
  using Acc = acc_t<S, T>;
  Args<S, T, Acc> a;
  a.student = static_cast<const S*>(p.student);
  a.teacher = static_cast<const T*>(p.teacher);
  a.weight = static_cast<const Acc*>(p.class_weight);
  a.mask = p.mask;
  a.grad_scale = p.grad_scale;
  a.loss = static_cast<Acc*>(p.loss);
  a.grad_student = static_cast<S*>(p.grad_student);
  a.grad_teacher = static_cast<T*>(p.grad_teacher);
  a.classes = p.classes;
  a.inner = p.inner;
  a.positions = p.outer * p.inner;
  a.s0 = p.student_strides[0];
  a.s1 = p.student_strides[1];
  a.s2 = p.student_strides[2];
  a.t0 = p.teacher_strides[0];
  a.t1 = p.teacher_strides[1];
  a.t2 = p.teacher_strides[2];
  a.gs0 = p.grad_student_strides[0];
  a.gs1 = p.grad_student_strides[1];
  a.gs2 = p.grad_student_strides[2];
  a.gt0 = p.grad_teacher_strides[0];
  a.gt1 = p.grad_teacher_strides[1];
  a.gt2 = p.grad_teacher_strides[2];
  a.inv_temperature = static_cast<Acc>(1.0 / p.temperature);

  // Rows when classes are contiguous (or there is one position per outer index): a block per row.
  const bool rows = p.inner == 1 || (a.s1 == 1 && a.t1 == 1);
  if (rows) {
    int threads = kMinRowThreads;  // about 4 classes per thread, within [32, 512]; depends on C only
    while (threads < kMaxRowThreads && static_cast<int64_t>(threads) * 4 < p.classes) threads *= 2;
    const unsigned grid = static_cast<unsigned>(std::min(a.positions, kMaxGrid));
    wsce_rows_kernel<S, T, Acc><<<grid, threads, 0, stream>>>(a);
  } else {
    const int64_t blocks = (a.positions + kChannelThreads - 1) / kChannelThreads;
    const unsigned grid = static_cast<unsigned>(std::min(blocks, kMaxGrid));
    wsce_channels_kernel<S, T, Acc><<<grid, kChannelThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_weighted_soft_ce_rows(const WeightedSoftCeParams& params, cudaStream_t stream) {
  if (params.outer < 0 || params.classes < 0 || params.inner < 0 || !(params.temperature > 0.0))
    return cudaErrorInvalidValue;
  const int64_t positions = params.outer * params.inner;
  if (positions == 0) return cudaSuccess;
  if (params.loss == nullptr || params.grad_scale == nullptr) return cudaErrorInvalidValue;
  if (params.classes > 0 && (params.student == nullptr || params.teacher == nullptr)) return cudaErrorInvalidValue;
  cudaError_t status = cudaSuccess;
  const bool known = dispatch_dtype_pair(params.student_dtype, params.teacher_dtype, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    status = launch_typed<S, T>(params, stream);
  });
  return known ? status : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdkernels
