// Small at::vec helpers shared by the CPU kernels: load any floating dtype into a
// Vectorized<acc_t> (acc_t = float or double), store it back, horizontal reductions.
//
// Vectorized<acc_t>::size() elements are read or written per call; the *_n variants take a count
// (< size()) for row tails and never touch memory past it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace kdkernels {
namespace cpu {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// acc_t of a pair of input dtypes: double if either is double, else float.
template <typename A, typename B>
using acc_type_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// exp in the accumulation type: the polynomial exp_u20 (≤ 20 ulp, ~1e-6 relative: far below the
// fp32 accumulation error of a row sum) for float, where exp is most of a softmax kernel's work;
// libm-grade exp for double, which gradcheck relies on. Both give exactly 0 for −inf; exp_u20 also
// gives 0 below log(FLT_MIN) (no subnormals) and need not propagate NaN (exp_u20 clamps it; the
// AVX-512 variant below keeps it): callers that may see NaN arguments make their results NaN some
// other way.
template <typename acc_t>
inline Vec<acc_t> fast_exp(const Vec<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    // exp_u20's range reduction and polynomial (same coefficients, same accuracy), with the 2^n
    // step as one vscalefps instead of exp_u20's convert / shift / multiply sequence: about 11
    // instructions instead of 20, and the softmax sweeps evaluate two exponentials per element.
    // n = floor(x·log2(e) + ½), r = x − n·ln 2, e^x = 2^n·p(r), p(0) = 1 exactly (so e^0 = 1);
    // x < log(FLT_MIN) (−inf included) gives exactly 0, as exp_u20.
    const __m512 v = x;
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), v);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f));
    const __mmask16 normal = _mm512_cmp_ps_mask(v, _mm512_castsi512_ps(_mm512_set1_epi32(0xc2aeac50)), _CMP_NLT_UQ);  // NaN kept
    return Vec<float>(_mm512_maskz_scalef_ps(normal, p, n));
#else
    return x.exp_u20();
#endif
  } else {
    return x.exp();
  }
}

// log in the accumulation type: for float on AVX-512, Cephes' logf (its range reduction to a
// mantissa in [√½, √2) and its degree-8 polynomial; a few ulp, far below the fp32 accumulation error
// of a row sum) with the exponent and mantissa split by getexp / getmant: about 15 instructions,
// a third of Sleef's u10 log, which the divergence kernels evaluate once per class. libm-grade
// elsewhere. log(0) = −inf, log(+inf) = +inf, NaN and negative arguments give NaN.
template <typename acc_t>
inline Vec<acc_t> fast_log(const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 v = x;
    __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);  // [1, 2); NaN if v < 0
    __m512 e = _mm512_getexp_ps(v);                                         // floor(log2 v); −inf at 0
    const __mmask16 high = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, high, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, high, e, _mm512_set1_ps(1.0f));
    const __m512 z = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
    const __m512 z2 = _mm512_mul_ps(z, z);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(7.0376836292e-2f), z, _mm512_set1_ps(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, z), z2);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fmadd_ps(z2, _mm512_set1_ps(-0.5f), y);
    __m512 r = _mm512_add_ps(z, y);
    r = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), r);
    // Exact ends: log 0 = −inf and log(+inf) = +inf whatever the polynomial made of them.
    const __mmask16 zero = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __mmask16 inf = _mm512_cmp_ps_mask(v, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    r = _mm512_mask_mov_ps(r, zero, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    r = _mm512_mask_mov_ps(r, inf, v);
    return Vec<float>(r);
  } else {
    return x.log();
  }
#else
  return x.log();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// log_of_normal's table: for the 32 intervals [1 + i/32, 1 + (i+1)/32) of the mantissa, 1/c at their
// midpoints c, rounded to float, and −log of that float (so that log m = log(m/c) + log c holds for
// the rounded 1/c: the rounding costs no accuracy). Written out, not computed at load time: a
// dynamic initialiser in this AVX-512 translation unit would run on every CPU when the library
// loads (and crash one without AVX-512). Computed in Python as
//   inv_c[i] = float32(1 / (1 + (i + 0.5)/32)),  log_c[i] = float32(−log(float64(inv_c[i]))).
struct LogTable {
  alignas(64) float inv_c[32];
  alignas(64) float log_c[32];
};
inline constexpr LogTable kLogTable = {
  {
    0x1.f81f82p-1f, 0x1.e9131ap-1f, 0x1.dae608p-1f, 0x1.cd8568p-1f,
    0x1.c0e07p-1f, 0x1.b4e81cp-1f, 0x1.a98ef6p-1f, 0x1.9ec8eap-1f,
    0x1.948b1p-1f, 0x1.8acb9p-1f, 0x1.818182p-1f, 0x1.78a4c8p-1f,
    0x1.702e06p-1f, 0x1.681682p-1f, 0x1.605816p-1f, 0x1.58ed24p-1f,
    0x1.51d07ep-1f, 0x1.4afd6ap-1f, 0x1.446f86p-1f, 0x1.3e22ccp-1f,
    0x1.381382p-1f, 0x1.323e34p-1f, 0x1.2c9fb4p-1f, 0x1.27350cp-1f,
    0x1.21fb78p-1f, 0x1.1cf06ap-1f, 0x1.181182p-1f, 0x1.135c82p-1f,
    0x1.0ecf56p-1f, 0x1.0a681p-1f, 0x1.0624dep-1f, 0x1.020408p-1f,
  },
  {
    0x1.fc0a8ap-7f, 0x1.77459cp-5f, 0x1.341d74p-4f, 0x1.a926d8p-4f,
    0x1.0d77e8p-3f, 0x1.44d2b4p-3f, 0x1.7ab89p-3f, 0x1.af3c92p-3f,
    0x1.e27076p-3f, 0x1.0a325p-2f, 0x1.22941ep-2f, 0x1.3a64c6p-2f,
    0x1.51aad8p-2f, 0x1.686c8p-2f, 0x1.7eaf84p-2f, 0x1.94793ep-2f,
    0x1.a9ceccp-2f, 0x1.beb4dap-2f, 0x1.d32fe8p-2f, 0x1.e74426p-2f,
    0x1.faf586p-2f, 0x1.0723e6p-1f, 0x1.109f3cp-1f, 0x1.19ee6ap-1f,
    0x1.23130ep-1f, 0x1.2c0eap-1f, 0x1.34e288p-1f, 0x1.3d9024p-1f,
    0x1.4618bep-1f, 0x1.4e7d82p-1f, 0x1.56bf9cp-1f, 0x1.5ee02ap-1f,
  },
};
#endif

// log x for x a positive normal number or NaN — no 0, subnormal, +inf or negative argument: the
// caller rules those out (LogMixture takes its tiny lanes in log space anyway). For float on
// AVX-512, a table instead of fast_log's long polynomial: x = 2^e·m, m ∈ [1, 2); the top five bits of
// m's mantissa pick the interval of width 1/32 it lies in and that interval's midpoint c (kLogTable);
// r = m/c − 1 is within ±1/64, where log(1 + r) = r − r²/2 + r³/3 − r⁴/4 errs by less than 2e-10;
// log x = e·ln 2 + log c + log(1 + r). 12 instructions instead of fast_log's 25; its error is at
// most 1.71 ulp of the result or 2.4e-8, whichever is larger (an absolute error, as the mixtures'
// terms p·(log p − log m) need), measured against double log over every positive normal float.
// Elsewhere fast_log.
template <typename acc_t>
inline Vec<acc_t> log_of_normal(const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 v = x;
    const __m512 m = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);
    const __m512 e = _mm512_getexp_ps(v);
    // vpermt2ps reads the low five bits of each index: the top five of the 23 mantissa bits.
    const __m512i index = _mm512_srli_epi32(_mm512_castps_si512(v), 18);
    const __m512 inv_c = _mm512_permutex2var_ps(_mm512_load_ps(kLogTable.inv_c), index, _mm512_load_ps(kLogTable.inv_c + 16));
    const __m512 log_c = _mm512_permutex2var_ps(_mm512_load_ps(kLogTable.log_c), index, _mm512_load_ps(kLogTable.log_c + 16));
    const __m512 r = _mm512_fmsub_ps(m, inv_c, _mm512_set1_ps(1.0f));
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(-0.25f), r, _mm512_set1_ps(1.0f / 3.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(-0.5f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(r, r), y, r);
    return Vec<float>(_mm512_add_ps(_mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945f), log_c), y));
  } else {
    return fast_log(x);
  }
#else
  return fast_log(x);
#endif
}

// `value` where `a` ≠ 0 (NaN included), else 0: a term a·log(…) whose log is infinite where a = 0
// selected away. On AVX-512 a compare into a mask register and a zeroing move (which the compiler
// folds into the instruction that computes `value`), not at::vec's blendv through a vector mask.
template <typename acc_t>
inline Vec<acc_t> where_nonzero(const Vec<acc_t>& a, const Vec<acc_t>& value) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vec<float>(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ), value));
  }
#endif
  return Vec<acc_t>::blendv(Vec<acc_t>(0), value, a != Vec<acc_t>(0));
}

// Whether running_max below may drop a NaN (AVX-512, float): then a softmax sweep must learn of a
// NaN logit from its sums, which fast_exp keeps NaN on that path.
template <typename acc_t>
inline constexpr bool kRunningMaxDropsNan =
#if defined(CPU_CAPABILITY_AVX512)
    std::is_same_v<acc_t, float>;
#else
    false;
#endif

// The lane-wise maximum of a softmax sweep's running maximum m and a vector x. Where
// kRunningMaxDropsNan: one VMAXPS, which may return the other operand for a NaN lane, instead of
// at::vec::maximum's max, compare and blend (three extra instructions on the two loads of every
// class vector: 13 % of kd_loss's fwd+bwd on one thread). Elsewhere at::vec::maximum: NaN where
// either is NaN. ±inf are exact either way.
template <typename acc_t>
inline Vec<acc_t> running_max(const Vec<acc_t>& m, const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return Vec<float>(_mm512_max_ps(m, x));
#endif
  return at::vec::maximum(m, x);
}

// acc + a·b where `sel` ≠ 0 (NaN included), else acc: a sum of terms a·b that are 0 where sel is
// (and whose b may be infinite there). On AVX-512 one compare into a mask register and one masked
// FMA; elsewhere where_nonzero's select, a multiply and an add.
template <typename acc_t>
inline Vec<acc_t> fmadd_where_nonzero(const Vec<acc_t>& sel, const Vec<acc_t>& a, const Vec<acc_t>& b,
                                      const Vec<acc_t>& acc) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vec<float>(_mm512_mask3_fmadd_ps(a, b, acc, _mm512_cmp_ps_mask(sel, _mm512_setzero_ps(), _CMP_NEQ_UQ)));
  }
#endif
  return acc + where_nonzero(sel, a * b);
}

// Vec<acc_t>::size() elements of scalar_t at p, converted to acc_t.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return Vec<acc_t>::loadu(p);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<scalar_t>) {
    Vec<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  } else {
    __at_align__ acc_t buf[Vec<acc_t>::size()];
    for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) buf[k] = static_cast<acc_t>(p[k]);
    return Vec<acc_t>::loadu(buf);
  }
}

// count (0 <= count <= size) elements of scalar_t at p; the other lanes are `fill`.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec_n(const scalar_t* p, int64_t count, acc_t fill = acc_t(0)) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return Vec<acc_t>::set(Vec<acc_t>(fill), Vec<acc_t>::loadu(p, count), count);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<scalar_t>) {
    const Vec<float> v = at::vec::convert<float>(at::vec::Vectorized<scalar_t>::loadu(p, count));
    return Vec<float>::set(Vec<float>(fill), v, count);
  } else {
    __at_align__ acc_t buf[Vec<acc_t>::size()];
    for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) buf[k] = k < count ? static_cast<acc_t>(p[k]) : fill;
    return Vec<acc_t>::loadu(buf);
  }
}

// count (1 <= count <= size) elements at p: one full load when count == size, else load_vec_n
// (other lanes 0).
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec_upto(const scalar_t* p, int64_t count) {
  return count == Vec<acc_t>::size() ? load_vec<acc_t>(p) : load_vec_n<acc_t>(p, count);
}

// count elements at p, each `stride` apart (gather), other lanes `fill`.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec_strided(const scalar_t* p, int64_t stride, int64_t count, acc_t fill = acc_t(0)) {
  __at_align__ acc_t buf[Vec<acc_t>::size()];
  for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) buf[k] = k < count ? static_cast<acc_t>(p[k * stride]) : fill;
  return Vec<acc_t>::loadu(buf);
}

// Store all Vec<acc_t>::size() lanes of v at p as scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_vec(const Vec<acc_t>& v, scalar_t* p) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<scalar_t>) {
    // Vectorized<Half/BFloat16> holds 2 * size() lanes; the first size() are ours.
    at::vec::convert<scalar_t>(v).store(p, Vec<float>::size());
  } else {
    __at_align__ acc_t buf[Vec<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < Vec<acc_t>::size(); ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// Store the first count lanes of v at p.
template <typename scalar_t, typename acc_t>
inline void store_vec_n(const Vec<acc_t>& v, scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, count);
  } else if constexpr (std::is_same_v<acc_t, float> && is_reduced_v<scalar_t>) {
    at::vec::convert<scalar_t>(v).store(p, count);
  } else {
    __at_align__ acc_t buf[Vec<acc_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// Store the first count (1 <= count <= size) lanes of v at p: store_vec when that is all of them.
template <typename scalar_t, typename acc_t>
inline void store_vec_upto(const Vec<acc_t>& v, scalar_t* p, int64_t count) {
  if (count == Vec<acc_t>::size()) {
    store_vec(v, p);
  } else {
    store_vec_n(v, p, count);
  }
}

// Store the first count lanes of v at p, each `stride` apart (scatter).
template <typename scalar_t, typename acc_t>
inline void store_vec_strided(const Vec<acc_t>& v, scalar_t* p, int64_t stride, int64_t count) {
  __at_align__ acc_t buf[Vec<acc_t>::size()];
  v.store(buf);
  for (int64_t k = 0; k < count; ++k) p[k * stride] = static_cast<scalar_t>(buf[k]);
}

// Horizontal sum / max as a fixed tree (deterministic; shuffles for float).
template <typename acc_t, typename VecOp, typename ScalarOp>
inline acc_t reduce_tree(const Vec<acc_t>& v, const VecOp& vec_op, const ScalarOp& scalar_op) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return at::vec::vec_reduce_all<float>(vec_op, v);
  } else {
    __at_align__ acc_t buf[Vec<acc_t>::size()];
    v.store(buf);
    for (int64_t w = Vec<acc_t>::size() / 2; w >= 1; w /= 2) {
      for (int64_t k = 0; k < w; ++k) buf[k] = scalar_op(buf[k], buf[k + w]);
    }
    return buf[0];
  }
}

// max(a, b) that propagates NaN from either argument (std::max keeps a when b is NaN, which would
// hide a NaN logit behind the running maximum).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : (b != b || b > a ? b : a);
}

// Calls step(k, count, acc) over [begin, end) in vectors of Vec<acc_t>::size() elements (count is
// less only for the last one): full vectors alternate between acc0 and acc1, two independent add
// chains, and the shorter tail goes to acc1. A fixed order, so hsum(acc0 + acc1) repeats bit for bit.
template <typename acc_t, typename Step>
inline void sweep_two_accumulators(int64_t begin, int64_t end, Vec<acc_t>& acc0, Vec<acc_t>& acc1, const Step& step) {
  constexpr int64_t L = Vec<acc_t>::size();
  const int64_t full_end = begin + (end - begin) / L * L;
  int64_t k = begin;
  for (; k + 2 * L <= full_end; k += 2 * L) {
    step(k, L, acc0);
    step(k + L, L, acc1);
  }
  for (; k < full_end; k += L) step(k, L, acc0);
  if (full_end < end) step(full_end, end - full_end, acc1);
}

template <typename acc_t>
inline acc_t hsum(const Vec<acc_t>& v) {
  return reduce_tree<acc_t>(
      v, [](const Vec<acc_t>& a, const Vec<acc_t>& b) { return a + b; }, [](acc_t a, acc_t b) { return a + b; });
}

// NaN-propagating.
template <typename acc_t>
inline acc_t hmax(const Vec<acc_t>& v) {
  return reduce_tree<acc_t>(
      v, [](const Vec<acc_t>& a, const Vec<acc_t>& b) { return at::vec::maximum(a, b); },
      [](acc_t a, acc_t b) { return (a != a || a > b) ? a : b; });
}

}  // namespace cpu
}  // namespace kdkernels
