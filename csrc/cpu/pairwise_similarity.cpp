// CPU kernel of kdkernels::pairwise_similarity_batches: the pair-wise similarity distillation loss
// of Liu et al., "Structured Knowledge Distillation for Semantic Segmentation" (CVPR 2019), and its
// gradients, tile by tile, without an N x N matrix.
//
// Per batch element b, with u_i = f_i / (|f_i| + 1e-8) (the norm a constant: detached, as in the
// official sim_dis_compute) and D = U_s U_s^T - U_t U_t^T,
//
//   loss_b = (1/N^2) sum_ij D_ij^2,
//   dloss_b/df^s_i =  (4/N^2) sum_j D_ij u^s_j / (|f^s_i| + 1e-8)   (D is symmetric: the 2 doubles),
//   dloss_b/df^t_i = -(4/N^2) sum_j D_ij u^t_j / (|f^t_i| + 1e-8),
//
// times grad_scale. Work unit = (b, a tile of kTile rows i): it walks the column tiles j, forms the
// kTile x kTile tile of D with two GEMMs (student channels and teacher channels may differ), adds
// its squares to a partial sum and D u_j to its own rows of the gradient. Memory: the unit vectors
// (B, N, C) in the accumulation dtype plus one tile of D and of the gradient per thread. The
// per-unit partial sums are fixed by the tiling, not by the thread count, and are summed in order:
// repeatable bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <vector>

#include "../kdkernels.h"
#include "dispatch.h"

namespace kdkernels {
namespace CPU_CAPABILITY {  // one copy per capability: see dispatch.h
namespace {

// Rows (and columns) of a tile of D: 256 x 256 fp32 = 256 KiB, a GEMM big enough for BLAS speed.
constexpr int64_t kTile = 256;

template <typename acc_t>
acc_t sum_of_squares(const at::Tensor& tile) {  // tile: contiguous, fresh from a GEMM
  const acc_t* p = tile.const_data_ptr<acc_t>();
  const int64_t n = tile.numel();
  acc_t total = 0;
  for (int64_t k = 0; k < n; ++k) total += p[k] * p[k];
  return total;
}

// Unit rows u_i = f_i / (|f_i| + 1e-8) in the accumulation dtype, and 1 / (|f_i| + 1e-8).
std::pair<at::Tensor, at::Tensor> unit_rows(const at::Tensor& feat, at::ScalarType acc) {
  at::Tensor f = feat.to(acc);
  at::Tensor inv_norm = at::linalg_vector_norm(f, 2, {-1}, /*keepdim=*/true).add_(1e-8).reciprocal_();
  return {f.mul(inv_norm).contiguous(), inv_norm};
}

template <typename acc_t>
void pairwise_impl(const at::Tensor& student, const at::Tensor& teacher, double grad_scale, bool student_grad,
                   bool teacher_grad, at::Tensor& loss, at::Tensor& grad_s, at::Tensor& grad_t) {
  const auto acc = loss.scalar_type();
  const int64_t batch = student.size(0), n = student.size(1);
  auto [us, inv_s] = unit_rows(student, acc);
  auto [ut, inv_t] = unit_rows(teacher, acc);
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<acc_t> partial(batch * tiles, acc_t(0));
  const double coef = 4.0 * grad_scale / (double(n) * double(n));
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / tiles, i0 = (unit % tiles) * kTile, ti = std::min(kTile, n - i0);
      const at::Tensor us_i = us[b].narrow(0, i0, ti), ut_i = ut[b].narrow(0, i0, ti);
      at::Tensor gs_i = student_grad ? at::zeros_like(us_i) : at::Tensor();
      at::Tensor gt_i = teacher_grad ? at::zeros_like(ut_i) : at::Tensor();
      acc_t squares = 0;
      for (int64_t j0 = 0; j0 < n; j0 += kTile) {
        const int64_t tj = std::min(kTile, n - j0);
        const at::Tensor us_j = us[b].narrow(0, j0, tj), ut_j = ut[b].narrow(0, j0, tj);
        // D_ij = u^s_i . u^s_j - u^t_i . u^t_j
        at::Tensor d = at::addmm(at::mm(us_i, us_j.t()), ut_i, ut_j.t(), /*beta=*/1, /*alpha=*/-1);
        squares += sum_of_squares<acc_t>(d);
        if (student_grad) gs_i.addmm_(d, us_j);
        if (teacher_grad) gt_i.addmm_(d, ut_j);
      }
      partial[unit] = squares;
      if (student_grad) {
        grad_s[b].narrow(0, i0, ti).copy_(gs_i.mul_(inv_s[b].narrow(0, i0, ti)).mul_(coef));
      }
      if (teacher_grad) {
        grad_t[b].narrow(0, i0, ti).copy_(gt_i.mul_(inv_t[b].narrow(0, i0, ti)).mul_(-coef));
      }
    }
  });
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    acc_t total = 0;
    for (int64_t t = 0; t < tiles; ++t) total += partial[b * tiles + t];
    out[b] = total / (acc_t(n) * acc_t(n));
  }
}

}  // namespace

TensorTriple pairwise_similarity_batches_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                             const at::Tensor& grad_scale, bool student_grad, bool teacher_grad) {
  // The tiles go through at::mm: under autocast they would be cast to bf16/fp16 (losing the
  // fp32/fp64 accumulation this kernel promises), so autocast is off inside the kernel.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "pairwise_similarity_batches: expected (B, N, C) features");
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
              "pairwise_similarity_batches: student and teacher must share B and N");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "pairwise_similarity_batches: CPU tensors");
  const bool fp64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  at::Tensor loss = at::zeros({student.size(0)}, student.options().dtype(acc));
  at::Tensor grad_s = student_grad ? at::empty(student.sizes(), student.options()) : student.new_empty({0});
  at::Tensor grad_t = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : teacher.new_empty({0});
  if (student.numel() == 0 || teacher.numel() == 0) {
    if (student_grad) grad_s.zero_();
    if (teacher_grad) grad_t.zero_();
    return {loss, grad_s, grad_t};
  }
  const double scale = grad_scale.item<double>();
  if (fp64) {
    pairwise_impl<double>(student, teacher, scale, student_grad, teacher_grad, loss, grad_s, grad_t);
  } else {
    pairwise_impl<float>(student, teacher, scale, student_grad, teacher_grad, loss, grad_s, grad_t);
  }
  return {loss, grad_s, grad_t};
}

}  // namespace CPU_CAPABILITY
}  // namespace kdkernels

KDKERNELS_REGISTER_CPU_KERNEL(pairwise_similarity_batches_cpu);
