// Host test of the softmax pair walker's arithmetic, no GPU needed: the per-class update, the merge
// and the kd_loss / weighted_soft_ce policies are __host__ __device__, so the CPU runs the same
// code the kernels inline. Checked against direct float64 formulas, with the non-finite rules of
// kdkernels/ops/reference/__init__.py. One position is walked as the channels kernel does (all
// classes in one state) or split over `parts` states merged afterwards (as the rows kernel's
// threads are). Kernel launches, memory layouts and the block merge tree are not covered here.
//
//   nvcc -std=c++17 -O2 -Icsrc csrc/cuda/tests/softmax_pair_walker_test.cu -o /tmp/walker_test && /tmp/walker_test
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "host_check.h"
#include "../kd_loss_kernel.cu"
#include "../weighted_soft_ce_kernel.cu"

namespace kdkernels {
namespace cuda {
namespace {

using host_check::failures;

template <typename Acc>
struct Result {
  Acc loss;
  std::vector<Acc> grad_s, grad_t;
};

// One position through the walker and a policy: class c goes to state c % parts.
template <typename Policy, typename Acc = typename Policy::Acc>
Result<Acc> walk(const Policy& policy, const std::vector<Acc>& s, const std::vector<Acc>& t, double temperature,
                 int parts, Acc grad_scale) {
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const int64_t C = static_cast<int64_t>(s.size());
  std::vector<PairStats<Acc, typename Policy::Terms>> states(parts, detail::empty_stats<Policy>());
  for (int64_t c = 0; c < C; ++c) detail::add_class(states[c % parts], s[c], t[c], c, policy, inv_t);
  auto st = states[0];
  for (int k = 1; k < parts; ++k) st = detail::merge(st, states[k], policy, inv_t);
  Result<Acc> r{Acc(0), std::vector<Acc>(C, Acc(0)), std::vector<Acc>(C, Acc(0))};
  if (st.mb == neg_inf<Acc>()) return r;  // no teacher distribution: not counted
  const auto fin = policy.finish(st, policy.grad_coef(grad_scale), inv_t);
  r.loss = policy.loss(st, fin, inv_t);
  for (int64_t c = 0; c < C; ++c) policy.grads(fin, s[c], t[c], c, r.grad_s[c], r.grad_t[c]);
  return r;
}

template <typename Acc>
KdLossPolicy<Acc> kd_policy(double temperature) {
  KdLossRowsParams p;
  p.temperature = temperature;
  return KdLossPolicy<Acc>::make(p);
}

template <typename Acc>
WeightedSoftCePolicy<Acc> wsce_policy(const std::vector<Acc>* weight) {
  WeightedSoftCeParams p;
  p.class_weight = weight ? weight->data() : nullptr;
  return WeightedSoftCePolicy<Acc>::make(p);
}

// log softmax(x / T) in float64.
std::vector<double> log_softmax(const std::vector<double>& x, double temperature) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v / temperature);
  double z = 0;
  for (double v : x) z += std::exp(v / temperature - m);
  std::vector<double> out;
  for (double v : x) out.push_back(v / temperature - m - std::log(z));
  return out;
}

// The direct formulas (classes with p_t = 0 left out, as the reference selects them out).
Result<double> kd_direct(const std::vector<double>& s, const std::vector<double>& t, double T, double gs) {
  const auto lp = log_softmax(s, T), lq = log_softmax(t, T);
  Result<double> r{0, {}, {}};
  for (size_t c = 0; c < s.size(); ++c)
    if (lq[c] != -INFINITY) r.loss += std::exp(lq[c]) * (lq[c] - lp[c]);
  for (size_t c = 0; c < s.size(); ++c) {
    const double q = std::exp(lq[c]);
    r.grad_s.push_back(gs * T * (std::exp(lp[c]) - q));
    r.grad_t.push_back(q == 0 ? 0.0 : gs * T * q * ((lq[c] - lp[c]) - r.loss));
  }
  r.loss *= T * T;
  return r;
}

Result<double> wsce_direct(const std::vector<double>& s, const std::vector<double>& t, const std::vector<double>& w,
                           double T, double gs) {
  const auto lp = log_softmax(s, T), lq = log_softmax(t, T);
  Result<double> r{0, {}, {}};
  double mass = 0;
  for (size_t c = 0; c < s.size(); ++c) {
    const double wq = w[c] * std::exp(lq[c]);
    mass += wq;
    if (wq > 0) r.loss -= wq * lp[c];
  }
  for (size_t c = 0; c < s.size(); ++c) {
    const double q = std::exp(lq[c]), wq = w[c] * q;
    r.grad_s.push_back(gs / T * (mass * std::exp(lp[c]) - wq));
    r.grad_t.push_back(q == 0 ? 0.0 : -gs / T * q * (r.loss + (wq > 0 ? w[c] * lp[c] : 0.0)));
  }
  return r;
}

template <typename Acc>
bool close(Acc got, double want, double tol) {
  return std::fabs(static_cast<double>(got) - want) <= tol * (1.0 + std::fabs(want));
}

template <typename Acc>
void expect_close(const Result<Acc>& got, const Result<double>& want, double tol, const char* what) {
  EXPECT(close(got.loss, want.loss, tol), "%s: loss %.9g, direct %.9g", what, (double)got.loss, want.loss);
  for (size_t c = 0; c < want.grad_s.size(); ++c) {
    EXPECT(close(got.grad_s[c], want.grad_s[c], tol), "%s: grad_s[%zu] %.9g, direct %.9g", what, c,
           (double)got.grad_s[c], want.grad_s[c]);
    EXPECT(close(got.grad_t[c], want.grad_t[c], tol), "%s: grad_t[%zu] %.9g, direct %.9g", what, c,
           (double)got.grad_t[c], want.grad_t[c]);
  }
}

template <typename Acc>
std::vector<Acc> cast(const std::vector<double>& x) {
  return std::vector<Acc>(x.begin(), x.end());
}

// Values and gradients of both policies against the direct formulas, whole and split.
template <typename Acc>
void test_against_direct(double tol) {
  std::mt19937 rng(7);
  for (int C : {1, 2, 5, 100, 3000})
    for (double T : {0.5, 1.0, 3.0})
      for (int parts : {1, 7, 64})
        for (double scale : {1.0, 8.0}) {
          std::normal_distribution<double> logit(0.0, scale);
          std::uniform_real_distribution<double> unit(0.0, 1.0);
          std::vector<double> s(C), t(C), w(C);
          for (int c = 0; c < C; ++c) {
            s[c] = static_cast<double>(static_cast<Acc>(logit(rng)));
            t[c] = static_cast<double>(static_cast<Acc>(logit(rng)));
            w[c] = unit(rng) < 0.2 ? 0.0 : static_cast<double>(static_cast<Acc>(2 * unit(rng)));
          }
          if (C > 2) t[1] = -INFINITY;  // a class the teacher excludes
          const double gs = 0.37;
          const auto sa = cast<Acc>(s), ta = cast<Acc>(t), wa = cast<Acc>(w);
          expect_close(walk(kd_policy<Acc>(T), sa, ta, T, parts, Acc(gs)), kd_direct(s, t, T, gs), tol, "kd_loss");
          expect_close(walk(wsce_policy<Acc>(&wa), sa, ta, T, parts, Acc(gs)), wsce_direct(s, t, w, T, gs), tol,
                       "weighted_soft_ce");
          const std::vector<double> ones(C, 1.0);
          expect_close(walk(wsce_policy<Acc>(nullptr), sa, ta, T, parts, Acc(gs)), wsce_direct(s, t, ones, T, gs), tol,
                       "weighted_soft_ce, no weights");
          if (C > 2) {
            EXPECT(walk(kd_policy<Acc>(T), sa, ta, T, parts, Acc(gs)).grad_t[1] == Acc(0), "kd: −inf teacher class");
            EXPECT(walk(wsce_policy<Acc>(&wa), sa, ta, T, parts, Acc(gs)).grad_t[1] == Acc(0), "wsce: −inf teacher");
          }
        }
}

template <typename Acc>
void test_non_finite_rules() {
  std::mt19937 rng(11);
  std::normal_distribution<double> logit(0.0, 3.0);
  const double T = 2.0;
  for (int C : {1, 3, 64, 1000})
    for (int parts : {1, 5, 32}) {
      std::vector<Acc> s(C), t(C), w(C, Acc(1.5));
      for (int c = 0; c < C; ++c) {
        s[c] = static_cast<Acc>(logit(rng));
        t[c] = static_cast<Acc>(logit(rng));
      }
      const auto kd = kd_policy<Acc>(T);
      const auto wsce = wsce_policy<Acc>(&w);
      // Exact zeros: identical logits (kd_loss), one class (both).
      EXPECT(walk(kd, s, s, T, parts, Acc(1)).loss == Acc(0), "kd: identical logits, C=%d parts=%d", C, parts);
      if (C == 1) {
        EXPECT(walk(kd, s, t, T, parts, Acc(1)).loss == Acc(0), "kd: one class");
        EXPECT(walk(wsce, s, t, T, parts, Acc(1)).loss == Acc(0), "wsce: one class");
      }
      // A NaN or +inf logit, student or teacher, makes the loss NaN; a NaN makes every gradient NaN
      // too (here every teacher class has mass).
      for (Acc bad : {static_cast<Acc>(NAN), static_cast<Acc>(INFINITY)})
        for (int side = 0; side < 2; ++side) {
          auto s2 = s, t2 = t;
          (side == 0 ? s2 : t2)[C / 2] = bad;
          for (int which = 0; which < 2; ++which) {
            const Result<Acc> r = which == 0 ? walk(kd, s2, t2, T, parts, Acc(1)) : walk(wsce, s2, t2, T, parts, Acc(1));
            EXPECT(std::isnan(r.loss), "%s: %g in %s, C=%d parts=%d: loss %g", which ? "wsce" : "kd", (double)bad,
                   side ? "teacher" : "student", C, parts, (double)r.loss);
            int finite = 0;
            for (int c = 0; c < C; ++c) finite += !std::isnan(r.grad_s[c]) + !std::isnan(r.grad_t[c]);
            EXPECT(!std::isnan(bad) || finite == 0, "%s: %g in %s, C=%d parts=%d: %d finite gradients", which ? "wsce" : "kd",
                   (double)bad, side ? "teacher" : "student", C, parts, finite);
          }
        }
      // Large finite logits: no overflow.
      {
        std::vector<Acc> big_s(s), big_t(t);
        for (int c = 0; c < C; ++c) {
          big_s[c] *= Acc(1e8);
          big_t[c] *= Acc(1e8);
        }
        EXPECT(std::isfinite(walk(kd, big_s, big_t, T, parts, Acc(1)).loss), "kd: large logits");
        EXPECT(std::isfinite(walk(wsce, big_s, big_t, T, parts, Acc(1)).loss), "wsce: large logits");
      }
      // All teacher logits −inf: no distribution, not counted (the walker writes 0).
      {
        std::vector<Acc> none(C, neg_inf<Acc>());
        const Acc inv_t = static_cast<Acc>(1 / T);
        auto st = detail::empty_stats<KdLossPolicy<Acc>>();
        for (int c = 0; c < C; ++c) detail::add_class(st, s[c], none[c], c, kd, inv_t);
        EXPECT(st.mb == neg_inf<Acc>() && st.zb == Acc(0), "all −inf teacher: mb %g zb %g", (double)st.mb,
               (double)st.zb);
      }
      // kd_loss: a −inf student logit where the teacher has mass gives +inf, finite student gradients
      // (with C = 1 the student has no distribution at all).
      if (C > 1) {
        auto s2 = s;
        s2[0] = neg_inf<Acc>();
        const Result<Acc> r = walk(kd, s2, t, T, parts, Acc(1));
        EXPECT(r.loss == static_cast<Acc>(INFINITY), "kd: −inf student: loss %g", (double)r.loss);
        bool finite = true;
        for (int c = 0; c < C; ++c) finite = finite && std::isfinite(r.grad_s[c]);
        EXPECT(finite, "kd: −inf student: student gradients finite");
      }
    }
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

int main() {
  using namespace kdkernels::cuda;
  test_against_direct<float>(2e-4);
  test_against_direct<double>(1e-9);
  test_non_finite_rules<float>();
  test_non_finite_rules<double>();
  if (failures == 0) std::printf("softmax pair walker: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
