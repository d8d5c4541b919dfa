// CUDA kernels of kdkernels::kd_loss_rows. Torch-free: raw pointers, int64 sizes and strides.
//
// Per position (o, i) of (outer, classes, inner) views, with a_c = s_c / T and b_c = t_c / T in the
// accumulation type (fp32; fp64 if an input is fp64):
//   L'   = Σ_c p_t,c (b_c − a_c) − lse_b + lse_a            (= KL(p_t ‖ p_s), p = softmax)
//   loss = T² · L'                                           (0 where the mask is false)
//   grad_student_c = gs·T·(p_s,c − p_t,c)
//   grad_teacher_c = gs·T·p_t,c·((b_c − lse_b) − (a_c − lse_a) − L')
//                  = gs·T·p_t,c·((b_c − a_c) − Σ_k p_t,k (b_k − a_k))     (what we compute)
// with gs = *grad_scale read on the device. A class with b_c = −inf (p_t,c = 0) contributes exactly
// 0 to the loss and gets a teacher gradient of exactly 0, even if a_c = −inf too; a position whose
// teacher logits are all −inf (or that is masked out) gets loss 0 and zero gradients.
//
// Statistics are gathered in ONE pass with the online-softmax recurrence: per thread a running
// max m of the RAW logits and rescaled sums
//   Z_a = Σ e^{(s − m_s)/T},  Z_b = Σ e^{(t − m_t)/T},  W = Σ e^{(t − m_t)/T}·(b − a),
// rescaled by e^{(m_old − m_new)/T} when a max grows; partial states are then merged across the
// block with the same rule (merge). Shifting the raw logits before scaling makes every exponent
// <= 0 and the maximum's exactly 0 (no overflow for any finite logits, V = 1 gives exactly 0);
// maxima propagate NaN, so a NaN logit makes its position NaN (kdkernels/ops/reference rules).
// From them (with m_a = m_s/T, m_b = m_t/T):
//   E = Σ p_t (b − a) = W / Z_b,  lse_b − lse_a = (m_b − m_a) + log(Z_b / Z_a),  L' = E − (lse_b − lse_a).
// Writing lse_b − lse_a this way (difference of maxima + log of a ratio) avoids subtracting two
// large log-sum-exps, which would cost ~1e-6 absolute in fp32 on a loss that is often tiny.
//
// Two kernels:
// * rows: one thread block per position, for class stride 1 (LLM logits, C up to 262144): loads
//   are 16-byte vectors when the row is suitably aligned (a scalar "head" reaches alignment; rows
//   whose tensors are misaligned differently fall back to scalar loads). Also used for any layout
//   when there are few positions. Any strides are handled correctly.
// * channels: one thread per position, consecutive threads on consecutive inner indices, so that
//   for contiguous NCHW with dim=1 each class step is a coalesced load across the warp. Handles
//   any strides (it is the generic path).
//
// Determinism: no atomics; every thread visits a fixed set of classes in a fixed order and the
// block merge is a fixed tree, so the loss is bit-identical from run to run for the same inputs
// (the split into head / vectors / tail depends on the row's address modulo 16 bytes, which is the
// same for the same tensors).

#include "kd_loss_kernel.cuh"

#include <algorithm>

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxRowThreads = 512;      // rows kernel: threads per block (at most)
constexpr int kMinRowThreads = 32;       // rows kernel: threads per block (at least; short rows)
constexpr int kRowMinBlocksPerSM = 1;    // rows kernel: up to 128 registers per thread. Measured on
                                         // H100: capping at 64 (2 blocks per SM) spills and is
                                         // 20-50% slower on LLM-vocabulary rows.
constexpr int kScalarUnroll = 4;         // rows kernel, scalar path: elements loaded per thread before use
constexpr int kChannelThreads = 256;     // channels kernel: threads per block
constexpr int64_t kFewPositions = 1024;  // below this, the rows kernel even for strided classes
constexpr int64_t kMaxGrid = 2147483647; // gridDim.x limit; kernels loop (grid-stride) beyond it

template <typename S, typename T, typename Acc>
struct Args {
  const S* student;
  const T* teacher;
  S* grad_student;  // nullptr: not requested
  T* grad_teacher;  // nullptr: not requested
  Acc* loss;        // (outer, inner) contiguous
  const bool* mask; // (outer, inner) contiguous, or nullptr
  const void* grad_scale;  // the accumulation type
  int64_t classes, inner, positions;
  int64_t s0, s1, s2, t0, t1, t2;
  int64_t gs0, gs1, gs2, gt0, gt1, gt2;
  Acc inv_temperature, temperature, temperature_sq;
};

// Online-softmax state of one thread (or, after merging, of a whole position).
template <typename Acc>
struct Stats {
  Acc ma, za;     // student: running max of a, Σ e^{a − ma}
  Acc mb, zb, w;  // teacher: running max of b, Σ e^{b − mb}, Σ e^{b − mb}·(b − a)
};

template <typename Acc>
__device__ __forceinline__ Stats<Acc> empty_stats() {
  Stats<Acc> st;
  st.ma = neg_inf<Acc>();
  st.za = Acc(0);
  st.mb = neg_inf<Acc>();
  st.zb = Acc(0);
  st.w = Acc(0);
  return st;
}

// Factor that moves a sum kept relative to max m_old onto max m_new >= m_old. A sum whose max is
// still −inf is empty (0), so its factor is 0: this also avoids e^{−inf − (−inf)} = NaN.
template <typename Acc>
__device__ __forceinline__ Acc rescale(Acc m_old, Acc m_new, Acc inv_t) {
  return m_old == neg_inf<Acc>() ? Acc(0) : acc_exp((m_old - m_new) * inv_t);
}

// max(x, y) that is NaN when either is.
template <typename Acc>
__device__ __forceinline__ Acc nan_max(Acc x, Acc y) {
  return (x != x || x > y) ? x : y;
}

// weight · value, but exactly 0 when the weight is 0: a teacher class of probability 0 (logit −inf,
// or e^{b − m_b} underflowed) adds nothing even when value = b − a is +inf (student logit −inf).
template <typename Acc>
__device__ __forceinline__ Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

// e^{−|x − m|}: the one exponential an online update needs. If x > m it rescales the old sum to
// the new max x (and the new term is e^0 = 1); otherwise it is the new term e^{x − m}. x = −inf
// gives 0 (also when m is still −inf, where x − m would be NaN); a NaN x gives NaN.
template <typename Acc>
__device__ __forceinline__ Acc online_exp(Acc x, Acc m, Acc inv_t) {
  const Acc d = x > m ? m - x : x - m;
  return acc_exp(x == neg_inf<Acc>() ? neg_inf<Acc>() : d * inv_t);
}

// Adds one class (raw logits a = s, b = t) to a thread's state. Branch-free (selects only), so the
// compiler does not evaluate both sides of a branch: exactly one exponential per logit. A NaN
// becomes the running maximum (!(x <= m)), so everything after it is NaN.
template <typename Acc>
__device__ __forceinline__ void add_class(Stats<Acc>& st, Acc a, Acc b, Acc inv_t) {
  const Acc ea = online_exp(a, st.ma, inv_t);
  const bool a_up = !(a <= st.ma);
  st.za = st.za * (a_up ? ea : Acc(1)) + (a_up ? Acc(1) : ea);
  st.ma = a_up ? a : st.ma;

  const Acc eb = online_exp(b, st.mb, inv_t);
  const bool b_up = !(b <= st.mb);
  const Acc old_scale = b_up ? eb : Acc(1);  // factor on the old sums
  const Acc new_weight = b_up ? Acc(1) : eb;  // e^{b − mb} of this class, relative to the new max
  st.zb = st.zb * old_scale + new_weight;
  // b = −inf: new_weight = 0, so the class adds exactly 0 even if b − a is NaN or ±inf.
  st.w = weighted(old_scale, st.w) + weighted(new_weight, (b - a) * inv_t);
  st.mb = b_up ? b : st.mb;
}

// The state of the union of two disjoint sets of classes.
template <typename Acc>
__device__ __forceinline__ Stats<Acc> merge(const Stats<Acc>& x, const Stats<Acc>& y, Acc inv_t) {
  Stats<Acc> r;
  r.ma = nan_max(x.ma, y.ma);
  r.za = x.za * rescale(x.ma, r.ma, inv_t) + y.za * rescale(y.ma, r.ma, inv_t);
  r.mb = nan_max(x.mb, y.mb);
  const Acc sx = rescale(x.mb, r.mb, inv_t);
  const Acc sy = rescale(y.mb, r.mb, inv_t);
  r.zb = x.zb * sx + y.zb * sy;
  r.w = weighted(sx, x.w) + weighted(sy, y.w);
  return r;
}

template <typename Acc>
__device__ __forceinline__ Stats<Acc> shfl_xor_stats(const Stats<Acc>& st, int offset) {
  Stats<Acc> o;
  o.ma = __shfl_xor_sync(0xffffffffu, st.ma, offset);
  o.za = __shfl_xor_sync(0xffffffffu, st.za, offset);
  o.mb = __shfl_xor_sync(0xffffffffu, st.mb, offset);
  o.zb = __shfl_xor_sync(0xffffffffu, st.zb, offset);
  o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
  return o;
}

// Merges the states of all threads of the block (fixed tree: deterministic); every thread gets the
// result. Must be called by all threads; blockDim.x is a multiple of 32. `scratch` has 33 entries.
template <typename Acc>
__device__ Stats<Acc> block_merge(Stats<Acc> st, Stats<Acc>* scratch, Acc inv_t) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) st = merge(st, shfl_xor_stats(st, offset), inv_t);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? scratch[lane] : empty_stats<Acc>();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) st = merge(st, shfl_xor_stats(st, offset), inv_t);
    if (lane == 0) scratch[32] = st;
  }
  __syncthreads();
  const Stats<Acc> total = scratch[32];
  __syncthreads();  // scratch is reused by the next position
  return total;
}

// What the gradient pass needs of a position's statistics.
template <typename Acc>
struct GradCtx {
  Acc ma, mb, inv_za, inv_zb;  // raw maxima
  Acc expect;  // E = Σ p_t (b − a)
  Acc gs_t;    // grad_scale · T
  Acc inv_t;
};

template <typename Acc>
__device__ __forceinline__ void class_grads(const GradCtx<Acc>& g, Acc a, Acc b, Acc& grad_s, Acc& grad_t) {
  // a, b: raw logits.
  const Acc pa = acc_exp((a - g.ma) * g.inv_t) * g.inv_za;
  const Acc pb = acc_exp((b - g.mb) * g.inv_t) * g.inv_zb;
  grad_s = g.gs_t * (pa - pb);
  // Exactly 0 where p_t = 0 (b = −inf, or underflow), whatever b − a is.
  grad_t = pb == Acc(0) ? Acc(0) : g.gs_t * pb * ((b - a) * g.inv_t - g.expect);
}

// Loss of a position from its merged state (not masked, teacher not all −inf).
template <typename Acc>
__device__ __forceinline__ Acc position_loss(const Stats<Acc>& st, Acc expect, Acc temperature_sq, Acc inv_t) {
  // A student that is −inf everywhere gives 0 probability where the teacher has mass: +inf.
  if (st.ma == neg_inf<Acc>()) return -neg_inf<Acc>();
  const Acc lse_diff = (st.mb - st.ma) * inv_t + acc_log(st.zb / st.za);  // lse_b − lse_a
  return temperature_sq * (expect - lse_diff);
}

template <typename Acc>
__device__ __forceinline__ GradCtx<Acc> grad_ctx(const Stats<Acc>& st, Acc gs_t, Acc inv_t) {
  GradCtx<Acc> g;
  g.ma = st.ma;
  g.mb = st.mb;
  g.inv_za = Acc(1) / st.za;
  g.inv_zb = Acc(1) / st.zb;
  g.expect = st.w * g.inv_zb;
  g.gs_t = gs_t;
  g.inv_t = inv_t;
  return g;
}

// ------------------------------------------------------------------------------------------------
// Rows kernel: one block per position (grid-stride over positions), VEC elements per vector load,
// UNROLL vector loads per thread issued together (memory-level parallelism).
template <typename S, typename T, int VEC, int UNROLL>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocksPerSM) kd_rows_kernel(const Args<S, T, acc_t<S, T>> args) {
  using Acc = acc_t<S, T>;
  __shared__ Stats<Acc> scratch[33];

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t C = args.classes;
  const Acc inv_t = args.inv_temperature;
  const bool want_gs = args.grad_student != nullptr;
  const bool want_gt = args.grad_teacher != nullptr;
  const bool want_grad = want_gs || want_gt;
  const Acc gs_t = want_grad ? *static_cast<const Acc*>(args.grad_scale) * args.temperature : Acc(0);
  const int64_t step = static_cast<int64_t>(nthreads) * UNROLL;                // vectors per super-tile
  const int64_t scalar_step = static_cast<int64_t>(nthreads) * kScalarUnroll;  // scalar path: elements

  for (int64_t row = blockIdx.x; row < args.positions; row += gridDim.x) {
    const int64_t o = row / args.inner;
    const int64_t i = row - o * args.inner;
    const S* s_row = args.student + (o * args.s0 + i * args.s2);
    const T* t_row = args.teacher + (o * args.t0 + i * args.t2);
    S* gs_row = want_gs ? args.grad_student + (o * args.gs0 + i * args.gs2) : nullptr;
    T* gt_row = want_gt ? args.grad_teacher + (o * args.gt0 + i * args.gt2) : nullptr;
    const bool active = args.mask == nullptr || args.mask[row];

    // Vector layout of this row: `head` scalar elements up to a VEC boundary, `nvec` vectors, then
    // scalar elements from `tail` to C. Needs unit class stride and the same misalignment (in
    // elements, modulo VEC) for every pointer we touch; otherwise the whole row is scalar.
    bool vec = VEC > 1 && args.s1 == 1 && args.t1 == 1 && (!want_gs || args.gs1 == 1) &&
               (!want_gt || args.gt1 == 1);
    int64_t head = 0;
    if (vec) {
      const int r = element_misalignment<VEC>(s_row);
      vec = r >= 0 && element_misalignment<VEC>(t_row) == r &&
            (!want_gs || element_misalignment<VEC>(gs_row) == r) &&
            (!want_gt || element_misalignment<VEC>(gt_row) == r);
      if (vec) {
        head = (VEC - r) % VEC;
        if (head > C) head = C;
      }
    }
    const int64_t nvec = vec ? (C - head) / VEC : 0;
    const int64_t tail = head + nvec * VEC;

    // ---- pass 1: online statistics, front to back -------------------------------------------
    Stats<Acc> st = empty_stats<Acc>();
    if (active) {
      if (vec) {
        for (int64_t c = tid; c < head; c += nthreads)
          add_class(st, to_acc<Acc>(s_row[c]), to_acc<Acc>(t_row[c]), inv_t);
        for (int64_t base = 0; base < nvec; base += step) {
          // Issue all loads of the super-tile before any math, so they are in flight together.
          Vec<S, VEC> sv[UNROLL];
          Vec<T, VEC> tv[UNROLL];
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) {
            const int64_t v = base + static_cast<int64_t>(u) * nthreads + tid;
            if (v < nvec) {
              sv[u] = *reinterpret_cast<const Vec<S, VEC>*>(s_row + head + v * VEC);
              tv[u] = *reinterpret_cast<const Vec<T, VEC>*>(t_row + head + v * VEC);
            }
          }
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) {
            const int64_t v = base + static_cast<int64_t>(u) * nthreads + tid;
            if (v < nvec) {
#pragma unroll
              for (int k = 0; k < VEC; ++k)
                add_class(st, to_acc<Acc>(sv[u].v[k]), to_acc<Acc>(tv[u].v[k]), inv_t);
            }
          }
        }
        for (int64_t c = tail + tid; c < C; c += nthreads)
          add_class(st, to_acc<Acc>(s_row[c]), to_acc<Acc>(t_row[c]), inv_t);
      } else {
        for (int64_t base = 0; base < C; base += scalar_step) {
          Acc av[kScalarUnroll];
          Acc bv[kScalarUnroll];
#pragma unroll
          for (int u = 0; u < kScalarUnroll; ++u) {
            const int64_t c = base + static_cast<int64_t>(u) * nthreads + tid;
            if (c < C) {
              av[u] = to_acc<Acc>(s_row[c * args.s1]);
              bv[u] = to_acc<Acc>(t_row[c * args.t1]);
            }
          }
#pragma unroll
          for (int u = 0; u < kScalarUnroll; ++u) {
            const int64_t c = base + static_cast<int64_t>(u) * nthreads + tid;
            if (c < C) add_class(st, av[u], bv[u], inv_t);
          }
        }
      }
    }
    st = block_merge(st, scratch, inv_t);

    // Masked out, or no teacher distribution (all b = −inf, or C = 0): loss 0, gradients 0. A NaN
    // maximum is not −inf: the position counts, and is NaN.
    const bool zero = !active || st.mb == neg_inf<Acc>();
    const GradCtx<Acc> g = grad_ctx(st, gs_t, inv_t);  // unused when zero
    if (tid == 0) args.loss[row] = zero ? Acc(0) : position_loss(st, g.expect, args.temperature_sq, inv_t);

    if (!want_grad) continue;

    // ---- pass 2: gradients, back to front --------------------------------------------------
    // Pass 1 ended at the end of the row, so that part is the most likely to still be in L2:
    // walking the row in reverse super-tile order re-reads it from L2 rather than HBM.
    auto scalar_grad = [&](int64_t c) {
      Acc grad_s = Acc(0);
      Acc grad_t = Acc(0);
      if (!zero) {
        const Acc a = to_acc<Acc>(s_row[c * args.s1]);
        const Acc b = to_acc<Acc>(t_row[c * args.t1]);
        class_grads(g, a, b, grad_s, grad_t);
      }
      if (want_gs) gs_row[c * args.gs1] = from_acc<S>(grad_s);
      if (want_gt) gt_row[c * args.gt1] = from_acc<T>(grad_t);
    };

    if (vec) {
      for (int64_t c = tail + tid; c < C; c += nthreads) scalar_grad(c);
      const int64_t last = nvec > 0 ? ((nvec - 1) / step) * step : -1;
      for (int64_t base = last; base >= 0; base -= step) {
        Vec<S, VEC> sv[UNROLL];
        Vec<T, VEC> tv[UNROLL];
        if (!zero) {
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) {
            const int64_t v = base + static_cast<int64_t>(u) * nthreads + tid;
            if (v < nvec) {
              sv[u] = *reinterpret_cast<const Vec<S, VEC>*>(s_row + head + v * VEC);
              tv[u] = *reinterpret_cast<const Vec<T, VEC>*>(t_row + head + v * VEC);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int64_t v = base + static_cast<int64_t>(u) * nthreads + tid;
          if (v < nvec) {
            Vec<S, VEC> out_s;
            Vec<T, VEC> out_t;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              Acc grad_s = Acc(0);
              Acc grad_t = Acc(0);
              if (!zero)
                class_grads(g, to_acc<Acc>(sv[u].v[k]), to_acc<Acc>(tv[u].v[k]), grad_s, grad_t);
              out_s.v[k] = from_acc<S>(grad_s);
              out_t.v[k] = from_acc<T>(grad_t);
            }
            if (want_gs) *reinterpret_cast<Vec<S, VEC>*>(gs_row + head + v * VEC) = out_s;
            if (want_gt) *reinterpret_cast<Vec<T, VEC>*>(gt_row + head + v * VEC) = out_t;
          }
        }
      }
      for (int64_t c = tid; c < head; c += nthreads) scalar_grad(c);
    } else {
      const int64_t last = C > 0 ? ((C - 1) / scalar_step) * scalar_step : -1;
      for (int64_t base = last; base >= 0; base -= scalar_step) {
#pragma unroll
        for (int u = 0; u < kScalarUnroll; ++u) {
          const int64_t c = base + static_cast<int64_t>(u) * nthreads + tid;
          if (c < C) scalar_grad(c);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Channels kernel: one thread per position (grid-stride), any strides. With contiguous (N, C, HW)
// views consecutive threads read consecutive addresses at every class step (coalesced).
template <typename S, typename T>
__global__ void __launch_bounds__(kChannelThreads) kd_channels_kernel(const Args<S, T, acc_t<S, T>> args) {
  using Acc = acc_t<S, T>;
  const int64_t C = args.classes;
  const Acc inv_t = args.inv_temperature;
  const bool want_gs = args.grad_student != nullptr;
  const bool want_gt = args.grad_teacher != nullptr;
  const bool want_grad = want_gs || want_gt;
  const Acc gs_t = want_grad ? *static_cast<const Acc*>(args.grad_scale) * args.temperature : Acc(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < args.positions; p += stride) {
    const int64_t o = p / args.inner;
    const int64_t i = p - o * args.inner;
    const S* s_pos = args.student + (o * args.s0 + i * args.s2);
    const T* t_pos = args.teacher + (o * args.t0 + i * args.t2);
    const bool active = args.mask == nullptr || args.mask[p];

    // Pass 1: online statistics over the classes.
    Stats<Acc> st = empty_stats<Acc>();
    if (active) {
#pragma unroll 4
      for (int64_t c = 0; c < C; ++c)
        add_class(st, to_acc<Acc>(s_pos[c * args.s1]), to_acc<Acc>(t_pos[c * args.t1]), inv_t);
    }
    const bool zero = !active || st.mb == neg_inf<Acc>();
    const GradCtx<Acc> g = grad_ctx(st, gs_t, inv_t);  // unused when zero
    args.loss[p] = zero ? Acc(0) : position_loss(st, g.expect, args.temperature_sq, inv_t);

    if (!want_grad) continue;

    // Pass 2: gradients, last class first (the classes read last are the likeliest in L2).
    S* gs_pos = want_gs ? args.grad_student + (o * args.gs0 + i * args.gs2) : nullptr;
    T* gt_pos = want_gt ? args.grad_teacher + (o * args.gt0 + i * args.gt2) : nullptr;
#pragma unroll 4
    for (int64_t c = C - 1; c >= 0; --c) {
      Acc grad_s = Acc(0);
      Acc grad_t = Acc(0);
      if (!zero) {
        const Acc a = to_acc<Acc>(s_pos[c * args.s1]);
        const Acc b = to_acc<Acc>(t_pos[c * args.t1]);
        class_grads(g, a, b, grad_s, grad_t);
      }
      if (want_gs) gs_pos[c * args.gs1] = from_acc<S>(grad_s);
      if (want_gt) gt_pos[c * args.gt1] = from_acc<T>(grad_t);
    }
  }
}

template <typename S, typename T>
cudaError_t launch_typed(const KdLossRowsParams& p, cudaStream_t stream) {
  using Acc = acc_t<S, T>;
  const int64_t positions = p.outer * p.inner;
  if (positions == 0) return cudaSuccess;

  Args<S, T, Acc> a;
  a.student = static_cast<const S*>(p.student);
  a.teacher = static_cast<const T*>(p.teacher);
  a.grad_student = static_cast<S*>(p.grad_student);
  a.grad_teacher = static_cast<T*>(p.grad_teacher);
  a.loss = static_cast<Acc*>(p.loss);
  a.mask = p.mask;
  a.grad_scale = p.grad_scale;
  a.classes = p.classes;
  a.inner = p.inner;
  a.positions = positions;
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
  a.temperature = static_cast<Acc>(p.temperature);
  a.temperature_sq = static_cast<Acc>(p.temperature * p.temperature);

  const bool rows_layout = p.inner == 1 || (a.s1 == 1 && a.t1 == 1) || positions <= kFewPositions;
  if (rows_layout) {
    constexpr int VEC = vec_width<S, T>();
    // 16 elements per thread per super-tile (8 for double): 2 x 16-byte loads per tensor for 2-byte
    // types, 4 for float. More would spill registers.
    constexpr int UNROLL = VEC >= 8 ? 2 : 4;
    // Enough threads that each does about one super-tile on short rows, capped at kMaxRowThreads
    // on long ones. Depends on C and the dtypes only (determinism).
    int threads = kMinRowThreads;
    while (threads < kMaxRowThreads && static_cast<int64_t>(threads) * VEC * UNROLL < p.classes) threads *= 2;
    const unsigned grid = static_cast<unsigned>(std::min(positions, kMaxGrid));
    kd_rows_kernel<S, T, VEC, UNROLL><<<grid, threads, 0, stream>>>(a);
  } else {
    const int64_t blocks = (positions + kChannelThreads - 1) / kChannelThreads;
    const unsigned grid = static_cast<unsigned>(std::min(blocks, kMaxGrid));
    kd_channels_kernel<S, T><<<grid, kChannelThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kd_loss_rows(const KdLossRowsParams& params, cudaStream_t stream) {
  if (params.outer < 0 || params.classes < 0 || params.inner < 0 || !(params.temperature > 0.0))
    return cudaErrorInvalidValue;
  // Empty tensors may have null data pointers: only positions with classes read the inputs.
  const int64_t positions = params.outer * params.inner;
  if (positions > 0 && params.loss == nullptr) return cudaErrorInvalidValue;
  if (positions > 0 && params.classes > 0 &&
      (params.student == nullptr || params.teacher == nullptr ||
       ((params.grad_student != nullptr || params.grad_teacher != nullptr) && params.grad_scale == nullptr)))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaSuccess;
  const bool known = detail::dispatch_dtype_pair(params.student_dtype, params.teacher_dtype, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    status = launch_typed<S, T>(params, stream);
  });
  return known ? status : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdkernels
