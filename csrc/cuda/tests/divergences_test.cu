// Host test of the divergence kernels' position code, no GPU needed: divergence_position
// (divergences_kernel.cu) and sparse_divergence_position (sparse_divergences_kernel.cu) are
// __host__ __device__ and written against a team (block_team.cuh); here one host thread
// (SerialTeam) runs them on host arrays, in float64 and float32, against direct float64 formulas:
// the divergences from the probabilities themselves (kdkernels/ops/reference/divergences.py's
// table, with its β endpoints), the gradients by central finite differences of that direct loss
// with respect to the raw logits / values. Then the non-finite rules of the reference: masked-out
// rows and rows without teacher mass give 0 and zero gradients, NaN / +inf logits make a row NaN,
// −inf teacher classes carry no mass (+inf where the reference side has mass there), and a top-k
// teacher with k = V equals the dense teacher. Not covered: the block reduction tree across
// threads, the shared-memory bitmap's atomics, kernel launches (a GPU: tests/llm/test_divergences_cuda.py).
//
//   nvcc -std=c++17 -O2 -Icsrc csrc/cuda/tests/divergences_test.cu -o /tmp/divergences_test && /tmp/divergences_test
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <xmmintrin.h>  // flush-to-zero, as a --use_fast_math build runs float32 on the GPU

#include "host_check.h"
#include "../divergences_kernel.cu"
#include "../sparse_divergences_kernel.cu"

namespace kdkernels {
namespace cuda {
namespace {

using namespace detail;

using host_check::checks;
using host_check::failures;

const double kInf = INFINITY;

bool close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::abs(got - want) <= tol * (1 + std::abs(want));
}

struct Case {
  const char* name;
  double beta;
};
const Case kCases[] = {{"forward_kl", 0.5},      {"reverse_kl", 0.5},      {"jsd", 0.0},
                       {"jsd", 0.1},             {"jsd", 0.5},             {"jsd", 1.0},
                       {"skew_forward_kl", 0.0}, {"skew_forward_kl", 0.1}, {"skew_forward_kl", 1.0},
                       {"skew_reverse_kl", 0.0}, {"skew_reverse_kl", 0.3}, {"skew_reverse_kl", 1.0},
                       {"tvd", 0.5}};

// ---------------------------------------------------------------------------------------------
// Direct float64 formulas.

double kl(const std::vector<double>& x, const std::vector<double>& y) {  // Σ_{x>0} x log(x/y)
  double d = 0;
  for (size_t c = 0; c < x.size(); ++c)
    if (x[c] != 0 || std::isnan(x[c])) d += x[c] * (std::log(x[c]) - std::log(y[c]));
  return d;
}

std::vector<double> mix(const std::vector<double>& x, const std::vector<double>& y, double w) {
  std::vector<double> m(x.size());
  for (size_t c = 0; c < x.size(); ++c) m[c] = w * x[c] + (1 - w) * y[c];
  return m;
}

// The divergence of the table between teacher probabilities q and student probabilities p.
double direct_divergence(const std::string& name, double beta, const std::vector<double>& q,
                         const std::vector<double>& p) {
  if (name == "forward_kl") return kl(q, p);
  if (name == "reverse_kl") return kl(p, q);
  if (name == "jsd") {
    if (beta == 0) return kl(q, p);
    if (beta == 1) return kl(p, q);
    const std::vector<double> m = mix(q, p, beta);
    return beta * kl(q, m) + (1 - beta) * kl(p, m);
  }
  if (name == "skew_forward_kl") return beta == 1 ? kl(q, q) : kl(q, mix(q, p, beta));
  if (name == "skew_reverse_kl") return beta == 1 ? kl(p, p) : kl(p, mix(p, q, beta));
  double d = 0;  // tvd
  for (size_t c = 0; c < p.size(); ++c) d += 0.5 * std::abs(q[c] - p[c]);
  return d;
}

struct Transform {
  bool has_scale = false, has_cap = false;
  double scale = 1, cap = 1;
  double apply(double x) const {
    if (has_scale) x *= scale;
    if (has_cap && x != -kInf) x = cap * std::tanh(x / cap);
    return x;
  }
  LogitTransformParams params() const { return {has_scale, has_cap, scale, cap}; }
};

std::vector<double> softmax(const std::vector<double>& z, double T) {
  double m = -kInf;
  for (double x : z) m = std::max(m, x);
  std::vector<double> p(z.size());
  double sum = 0;
  for (size_t c = 0; c < z.size(); ++c) sum += p[c] = std::exp((z[c] - m) / T);
  for (double& x : p) x /= sum;
  return p;
}

struct Setting {
  std::string name;
  double beta, T;
  bool t2;
  Transform ts, tt;
};

double direct_dense(const Setting& st, const std::vector<double>& s, const std::vector<double>& t) {
  std::vector<double> zs(s.size()), zt(t.size());
  for (size_t c = 0; c < s.size(); ++c) {
    zs[c] = st.ts.apply(s[c]);
    zt[c] = st.tt.apply(t[c]);
  }
  return (st.t2 ? st.T * st.T : 1.0) * direct_divergence(st.name, st.beta, softmax(zt, st.T), softmax(zs, st.T));
}

// d f / d x_c by central differences.
template <typename F>
std::vector<double> numeric_gradient(std::vector<double> x, F f, double h) {
  std::vector<double> g(x.size());
  for (size_t c = 0; c < x.size(); ++c) {
    const double x0 = x[c];
    x[c] = x0 + h;
    const double up = f(x);
    x[c] = x0 - h;
    const double down = f(x);
    x[c] = x0;
    g[c] = (up - down) / (2 * h);
  }
  return g;
}

// ---------------------------------------------------------------------------------------------
// The kernels' position code on one host thread.

template <typename X>
struct Result {
  double loss;
  std::vector<double> grad_a, grad_b;  // student and teacher (dense) / values (sparse)
};

template <typename X>
std::vector<X> narrow(const std::vector<double>& v) {
  std::vector<X> r(v.size());
  for (size_t c = 0; c < v.size(); ++c) r[c] = static_cast<X>(v[c]);
  return r;
}

template <typename X>
Result<X> run_dense(const Setting& st, const std::vector<double>& s, const std::vector<double>& t, bool active = true,
                    double grad_scale = 0.75) {
  using Acc = X;
  const std::vector<X> sx = narrow<X>(s), tx = narrow<X>(t);
  const int64_t C = static_cast<int64_t>(s.size());
  std::vector<X> gs(C, X(-7)), gt(C, X(-7));  // sentinels: every class must be written
  Acc loss = Acc(-7);
  const Acc gscale = static_cast<Acc>(grad_scale);
  const bool mask = active;
  DivergenceParams p;
  p.student = {sx.data(), std::is_same<X, double>::value ? DType::kDouble : DType::kFloat};
  p.teacher = {tx.data(), p.student.dtype};
  p.student_strides[1] = p.teacher_strides[1] = p.grad_student_strides[1] = p.grad_teacher_strides[1] = 1;
  p.outer = p.inner = 1;
  p.classes = C;
  p.mask = &mask;
  p.grad_scale = &gscale;
  p.temperature = st.T;
  p.loss = &loss;
  p.grad_student = gs.data();
  p.grad_teacher = gt.data();
  EXPECT(divergence_kind_of(st.name.c_str(), st.beta, p.kind), "unknown %s", st.name.c_str());
  p.beta = st.beta;
  p.scale_by_t2 = st.t2;
  p.student_transform = st.ts.params();
  p.teacher_transform = st.tt.params();
  EXPECT(check_softmax_pair_params(p) == cudaSuccess, "params");
  const auto args = make_pair_args<X, X, Acc>(p);
  const auto opt = divergence_options<Acc>(p);
  divergence_position(SerialTeam{}, args, opt, divergence_grad_coef(args, opt), 0);
  Result<X> r{static_cast<double>(loss), {}, {}};
  for (int64_t c = 0; c < C; ++c) {
    r.grad_a.push_back(static_cast<double>(gs[c]));
    r.grad_b.push_back(static_cast<double>(gt[c]));
  }
  return r;
}

std::vector<double> random_logits(std::mt19937_64& rng, int n, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

template <typename X>
void test_dense_against_direct(double tol, double fd_tol) {
  std::mt19937_64 rng(1);
  for (const Case& cs : kCases) {
    for (int variant = 0; variant < 5; ++variant) {
      // 0: T = 2; 1: T = 0.7; 2: no T²; 3: transforms; 4: large logits (probabilities near
      // float32 underflow: the mixtures' log m must not fall off to −inf).
      Setting st{cs.name, cs.beta, variant == 1 ? 0.7 : variant == 4 ? 1.0 : 2.0, variant != 2, {}, {}};
      if (variant == 3) {  // transforms on both sides
        st.ts.has_scale = st.ts.has_cap = true;
        st.ts.scale = 0.5;
        st.ts.cap = 4.0;
        st.tt.has_cap = true;
        st.tt.cap = 6.0;
      }
      const double scale = variant == 4 ? 30.0 : 2.0;
      std::vector<double> s = random_logits(rng, 23, scale), t = random_logits(rng, 23, scale);
      for (double& x : s) x = static_cast<double>(static_cast<X>(x));  // what the kernel reads
      for (double& x : t) x = static_cast<double>(static_cast<X>(x));
      const Result<X> r = run_dense<X>(st, s, t);
      const double want = direct_dense(st, s, t);
      EXPECT(close(r.loss, want, tol), "%s β=%g variant %d: loss %.12g, direct %.12g", cs.name, cs.beta, variant,
             r.loss, want);
      const auto want_s = numeric_gradient(s, [&](const std::vector<double>& x) { return direct_dense(st, x, t); }, 1e-5);
      const auto want_t = numeric_gradient(t, [&](const std::vector<double>& x) { return direct_dense(st, s, x); }, 1e-5);
      for (size_t c = 0; c < s.size(); ++c) {
        EXPECT(close(r.grad_a[c], 0.75 * want_s[c], fd_tol), "%s β=%g variant %d: grad_s[%zu] %.10g, direct %.10g",
               cs.name, cs.beta, variant, c, r.grad_a[c], 0.75 * want_s[c]);
        EXPECT(close(r.grad_b[c], 0.75 * want_t[c], fd_tol), "%s β=%g variant %d: grad_t[%zu] %.10g, direct %.10g",
               cs.name, cs.beta, variant, c, r.grad_b[c], 0.75 * want_t[c]);
      }
    }
  }
}

bool all_equal(const std::vector<double>& v, double x) {
  for (double y : v)
    if (!(y == x)) return false;
  return true;
}
bool all_nan(const std::vector<double>& v) {
  for (double y : v)
    if (!std::isnan(y)) return false;
  return true;
}

template <typename X>
void test_dense_non_finite() {
  std::mt19937_64 rng(2);
  for (const Case& cs : kCases) {
    const Setting st{cs.name, cs.beta, 1.3, true, {}, {}};
    const std::string name = cs.name;
    const bool zero_teacher = name == "skew_forward_kl" && cs.beta == 1;
    const bool zero_student = name == "skew_reverse_kl" && cs.beta == 1;
    std::vector<double> s = random_logits(rng, 17, 2.0), t = random_logits(rng, 17, 2.0);

    // Masked out, whatever the row holds: 0 and zero gradients.
    std::vector<double> nan_row(17, NAN);
    Result<X> r = run_dense<X>(st, nan_row, nan_row, /*active=*/false);
    EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "%s: masked row", cs.name);

    // No teacher mass: not counted.
    std::vector<double> no_mass(17, -kInf);
    r = run_dense<X>(st, s, no_mass);
    EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "%s: teacher all -inf", cs.name);

    // A NaN or +inf student logit: NaN row (the skews at β = 1: only their reference side).
    for (double bad : {double(NAN), kInf}) {
      std::vector<double> s_bad = s;
      s_bad[5] = bad;
      r = run_dense<X>(st, s_bad, t);
      if (zero_teacher) {
        EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "%s: bad student, loss %g", cs.name,
               r.loss);
      } else if (zero_student) {
        EXPECT(std::isnan(r.loss) && all_nan(r.grad_a) && all_equal(r.grad_b, 0), "%s: bad student", cs.name);
      } else {
        EXPECT(std::isnan(r.loss) && all_nan(r.grad_a) && all_nan(r.grad_b), "%s: bad student %g, loss %g", cs.name,
               bad, r.loss);
      }
      std::vector<double> t_bad = t;
      t_bad[3] = bad;
      r = run_dense<X>(st, s, t_bad);
      if (zero_student) {
        EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "%s: bad teacher", cs.name);
      } else {
        EXPECT(std::isnan(r.loss), "%s: bad teacher %g, loss %g", cs.name, bad, r.loss);
      }
    }

    // −inf teacher classes carry no mass: the loss is the direct formula's (finite gradients where
    // it is finite); +inf where the reference side is the student's (it has mass there).
    std::vector<double> t_holes = t;
    t_holes[0] = t_holes[9] = -kInf;
    r = run_dense<X>(st, s, t_holes);
    const double want = direct_dense(st, s, t_holes);
    EXPECT(close(r.loss, want, std::is_same<X, double>::value ? 1e-9 : 2e-4), "%s: -inf teacher classes: %.10g vs %.10g",
           cs.name, r.loss, want);
    const bool student_reference = name == "reverse_kl" || (name == "jsd" && cs.beta == 1) ||
                                   (name == "skew_reverse_kl" && cs.beta == 0);
    if (student_reference) {
      EXPECT(r.loss == kInf, "%s: student mass where the teacher has none: %g", cs.name, r.loss);
    } else {
      bool finite = true;
      for (double g : r.grad_a) finite = finite && std::isfinite(g);
      EXPECT(finite && r.grad_b[0] == 0 && r.grad_b[9] == 0, "%s: gradients with -inf teacher classes", cs.name);
    }

    // A student that is −inf everywhere: the reference's log-softmax is NaN (not for KL(q ‖ q)).
    r = run_dense<X>(st, no_mass, t);
    if (!zero_teacher) EXPECT(std::isnan(r.loss), "%s: student all -inf, loss %g", cs.name, r.loss);
  }
}

// Student probabilities at the edge of float32 (the smallest denormal, the smallest normal) where
// the teacher has none: the mixture β q + (1−β) p underflows to 0, with or without flush-to-zero,
// and log m must not become −inf (which made the JSD / skew terms +inf; the reference is finite).
void test_mixture_underflow(bool flush_to_zero) {
  const unsigned csr = _mm_getcsr();
  if (flush_to_zero) _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
  // log p = −102.9 (a denormal that (1−β)·p rounds to 0) and −87 (normal; 0.1·p is denormal).
  const double log_z = std::log(std::exp(0.0) + std::exp(1.0) + std::exp(2.0));
  const std::vector<double> s = {0.0, log_z - 102.9, log_z - 87.0, 1.0, 2.0};
  const std::vector<double> t = {1.0, -kInf, -kInf, 0.5, 0.0};
  for (const Case& cs : {Case{"jsd", 0.5}, Case{"jsd", 0.9}, Case{"skew_forward_kl", 0.9}, Case{"skew_reverse_kl", 0.9},
                         Case{"skew_reverse_kl", 0.5}}) {
    const Setting st{cs.name, cs.beta, 1.0, true, {}, {}};
    const Result<float> r = run_dense<float>(st, s, t);
    const Result<float> swapped = run_dense<float>(st, t, s);  // the teacher at the edge instead
    EXPECT(close(r.loss, direct_dense(st, s, t), 2e-5), "%s β=%g ftz %d: loss %g, direct %g", cs.name, cs.beta,
           flush_to_zero, r.loss, direct_dense(st, s, t));
    EXPECT(close(swapped.loss, direct_dense(st, t, s), 2e-5), "%s β=%g ftz %d swapped: loss %g, direct %g", cs.name,
           cs.beta, flush_to_zero, swapped.loss, direct_dense(st, t, s));
    for (double g : r.grad_a) EXPECT(std::isfinite(g), "%s β=%g ftz %d: student gradient %g", cs.name, cs.beta, flush_to_zero, g);
  }
  _mm_setcsr(csr);
}

// ---------------------------------------------------------------------------------------------
// Sparse teacher.

struct SparseSetting {
  Setting base;
  bool tail_bucket, logprobs;
  double T0;
};

// Direct float64: the bucket distributions from the probabilities themselves.
double direct_sparse(const SparseSetting& ss, const std::vector<double>& s, const std::vector<double>& values,
                     const std::vector<int64_t>& ids) {
  const Setting& st = ss.base;
  const size_t V = s.size(), K = ids.size();
  std::vector<double> z(V);
  for (size_t c = 0; c < V; ++c) z[c] = st.ts.apply(s[c]);
  const std::vector<double> P = softmax(z, st.T);
  std::vector<double> w(K);
  double stored_mass = 0;
  for (size_t b = 0; b < K; ++b) {
    const double t = ss.logprobs ? values[b] : st.tt.apply(values[b]);
    w[b] = ss.logprobs ? t * ss.T0 / st.T : t / st.T;
    stored_mass += std::exp(t);
  }
  std::vector<double> p(K);
  double in_k = 0;
  for (size_t b = 0; b < K; ++b) in_k += p[b] = P[ids[b]];
  if (ss.tail_bucket) {
    const double tail_t = K < V && stored_mass < 1 ? std::log(1 - stored_mass) * ss.T0 / st.T : -kInf;
    w.push_back(tail_t);
    double out = 0;
    std::vector<bool> chosen(V, false);
    for (int64_t id : ids) chosen[id] = true;
    for (size_t c = 0; c < V; ++c)
      if (!chosen[c]) out += P[c];
    p.push_back(out);
  } else {
    for (double& x : p) x /= in_k;
  }
  return (st.t2 ? st.T * st.T : 1.0) * direct_divergence(st.name, st.beta, softmax(w, 1.0), p);
}

template <typename X>
Result<X> run_sparse(const SparseSetting& ss, const std::vector<double>& s, const std::vector<double>& values,
                     const std::vector<int64_t>& ids, bool active = true, double grad_scale = 0.75) {
  using Acc = X;
  const Setting& st = ss.base;
  const std::vector<X> sx = narrow<X>(s), vx = narrow<X>(values);
  const int64_t C = static_cast<int64_t>(s.size()), K = static_cast<int64_t>(ids.size());
  std::vector<X> gs(C, X(-7)), gv(K, X(-7));
  Acc loss = Acc(-7);
  const Acc gscale = static_cast<Acc>(grad_scale);
  const bool mask = active;
  SparseDivergenceParams p;
  p.student = {sx.data(), std::is_same<X, double>::value ? DType::kDouble : DType::kFloat};
  p.values = {vx.data(), p.student.dtype};
  p.indices = ids.data();
  p.student_strides[1] = p.values_strides[1] = p.indices_strides[1] = 1;
  p.grad_student_strides[1] = p.grad_values_strides[1] = 1;
  p.outer = p.inner = 1;
  p.classes = C;
  p.k = K;
  p.mask = &mask;
  p.grad_scale = &gscale;
  EXPECT(divergence_kind_of(st.name.c_str(), st.beta, p.kind), "unknown %s", st.name.c_str());
  p.beta = st.beta;
  p.temperature = st.T;
  p.stored_temperature = ss.T0;
  p.scale_by_t2 = st.t2;
  p.tail_bucket = ss.tail_bucket;
  p.logprob_values = ss.logprobs;
  p.student_transform = st.ts.params();
  p.teacher_transform = st.tt.params();
  p.loss = &loss;
  p.grad_student = gs.data();
  p.grad_values = gv.data();
  EXPECT(check_sparse_divergence_params(p) == cudaSuccess, "params");
  const auto args = make_sparse_args<X, X, Acc>(p);
  std::vector<uint32_t> bits(kSparseBitmapWords);
  sparse_divergence_position(SerialTeam{}, args, gscale * args.factor, bits.data(), 0);
  Result<X> r{static_cast<double>(loss), {}, {}};
  for (int64_t c = 0; c < C; ++c) r.grad_a.push_back(static_cast<double>(gs[c]));
  for (int64_t b = 0; b < K; ++b) r.grad_b.push_back(static_cast<double>(gv[b]));
  return r;
}

// k distinct ids of [0, V) in a random order, and the teacher's full-vocabulary log-probs there.
void sparse_teacher(std::mt19937_64& rng, int V, int K, double T0, std::vector<int64_t>& ids,
                    std::vector<double>& logprobs, std::vector<double>& logits) {
  std::vector<int64_t> all(V);
  for (int c = 0; c < V; ++c) all[c] = c;
  std::shuffle(all.begin(), all.end(), rng);
  ids.assign(all.begin(), all.begin() + K);
  const std::vector<double> t = random_logits(rng, V, 2.0);
  const std::vector<double> q = softmax(t, T0);
  logprobs.clear();
  logits.clear();
  for (int64_t id : ids) {
    logprobs.push_back(std::log(q[id]));
    logits.push_back(t[id]);
  }
}

template <typename X>
void test_sparse_against_direct(double tol, double fd_tol) {
  std::mt19937_64 rng(3);
  const int V = 29, K = 6;
  for (const Case& cs : kCases) {
    for (int variant = 0; variant < 6; ++variant) {
      // 0: renormalize, logits; 1: renormalize, log-probs re-tempered; 2: tail, log-probs;
      // 3: tail, re-tempered, student transform; 4: renormalize, logits with transforms, no T²;
      // 5: tail, log-probs, large student logits (bucket probabilities near float32 underflow).
      SparseSetting ss{{cs.name, cs.beta, variant == 1 || variant == 3 ? 1.7 : 1.0, variant != 4, {}, {}},
                       variant == 2 || variant == 3 || variant == 5, (variant >= 1 && variant <= 3) || variant == 5,
                       variant == 1 || variant == 3 ? 1.2 : 1.0};
      if (variant == 3 || variant == 4) {
        ss.base.ts.has_cap = true;
        ss.base.ts.cap = 5.0;
      }
      if (variant == 4) {
        ss.base.tt.has_scale = ss.base.tt.has_cap = true;
        ss.base.tt.scale = 1.5;
        ss.base.tt.cap = 4.0;
      }
      std::vector<int64_t> ids;
      std::vector<double> logprobs, logits;
      sparse_teacher(rng, V, K, ss.T0, ids, logprobs, logits);
      std::vector<double> values = ss.logprobs ? logprobs : logits;
      std::vector<double> s = random_logits(rng, V, variant == 5 ? 30.0 : 2.0);
      for (double& x : s) x = static_cast<double>(static_cast<X>(x));  // what the kernel reads
      for (double& x : values) x = static_cast<double>(static_cast<X>(x));
      const Result<X> r = run_sparse<X>(ss, s, values, ids);
      const double want = direct_sparse(ss, s, values, ids);
      EXPECT(close(r.loss, want, tol), "sparse %s β=%g variant %d: loss %.12g, direct %.12g", cs.name, cs.beta, variant,
             r.loss, want);
      const auto want_s =
          numeric_gradient(s, [&](const std::vector<double>& x) { return direct_sparse(ss, x, values, ids); }, 1e-5);
      const auto want_v =
          numeric_gradient(values, [&](const std::vector<double>& x) { return direct_sparse(ss, s, x, ids); }, 1e-6);
      for (int c = 0; c < V; ++c)
        EXPECT(close(r.grad_a[c], 0.75 * want_s[c], fd_tol), "sparse %s β=%g variant %d: grad_s[%d] %.10g, direct %.10g",
               cs.name, cs.beta, variant, c, r.grad_a[c], 0.75 * want_s[c]);
      for (int b = 0; b < K; ++b)
        EXPECT(close(r.grad_b[b], 0.75 * want_v[b], fd_tol), "sparse %s β=%g variant %d: grad_v[%d] %.10g, direct %.10g",
               cs.name, cs.beta, variant, b, r.grad_b[b], 0.75 * want_v[b]);
    }
  }
}

template <typename X>
void test_sparse_rules(double tol) {
  std::mt19937_64 rng(4);
  const int V = 19, K = 5;
  for (const Case& cs : kCases) {
    const std::string name = cs.name;
    for (bool tail : {false, true}) {
      const SparseSetting ss{{cs.name, cs.beta, 1.3, true, {}, {}}, tail, true, 1.0};
      std::vector<int64_t> ids;
      std::vector<double> logprobs, logits;
      sparse_teacher(rng, V, K, 1.0, ids, logprobs, logits);
      std::vector<double> s = random_logits(rng, V, 2.0);

      // Masked out, and no teacher mass (all k values −inf): 0 and zero gradients.
      std::vector<double> nan_s(V, NAN), nan_v(K, NAN), no_mass(K, -kInf);
      Result<X> r = run_sparse<X>(ss, nan_s, nan_v, ids, /*active=*/false);
      EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "sparse %s: masked", cs.name);
      r = run_sparse<X>(ss, s, no_mass, ids);
      EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "sparse %s: no teacher mass", cs.name);

      // A NaN student logit outside the ids: the tail reads it (NaN row), renormalize does not.
      std::vector<bool> chosen(V, false);
      for (int64_t id : ids) chosen[id] = true;
      int outside = 0;
      while (chosen[outside]) ++outside;
      std::vector<double> s_nan = s;
      s_nan[outside] = NAN;
      r = run_sparse<X>(ss, s_nan, logprobs, ids);
      const bool zero_teacher = name == "skew_forward_kl" && cs.beta == 1;
      if (tail && !zero_teacher) {
        EXPECT(std::isnan(r.loss), "sparse %s tail: NaN outside the ids, loss %g", cs.name, r.loss);
      } else if (tail) {  // KL(q ‖ q) does not use the student: 0, zero gradients
        EXPECT(r.loss == 0 && all_equal(r.grad_a, 0) && all_equal(r.grad_b, 0), "sparse %s tail: unused NaN student",
               cs.name);
      } else {
        const double want = direct_sparse(ss, s, logprobs, ids);
        EXPECT(close(r.loss, want, tol) && r.grad_a[outside] == 0, "sparse %s renormalize: NaN outside the ids", cs.name);
      }

      // A −inf entry (the store's padding): no teacher mass there.
      std::vector<double> padded = logprobs;
      padded[K - 1] = -kInf;
      r = run_sparse<X>(ss, s, padded, ids);
      const double want = direct_sparse(ss, s, padded, ids);
      EXPECT(close(r.loss, want, tol), "sparse %s tail %d: -inf value: %.10g vs %.10g", cs.name, tail, r.loss, want);
    }

    // k = V: the top-k teacher is the dense one (both tails), whatever the order of the ids.
    std::vector<int64_t> ids;
    std::vector<double> logprobs, logits;
    sparse_teacher(rng, V, V, 1.0, ids, logprobs, logits);
    const std::vector<double> s = random_logits(rng, V, 2.0);
    std::vector<double> t_dense(V);
    for (int b = 0; b < V; ++b) t_dense[ids[b]] = logprobs[b];
    const Setting dense{cs.name, cs.beta, 1.3, true, {}, {}};
    const Result<X> d = run_dense<X>(dense, s, t_dense);
    for (bool tail : {false, true}) {
      const Result<X> r = run_sparse<X>({dense, tail, true, 1.0}, s, logprobs, ids);
      EXPECT(close(r.loss, d.loss, tol), "sparse %s k = V tail %d: %.12g vs dense %.12g", cs.name, tail, r.loss, d.loss);
      for (int c = 0; c < V; ++c) EXPECT(close(r.grad_a[c], d.grad_a[c], tol), "sparse %s k = V: grad_s[%d]", cs.name, c);
      for (int b = 0; b < V; ++b)
        EXPECT(close(r.grad_b[b], d.grad_b[ids[b]], tol), "sparse %s k = V: grad_v[%d]", cs.name, b);
    }
  }
}

// The complement's bitmap works chunk by chunk: a row longer than one chunk, ids in both.
void test_sparse_bitmap_chunks() {
  std::mt19937_64 rng(5);
  const int V = static_cast<int>(kSparseBitmapClasses) + 1000;
  const SparseSetting ss{{"forward_kl", 0.5, 1.0, true, {}, {}}, true, true, 1.0};
  const std::vector<int64_t> ids = {3, 70000, kSparseBitmapClasses + 5, kSparseBitmapClasses - 1};
  const std::vector<double> s = random_logits(rng, V, 1.0);
  const std::vector<double> values = {std::log(0.3), std::log(0.2), std::log(0.1), std::log(0.05)};
  const Result<double> r = run_sparse<double>(ss, s, values, ids);
  const double want = direct_sparse(ss, s, values, ids);
  EXPECT(close(r.loss, want, 1e-10), "bitmap chunks: %.12g vs %.12g", r.loss, want);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

int main() {
  using namespace kdkernels::cuda;
  test_dense_against_direct<double>(1e-10, 1e-6);
  test_dense_against_direct<float>(2e-4, 2e-3);
  test_dense_non_finite<double>();
  test_dense_non_finite<float>();
  test_mixture_underflow(false);
  test_mixture_underflow(true);
  test_sparse_against_direct<double>(1e-10, 1e-6);
  test_sparse_against_direct<float>(2e-4, 2e-3);
  test_sparse_rules<double>(1e-9);
  test_sparse_rules<float>(2e-4);
  test_sparse_bitmap_chunks();
  if (failures == 0) {
    std::printf("divergences: all %d checks passed\n", checks);
  } else {
    std::printf("divergences: %d of %d checks failed\n", failures, checks);
  }
  return failures == 0 ? 0 : 1;
}
