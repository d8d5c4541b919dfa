// CPU kernel of kdkernels::rkd_angle_anchors: the angle loss of Park et al., "Relational Knowledge
// Distillation" (CVPR 2019), and its gradients, without the B x B x B tensor of angles.
//
// For an anchor j the unit difference vectors e_ij = (t_i - t_j) / max(|t_i - t_j|, 1e-12) (what
// F.normalize gives: 0 for i = j and for duplicates) are the rows of E_j (B x D), and the angles
// with vertex j are its Gram matrix G^j = E_j E_j^T. The Huber loss of the B^3 triples is a sum of
// independent per-anchor sums, and each of those a sum over tiles of G^j_s - G^j_t, so
//
//   loss_j = sum_ik huber(G^j_s,ik - G^j_t,ik)                (the caller divides by B^3)
//
// is exact tile by tile. The gradient with respect to the unit vectors is
// dL/de^s_ij = 2 sum_k h'(D_ik) e^s_kj (G is symmetric), h' = clamp(., -1, 1); then through the
// normalisation, d x = (g - e (e . g)) / |x| where |x| > 1e-12, g / 1e-12 where F.normalize
// clamps (duplicates; the exact derivative of the official formula), and x_ij = t_i - t_j sends
// +dx to t_i and -dx to the anchor t_j.
//
// Work unit = one anchor. Its own rows go to a per-thread gradient buffer (rows i of other anchors
// collide), summed afterwards. Memory: E_j and its gradient (B x D) plus one kTile x kTile tile of
// G per thread, and one (B, D) buffer per thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

constexpr int64_t kTile = 256;
constexpr double kNormalizeEps = 1e-12;  // F.normalize's default eps

// Huber (delta 1) of every entry of the tile, summed; the tile is overwritten with h'(d).
template <typename acc_t>
acc_t huber_and_slope(at::Tensor& tile) {
  acc_t* p = tile.mutable_data_ptr<acc_t>();
  const int64_t n = tile.numel();
  acc_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    const acc_t d = p[k], a = std::abs(d);
    total += a < acc_t(1) ? acc_t(0.5) * d * d : a - acc_t(0.5);
    p[k] = std::min(std::max(d, acc_t(-1)), acc_t(1));
  }
  return total;
}

struct AnchorRows {
  at::Tensor unit;  // e_ij, (B, D)
  at::Tensor norm;  // |t_i - t_j|, (B, 1)
};

AnchorRows anchor_rows(const at::Tensor& emb, int64_t j) {
  at::Tensor x = emb.sub(emb.select(0, j));
  at::Tensor norm = at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true);
  return {x.div_(norm.clamp_min(kNormalizeEps)), norm};
}

// dL/dx_ij from dL/de_ij (g, overwritten) through e = x / max(|x|, eps).
void normalize_backward_(at::Tensor& g, const AnchorRows& rows) {
  const at::Tensor clamped = rows.norm.clamp_min(kNormalizeEps);
  const at::Tensor projection = rows.unit.mul(g).sum(-1, /*keepdim=*/true);
  const at::Tensor radial = at::where(rows.norm.gt(kNormalizeEps), projection, at::zeros_like(projection));
  g.sub_(rows.unit.mul(radial)).div_(clamped);
}

template <typename acc_t>
void rkd_angle_impl(const at::Tensor& s, const at::Tensor& t, double grad_scale, bool student_grad, bool teacher_grad,
                    at::Tensor& loss, at::Tensor& grad_s_acc, at::Tensor& grad_t_acc) {
  const int64_t batch = s.size(0);
  const int threads = at::get_num_threads();
  at::Tensor buf_s = student_grad ? at::zeros({threads, batch, s.size(1)}, s.options()) : at::Tensor();
  at::Tensor buf_t = teacher_grad ? at::zeros({threads, batch, t.size(1)}, t.options()) : at::Tensor();
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  const double coef = 2.0 * grad_scale;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const int thread = at::get_thread_num();
    for (int64_t j = begin; j < end; ++j) {
      const AnchorRows rs = anchor_rows(s, j), rt = anchor_rows(t, j);
      at::Tensor gs = student_grad ? at::zeros_like(rs.unit) : at::Tensor();
      at::Tensor gt = teacher_grad ? at::zeros_like(rt.unit) : at::Tensor();
      acc_t total = 0;
      for (int64_t i0 = 0; i0 < batch; i0 += kTile) {
        const int64_t ti = std::min(kTile, batch - i0);
        const at::Tensor es_i = rs.unit.narrow(0, i0, ti), et_i = rt.unit.narrow(0, i0, ti);
        for (int64_t k0 = 0; k0 < batch; k0 += kTile) {
          const int64_t tk = std::min(kTile, batch - k0);
          const at::Tensor es_k = rs.unit.narrow(0, k0, tk), et_k = rt.unit.narrow(0, k0, tk);
          at::Tensor d = at::addmm(at::mm(es_i, es_k.t()), et_i, et_k.t(), /*beta=*/1, /*alpha=*/-1);
          total += huber_and_slope<acc_t>(d);
          if (student_grad) gs.narrow(0, i0, ti).addmm_(d, es_k);
          if (teacher_grad) gt.narrow(0, i0, ti).addmm_(d, et_k);
        }
      }
      out[j] = total;
      if (student_grad) {
        gs.mul_(coef);
        normalize_backward_(gs, rs);
        buf_s[thread].add_(gs);
        buf_s[thread][j].sub_(gs.sum(0));
      }
      if (teacher_grad) {
        gt.mul_(-coef);
        normalize_backward_(gt, rt);
        buf_t[thread].add_(gt);
        buf_t[thread][j].sub_(gt.sum(0));
      }
    }
  });
  if (student_grad) grad_s_acc = buf_s.sum(0);
  if (teacher_grad) grad_t_acc = buf_t.sum(0);
}

}  // namespace

TensorTriple rkd_angle_anchors_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& grad_scale,
                                   bool student_grad, bool teacher_grad) {
  // The tiles go through at::mm: under autocast they would be cast to bf16/fp16 (losing the
  // fp32/fp64 accumulation this kernel promises), so autocast is off inside the kernel.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "rkd_angle_anchors: expected (B, D) embeddings");
  TORCH_CHECK(student.size(0) == teacher.size(0), "rkd_angle_anchors: student and teacher must share B");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "rkd_angle_anchors: CPU tensors");
  const bool fp64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor s = student.to(acc).contiguous(), t = teacher.to(acc).contiguous();
  at::Tensor loss = at::zeros({student.size(0)}, s.options());
  at::Tensor gs, gt;
  const double scale = grad_scale.item<double>();
  if (student.size(0) > 0) {
    if (fp64) {
      rkd_angle_impl<double>(s, t, scale, student_grad, teacher_grad, loss, gs, gt);
    } else {
      rkd_angle_impl<float>(s, t, scale, student_grad, teacher_grad, loss, gs, gt);
    }
  }
  at::Tensor grad_s = student.new_empty({0}), grad_t = teacher.new_empty({0});
  if (student_grad) grad_s = gs.defined() ? gs.to(student.scalar_type()) : at::zeros_like(student);
  if (teacher_grad) grad_t = gt.defined() ? gt.to(teacher.scalar_type()) : at::zeros_like(teacher);
  return {loss, grad_s, grad_t};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(rkd_angle_anchors_cpu);
