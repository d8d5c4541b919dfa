// The two-distribution online-softmax row walker shared by the CUDA kernels of the softmax losses
// (kd_loss_rows, weighted_soft_ce_rows). Torch-free, like common.cuh.
//
// A softmax loss reads a student and a teacher as (outer, classes, inner) views of any strides;
// each position (o, i) is one class vector. Per position the walker keeps, in ONE pass over the
// classes, the running maxima m_s, m_t of the RAW logits and the sums
//   Z_a = Σ e^{(s − m_s)/T},  Z_b = Σ e^{(t − m_t)/T},
// rescaled by e^{(m_old − m_new)/T} when a maximum grows, plus the loss's own cross terms (sums
// that mix the two distributions, e.g. Σ e^{(t − m_t)/T}·(t − s)/T). Shifting the raw logits
// before scaling makes every exponent <= 0 and the maximum's exactly 0 (no overflow for finite
// logits; one class gives exactly 0); maxima propagate NaN (!(x <= m) takes a NaN as the new
// maximum), so a NaN logit makes its position NaN. Then a second pass writes the gradients.
// Masked-out positions, and positions whose teacher logits are all −inf (no teacher
// distribution), get loss 0 and zero gradients without reading the inputs again.
//
// A loss is a policy struct (see KdLossPolicy in kd_loss_kernel.cu for a full one):
//   using Acc = ...;                        the accumulation type (float or double)
//   static Policy make(const Params&);      from the launcher's params (host)
//   static constexpr bool kVectorLoads;     rows kernel: 16-byte loads when a row is aligned
//   static constexpr int64_t kRowsKernelMaxPositions;   rows kernel for any class stride up to
//                                           this many positions (0: only for unit class stride
//                                           or inner == 1)
//   struct Terms { static Terms empty(); Terms shfl_xor(int offset) const; ... };  cross terms
//   void add(Terms&, const ClassStep<Acc>&, int64_t c, Acc inv_t) const;   one class
//   Terms merge(const Terms& x, const Terms& y, const MergeStep<Acc>&, Acc inv_t) const;
//   Acc grad_coef(Acc grad_scale) const;   the factor on the gradients (read once per block)
//   Finished finish(const PairStats<Acc, Terms>&, Acc grad_coef, Acc inv_t) const;
//   Acc loss(const PairStats<Acc, Terms>&, const Finished&, Acc inv_t) const;
//   void grads(const Finished&, Acc a, Acc b, int64_t c, Acc& grad_s, Acc& grad_t) const;
// finish runs for every position (its result is unused where the position does not count); loss
// and grads run for counted positions only (the walker writes the zeros).
//
// The LLM divergences (divergences_kernel.cu) use the per-class update and merge (add_class, merge)
// with their own block-per-position kernel: their logits are transformed (soft-cap, scale) before
// the walker sees them, and the mixtures (JSD, skew KLs, TVD) need one more block-reduced pass of
// per-class terms of the normalised distributions between the statistics and the gradients.
//
// A loss's launcher is launch_softmax_pair_loss<Policy>(params, stream). Two kernels, the launcher
// picks one per call (launch_softmax_pair):
// * rows: one thread block per position (grid-stride over positions), threads striding over the
//   classes. With kVectorLoads and unit class stride, loads are 16-byte vectors when the row is
//   suitably aligned (a scalar "head" reaches alignment; rows whose tensors are misaligned
//   differently fall back to scalar loads); the per-thread states merge across the block in a
//   fixed tree. The gradient pass walks the row back to front: the end of the row, read last, is
//   the likeliest to still be in L2.
// * channels: one thread per position, consecutive threads on consecutive inner indices, so that
//   for contiguous NCHW with dim=1 each class step is a coalesced load across the warp. Any
//   strides (it is the generic path).
//
// Determinism: no atomics; every thread visits a fixed set of classes in a fixed order and the
// block merge is a fixed tree, so the loss is bit-identical from run to run for the same inputs
// (the split into head / vectors / tail depends on the row's address modulo 16 bytes, which is the
// same for the same tensors).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace kdkernels {
namespace cuda {

// The arguments of a two-distribution row loss, as raw pointers, sizes and element strides (int64:
// tensors may have more than 2^31 elements). `student`/`teacher` are (outer, classes, inner) views
// of any strides; the two may have different dtypes.
struct SoftmaxPairParams {
  TypedInput student;
  int64_t student_strides[3] = {0, 0, 0};

  TypedInput teacher;
  int64_t teacher_strides[3] = {0, 0, 0};

  int64_t outer = 0;
  int64_t classes = 0;
  int64_t inner = 0;

  const bool* mask = nullptr;        // (outer, inner) contiguous, or nullptr for "all positions"
  const void* grad_scale = nullptr;  // one value of the accumulation type (fp32/fp64) on the device
  double temperature = 1.0;

  // (outer, inner) contiguous; float, or double when either input is double (see loss_is_double).
  void* loss = nullptr;

  // Gradients in the input's dtype, with their own strides (at::empty_like may not keep the
  // input's strides, e.g. for a view with gaps). nullptr: gradient not requested.
  void* grad_student = nullptr;
  int64_t grad_student_strides[3] = {0, 0, 0};
  void* grad_teacher = nullptr;
  int64_t grad_teacher_strides[3] = {0, 0, 0};
};

// cudaErrorInvalidValue for arguments no launch can take, else cudaSuccess. Empty tensors may have
// null data pointers: only positions with classes read the inputs.
inline cudaError_t check_softmax_pair_params(const SoftmaxPairParams& p) {
  if (p.outer < 0 || p.classes < 0 || p.inner < 0 || !(p.temperature > 0.0)) return cudaErrorInvalidValue;
  const int64_t positions = p.outer * p.inner;
  if (positions > 0 && p.loss == nullptr) return cudaErrorInvalidValue;
  if (positions > 0 && p.classes > 0 &&
      (p.student.data == nullptr || p.teacher.data == nullptr ||
       ((p.grad_student != nullptr || p.grad_teacher != nullptr) && p.grad_scale == nullptr)))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

#ifdef __CUDACC__
namespace detail {

constexpr int kMaxRowThreads = 512;      // rows kernel: threads per block (at most)
constexpr int kMinRowThreads = 32;       // rows kernel: threads per block (at least; short rows)
constexpr int kRowMinBlocksPerSM = 1;    // rows kernel: up to 128 registers per thread. Measured on
                                         // H100 (kd_loss): capping at 64 (2 blocks per SM) spills
                                         // and is 20-50% slower on LLM-vocabulary rows.
constexpr int kScalarUnroll = 4;         // rows kernel, scalar path: elements loaded per thread before use
constexpr int kChannelThreads = 256;     // channels kernel: threads per block

// The kernels' view of SoftmaxPairParams, typed.
template <typename S, typename T, typename Acc>
struct PairArgs {
  const S* student;
  const T* teacher;
  S* grad_student;  // nullptr: not requested
  T* grad_teacher;  // nullptr: not requested
  Acc* loss;        // (outer, inner) contiguous
  const bool* mask; // (outer, inner) contiguous, or nullptr
  const void* grad_scale;  // the accumulation type
  int64_t classes, inner, positions;
  int64_t s_stride[3], t_stride[3], gs_stride[3], gt_stride[3];  // (outer, classes, inner)
  Acc inv_temperature;
};

// Where position p = o·inner + i of the (outer, classes, inner) views starts in each tensor, and
// whether the mask counts it. A gradient pointer is null when that gradient is not requested.
template <typename S, typename T>
struct PositionPtrs {
  const S* s;
  const T* t;
  S* gs;
  T* gt;
  bool active;
};

template <typename S, typename T, typename Acc>
__host__ __device__ __forceinline__ PositionPtrs<S, T> position_ptrs(const PairArgs<S, T, Acc>& args, int64_t p) {
  const int64_t o = p / args.inner;
  const int64_t i = p - o * args.inner;
  PositionPtrs<S, T> pos;
  pos.s = args.student + (o * args.s_stride[0] + i * args.s_stride[2]);
  pos.t = args.teacher + (o * args.t_stride[0] + i * args.t_stride[2]);
  pos.gs = args.grad_student != nullptr ? args.grad_student + (o * args.gs_stride[0] + i * args.gs_stride[2]) : nullptr;
  pos.gt = args.grad_teacher != nullptr ? args.grad_teacher + (o * args.gt_stride[0] + i * args.gt_stride[2]) : nullptr;
  pos.active = args.mask == nullptr || args.mask[p];
  return pos;
}

// The policy's factor on the gradients, from *grad_scale on the device; 0 without reading
// grad_scale when no gradient is requested.
template <typename Policy, typename S, typename T>
__device__ __forceinline__ typename Policy::Acc gradient_coef(const PairArgs<S, T, typename Policy::Acc>& args,
                                                              const Policy& policy) {
  using Acc = typename Policy::Acc;
  const bool want_grad = args.grad_student != nullptr || args.grad_teacher != nullptr;
  return want_grad ? policy.grad_coef(*static_cast<const Acc*>(args.grad_scale)) : Acc(0);
}

// Writes class c's requested gradients through the class strides: the policy's where the position
// counts (zero == false; the logits are read again), else 0.
template <typename Policy, typename S, typename T, typename Finished>
__device__ __forceinline__ void store_class_grads(const PairArgs<S, T, typename Policy::Acc>& args,
                                                  const PositionPtrs<S, T>& pos, const Policy& policy,
                                                  const Finished& fin, bool zero, int64_t c) {
  using Acc = typename Policy::Acc;
  Acc grad_s = Acc(0);
  Acc grad_t = Acc(0);
  if (!zero) {
    const Acc a = to_acc<Acc>(pos.s[c * args.s_stride[1]]);
    const Acc b = to_acc<Acc>(pos.t[c * args.t_stride[1]]);
    policy.grads(fin, a, b, c, grad_s, grad_t);
  }
  if (pos.gs != nullptr) pos.gs[c * args.gs_stride[1]] = from_acc<S>(grad_s);
  if (pos.gt != nullptr) pos.gt[c * args.gt_stride[1]] = from_acc<T>(grad_t);
}

// The running statistics of one position (or of the classes one thread has seen): raw maxima
// ma = m_s, mb = m_t, sums za = Z_a, zb = Z_b, and the loss's cross terms.
template <typename Acc, typename Terms>
struct PairStats {
  Acc ma, za, mb, zb;
  Terms terms;
};

// What one class did to the running statistics, for the policy's cross terms. For each side:
// the raw logit, the maximum before and after, whether the class raised it (or is NaN), the
// factor `scale` on the sums gathered so far and the class's own weight e^{(x − m_new)/T}
// (scale = e^{(m_old − x)/T} and weight = 1 when the maximum grew, else scale = 1 and weight =
// e^{(x − m)/T}).
template <typename Acc>
struct ClassStep {
  Acc a, b;  // raw student and teacher logits
  Acc ma_old, ma, a_scale, a_weight;
  Acc mb_old, mb, b_scale, b_weight;
  bool a_up, b_up;
};

// What merging two states did: each side's maximum, the merged one, and the factor
// e^{(m_side − m)/T} (0 for a side that saw no finite logit) on each side's sums.
template <typename Acc>
struct MergeStep {
  Acc ma_x, ma_y, ma, a_scale_x, a_scale_y;
  Acc mb_x, mb_y, mb, b_scale_x, b_scale_y;
};

// e^{(m_old − m_new)/T}, the factor that re-references sums to a new maximum; 0 for a state that
// has seen no finite logit (its sums are 0 and m_old − m_new could be NaN).
template <typename Acc>
__host__ __device__ __forceinline__ Acc rescale(Acc m_old, Acc m_new, Acc inv_t) {
  return m_old == neg_inf<Acc>() ? Acc(0) : acc_exp((m_old - m_new) * inv_t);
}

// weight · value, but exactly 0 when the weight is 0: a teacher class of probability 0 (logit −inf,
// or e^{b − m_b} underflowed) adds nothing even when value = b − a is +inf (student logit −inf).
template <typename Acc>
__host__ __device__ __forceinline__ Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

// e^{−|x − m|}: the one exponential an online update needs. If x > m it rescales the old sum to
// the new max x (and the new term is e^0 = 1); otherwise it is the new term e^{x − m}. x = −inf
// gives 0 (also when m is still −inf, where x − m would be NaN); a NaN x gives NaN.
template <typename Acc>
__host__ __device__ __forceinline__ Acc online_exp(Acc x, Acc m, Acc inv_t) {
  const Acc d = x > m ? m - x : x - m;
  return acc_exp(x == neg_inf<Acc>() ? neg_inf<Acc>() : d * inv_t);
}

template <typename Policy>
__host__ __device__ __forceinline__ PairStats<typename Policy::Acc, typename Policy::Terms> empty_stats() {
  using Acc = typename Policy::Acc;
  return {neg_inf<Acc>(), Acc(0), neg_inf<Acc>(), Acc(0), Policy::Terms::empty()};
}

// One distribution's part of add_class: folds the raw logit x into its running maximum m and sum z.
// Returns in `up` whether x raised the maximum (or is NaN: !(x <= m)), in `scale` the factor on the
// sum gathered so far and in `weight` the class's own e^{(x − m_new)/T}; m_old is m before.
template <typename Acc>
__host__ __device__ __forceinline__ void add_logit(Acc x, Acc& m, Acc& z, Acc inv_t, Acc& m_old, bool& up, Acc& scale,
                                                   Acc& weight) {
  const Acc e = online_exp(x, m, inv_t);
  up = !(x <= m);
  scale = up ? e : Acc(1);
  weight = up ? Acc(1) : e;
  m_old = m;
  z = z * scale + weight;
  m = up ? x : m;
}

// Adds one class (raw logits a = s, b = t, class index c) to a thread's state. Branch-free
// (selects only), so the compiler does not evaluate both sides of a branch: exactly one
// exponential per logit. A NaN becomes the running maximum (!(x <= m)), so everything after it is
// NaN.
template <typename Policy, typename Acc = typename Policy::Acc>
__host__ __device__ __forceinline__ void add_class(PairStats<Acc, typename Policy::Terms>& st, Acc a, Acc b, int64_t c,
                                          const Policy& policy, Acc inv_t) {
  ClassStep<Acc> step;
  step.a = a;
  step.b = b;
  add_logit(a, st.ma, st.za, inv_t, step.ma_old, step.a_up, step.a_scale, step.a_weight);
  step.ma = st.ma;
  add_logit(b, st.mb, st.zb, inv_t, step.mb_old, step.b_up, step.b_scale, step.b_weight);
  step.mb = st.mb;
  policy.add(st.terms, step, c, inv_t);
}

// One distribution's part of merge: the merged maximum m of m_x and m_y, the factors on each
// side's sum, and the merged sum z.
template <typename Acc>
__host__ __device__ __forceinline__ void merge_sums(Acc m_x, Acc z_x, Acc m_y, Acc z_y, Acc inv_t, Acc& m, Acc& z,
                                                    Acc& scale_x, Acc& scale_y) {
  m = nan_max(m_x, m_y);
  scale_x = rescale(m_x, m, inv_t);
  scale_y = rescale(m_y, m, inv_t);
  z = z_x * scale_x + z_y * scale_y;
}

// The state of the union of two disjoint sets of classes.
template <typename Policy, typename Acc = typename Policy::Acc>
__host__ __device__ __forceinline__ PairStats<Acc, typename Policy::Terms> merge(const PairStats<Acc, typename Policy::Terms>& x,
                                                                        const PairStats<Acc, typename Policy::Terms>& y,
                                                                        const Policy& policy, Acc inv_t) {
  PairStats<Acc, typename Policy::Terms> r;
  MergeStep<Acc> step;
  step.ma_x = x.ma;
  step.ma_y = y.ma;
  merge_sums(x.ma, x.za, y.ma, y.za, inv_t, r.ma, r.za, step.a_scale_x, step.a_scale_y);
  step.ma = r.ma;
  step.mb_x = x.mb;
  step.mb_y = y.mb;
  merge_sums(x.mb, x.zb, y.mb, y.zb, inv_t, r.mb, r.zb, step.b_scale_x, step.b_scale_y);
  step.mb = r.mb;
  r.terms = policy.merge(x.terms, y.terms, step, inv_t);
  return r;
}

template <typename Acc, typename Terms>
__device__ __forceinline__ PairStats<Acc, Terms> shfl_xor(const PairStats<Acc, Terms>& st, int offset) {
  PairStats<Acc, Terms> o;
  o.ma = __shfl_xor_sync(0xffffffffu, st.ma, offset);
  o.za = __shfl_xor_sync(0xffffffffu, st.za, offset);
  o.mb = __shfl_xor_sync(0xffffffffu, st.mb, offset);
  o.zb = __shfl_xor_sync(0xffffffffu, st.zb, offset);
  o.terms = st.terms.shfl_xor(offset);
  return o;
}

// Merges the states of all threads of the block (fixed tree: deterministic); every thread gets the
// same result, read back from shared memory (the butterfly's lanes may differ in the last bit once
// a·x + b·y is contracted to an FMA). Must be called by all threads; blockDim.x is a multiple of
// 32. `scratch` has 33 entries.
template <typename Policy, typename Stats>
__device__ Stats block_merge(Stats st, Stats* scratch, const Policy& policy, typename Policy::Acc inv_t) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) st = merge(st, shfl_xor(st, offset), policy, inv_t);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? scratch[lane] : empty_stats<Policy>();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) st = merge(st, shfl_xor(st, offset), policy, inv_t);
    if (lane == 0) scratch[32] = st;
  }
  __syncthreads();
  const Stats total = scratch[32];
  __syncthreads();  // scratch is reused by the next position
  return total;
}

// ------------------------------------------------------------------------------------------------
// Rows kernel: one block per position (grid-stride over positions), VEC elements per vector load
// (VEC = 1: scalar loads only), UNROLL vector loads per thread issued together (memory-level
// parallelism).
template <typename Policy, typename S, typename T, int VEC, int UNROLL>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocksPerSM)
    softmax_pair_rows_kernel(const PairArgs<S, T, typename Policy::Acc> args, const Policy policy) {
  using Acc = typename Policy::Acc;
  using Stats = PairStats<Acc, typename Policy::Terms>;
  __shared__ Stats scratch[33];

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t C = args.classes;
  const Acc inv_t = args.inv_temperature;
  const bool want_gs = args.grad_student != nullptr;
  const bool want_gt = args.grad_teacher != nullptr;
  const Acc coef = gradient_coef(args, policy);
  const int64_t step = static_cast<int64_t>(nthreads) * UNROLL;                // vectors per super-tile
  const int64_t scalar_step = static_cast<int64_t>(nthreads) * kScalarUnroll;  // scalar path: elements

  for (int64_t row = blockIdx.x; row < args.positions; row += gridDim.x) {
    const PositionPtrs<S, T> pos = position_ptrs(args, row);

    // Vector layout of this row: `head` scalar elements up to a VEC boundary, `nvec` vectors, then
    // scalar elements from `tail` to C. Needs unit class stride and the same misalignment (in
    // elements, modulo VEC) for every pointer we touch; otherwise the whole row is scalar.
    bool vec = VEC > 1 && args.s_stride[1] == 1 && args.t_stride[1] == 1 &&
               (!want_gs || args.gs_stride[1] == 1) && (!want_gt || args.gt_stride[1] == 1);
    int64_t head = 0;
    if (vec) {
      const int r = element_misalignment<VEC>(pos.s);
      vec = r >= 0 && element_misalignment<VEC>(pos.t) == r &&
            (!want_gs || element_misalignment<VEC>(pos.gs) == r) &&
            (!want_gt || element_misalignment<VEC>(pos.gt) == r);
      if (vec) {
        head = (VEC - r) % VEC;
        if (head > C) head = C;
      }
    }
    const int64_t nvec = vec ? (C - head) / VEC : 0;
    const int64_t tail = head + nvec * VEC;

    // ---- pass 1: online statistics, front to back -------------------------------------------
    Stats st = empty_stats<Policy>();
    if (pos.active) {
      if (vec) {
        for (int64_t c = tid; c < head; c += nthreads)
          add_class(st, to_acc<Acc>(pos.s[c]), to_acc<Acc>(pos.t[c]), c, policy, inv_t);
        for (int64_t base = 0; base < nvec; base += step) {
          Vec<S, VEC> sv[UNROLL];
          Vec<T, VEC> tv[UNROLL];
          load_tile(pos.s + head, pos.t + head, base, nvec, nthreads, sv, tv);
          for_each_tile_vector<UNROLL>(base, nvec, nthreads, [&](int u, int64_t v) {
#pragma unroll
            for (int k = 0; k < VEC; ++k)
              add_class(st, to_acc<Acc>(sv[u].v[k]), to_acc<Acc>(tv[u].v[k]), head + v * VEC + k, policy, inv_t);
          });
        }
        for (int64_t c = tail + tid; c < C; c += nthreads)
          add_class(st, to_acc<Acc>(pos.s[c]), to_acc<Acc>(pos.t[c]), c, policy, inv_t);
      } else {
        // kScalarUnroll elements per thread loaded before use, as the vector path's super-tiles.
        for (int64_t base = 0; base < C; base += scalar_step) {
          Acc av[kScalarUnroll];
          Acc bv[kScalarUnroll];
          for_each_tile_vector<kScalarUnroll>(base, C, nthreads, [&](int u, int64_t c) {
            av[u] = to_acc<Acc>(pos.s[c * args.s_stride[1]]);
            bv[u] = to_acc<Acc>(pos.t[c * args.t_stride[1]]);
          });
          for_each_tile_vector<kScalarUnroll>(base, C, nthreads,
                                              [&](int u, int64_t c) { add_class(st, av[u], bv[u], c, policy, inv_t); });
        }
      }
    }
    st = block_merge(st, scratch, policy, inv_t);

    // Masked out, or no teacher distribution (all b = −inf, or C = 0): loss 0, gradients 0. A NaN
    // maximum is not −inf: the position counts, and is NaN.
    const bool zero = !pos.active || st.mb == neg_inf<Acc>();
    const auto fin = policy.finish(st, coef, inv_t);  // unused when zero
    if (tid == 0) args.loss[row] = zero ? Acc(0) : policy.loss(st, fin, inv_t);

    if (!want_gs && !want_gt) continue;

    // ---- pass 2: gradients, back to front --------------------------------------------------
    // Pass 1 ended at the end of the row, so that part is the most likely to still be in L2:
    // walking the row in reverse super-tile order re-reads it from L2 rather than HBM.
    auto scalar_grad = [&](int64_t c) { store_class_grads(args, pos, policy, fin, zero, c); };

    if (vec) {
      for (int64_t c = tail + tid; c < C; c += nthreads) scalar_grad(c);
      const int64_t last = nvec > 0 ? ((nvec - 1) / step) * step : -1;
      for (int64_t base = last; base >= 0; base -= step) {
        Vec<S, VEC> sv[UNROLL];
        Vec<T, VEC> tv[UNROLL];
        if (!zero) load_tile(pos.s + head, pos.t + head, base, nvec, nthreads, sv, tv);
        for_each_tile_vector<UNROLL>(base, nvec, nthreads, [&](int u, int64_t v) {
          Vec<S, VEC> out_s;
          Vec<T, VEC> out_t;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            Acc grad_s = Acc(0);
            Acc grad_t = Acc(0);
            if (!zero)
              policy.grads(fin, to_acc<Acc>(sv[u].v[k]), to_acc<Acc>(tv[u].v[k]), head + v * VEC + k, grad_s, grad_t);
            out_s.v[k] = from_acc<S>(grad_s);
            out_t.v[k] = from_acc<T>(grad_t);
          }
          if (want_gs) *reinterpret_cast<Vec<S, VEC>*>(pos.gs + head + v * VEC) = out_s;
          if (want_gt) *reinterpret_cast<Vec<T, VEC>*>(pos.gt + head + v * VEC) = out_t;
        });
      }
      for (int64_t c = tid; c < head; c += nthreads) scalar_grad(c);
    } else {
      const int64_t last = C > 0 ? ((C - 1) / scalar_step) * scalar_step : -1;
      for (int64_t base = last; base >= 0; base -= scalar_step)
        for_each_tile_vector<kScalarUnroll>(base, C, nthreads, [&](int, int64_t c) { scalar_grad(c); });
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Channels kernel: one thread per position (grid-stride), any strides. With contiguous (N, C, HW)
// views consecutive threads read consecutive addresses at every class step (coalesced).
template <typename Policy, typename S, typename T>
__global__ void __launch_bounds__(kChannelThreads)
    softmax_pair_channels_kernel(const PairArgs<S, T, typename Policy::Acc> args, const Policy policy) {
  using Acc = typename Policy::Acc;
  const int64_t C = args.classes;
  const Acc inv_t = args.inv_temperature;
  const bool want_grad = args.grad_student != nullptr || args.grad_teacher != nullptr;
  const Acc coef = gradient_coef(args, policy);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < args.positions; p += stride) {
    const PositionPtrs<S, T> pos = position_ptrs(args, p);

    // Pass 1: online statistics over the classes.
    auto st = empty_stats<Policy>();
    if (pos.active) {
#pragma unroll 4
      for (int64_t c = 0; c < C; ++c)
        add_class(st, to_acc<Acc>(pos.s[c * args.s_stride[1]]), to_acc<Acc>(pos.t[c * args.t_stride[1]]), c, policy,
                  inv_t);
    }
    const bool zero = !pos.active || st.mb == neg_inf<Acc>();
    const auto fin = policy.finish(st, coef, inv_t);  // unused when zero
    args.loss[p] = zero ? Acc(0) : policy.loss(st, fin, inv_t);

    if (!want_grad) continue;

    // Pass 2: gradients, last class first (the classes read last are the likeliest in L2).
#pragma unroll 4
    for (int64_t c = C - 1; c >= 0; --c) store_class_grads(args, pos, policy, fin, zero, c);
  }
}

// The kernels' typed view of checked params.
template <typename S, typename T, typename Acc>
PairArgs<S, T, Acc> make_pair_args(const SoftmaxPairParams& p) {
  PairArgs<S, T, Acc> a;
  a.student = static_cast<const S*>(p.student.data);
  a.teacher = static_cast<const T*>(p.teacher.data);
  a.grad_student = static_cast<S*>(p.grad_student);
  a.grad_teacher = static_cast<T*>(p.grad_teacher);
  a.loss = static_cast<Acc*>(p.loss);
  a.mask = p.mask;
  a.grad_scale = p.grad_scale;
  a.classes = p.classes;
  a.inner = p.inner;
  a.positions = p.outer * p.inner;
  for (int d = 0; d < 3; ++d) {
    a.s_stride[d] = p.student_strides[d];
    a.t_stride[d] = p.teacher_strides[d];
    a.gs_stride[d] = p.grad_student_strides[d];
    a.gt_stride[d] = p.grad_teacher_strides[d];
  }
  a.inv_temperature = static_cast<Acc>(1.0 / p.temperature);
  return a;
}

// Enqueues the rows or the channels kernel for (S, T) = the inputs' element types. Params checked
// by check_softmax_pair_params; nothing is launched when there are no positions.
template <typename Policy, typename S, typename T>
cudaError_t launch_softmax_pair(const SoftmaxPairParams& p, const Policy& policy, cudaStream_t stream) {
  using Acc = typename Policy::Acc;
  static_assert(std::is_same<Acc, acc_t<S, T>>::value, "the policy accumulates in acc_t<S, T>");
  const int64_t positions = p.outer * p.inner;
  if (positions == 0) return cudaSuccess;
  const PairArgs<S, T, Acc> a = make_pair_args<S, T, Acc>(p);

  const bool rows_layout =
      p.inner == 1 || (a.s_stride[1] == 1 && a.t_stride[1] == 1) || positions <= Policy::kRowsKernelMaxPositions;
  if (rows_layout) {
    constexpr int VEC = Policy::kVectorLoads ? vec_width<S, T>() : 1;
    // 16 elements per thread per super-tile (8 for double): 2 x 16-byte loads per tensor for 2-byte
    // types, 4 for float. More would spill registers. Scalar loads: 4 elements per thread.
    constexpr int UNROLL = VEC >= 8 ? 2 : 4;
    // Enough threads that each does about one super-tile on short rows, capped at kMaxRowThreads
    // on long ones. Depends on C and the dtypes only (determinism).
    int threads = kMinRowThreads;
    while (threads < kMaxRowThreads && static_cast<int64_t>(threads) * VEC * UNROLL < p.classes) threads *= 2;
    const unsigned grid = static_cast<unsigned>(std::min(positions, kMaxGrid));
    softmax_pair_rows_kernel<Policy, S, T, VEC, UNROLL><<<grid, threads, 0, stream>>>(a, policy);
  } else {
    const int64_t blocks = (positions + kChannelThreads - 1) / kChannelThreads;
    const unsigned grid = static_cast<unsigned>(std::min(blocks, kMaxGrid));
    softmax_pair_channels_kernel<Policy, S, T><<<grid, kChannelThreads, 0, stream>>>(a, policy);
  }
  return cudaGetLastError();
}

// The whole launcher of a softmax pair loss: checks `params`, dispatches on the two dtypes and
// launches with Policy<Acc>::make(params). cudaErrorInvalidValue for bad arguments or dtypes.
template <template <typename> class Policy, typename Params>
cudaError_t launch_softmax_pair_loss(const Params& params, cudaStream_t stream) {
  const cudaError_t bad = check_softmax_pair_params(params);
  if (bad != cudaSuccess) return bad;
  cudaError_t status = cudaSuccess;
  const bool known = dispatch_dtype_pair(params.student.dtype, params.teacher.dtype, [&](auto s_tag, auto t_tag) {
    using S = typename decltype(s_tag)::type;
    using T = typename decltype(t_tag)::type;
    status = launch_softmax_pair<Policy<acc_t<S, T>>, S, T>(params, Policy<acc_t<S, T>>::make(params), stream);
  });
  return known ? status : cudaErrorInvalidValue;
}

}  // namespace detail
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace kdkernels
