// CPU backend of minqr::qr_pairwise_loss: the loss of every pair and, with compute_grad, its
// gradient, in one pass (the math is qr_loss.h; the reference is minqr/loss.py).
//
// Forward/backward split, decided by measurement (2-core AMD EPYC with AVX-512, float32, B=4096,
// kernel calls plus the backward's row scaling, medians): saving the gradients in the forward and
// scaling them by grad_output in the backward took 0.11 / 0.43 / 1.47 ms at N = 10 / 32 / 64;
// recomputing them in the backward (a loss-only forward, then the full pass) took
// 0.19 / 0.73 / 2.39 ms. The N×N work dominates and a loss-only pass already costs ~70% of the
// full one (0.07 / 0.29 / 0.97 ms against 0.10 / 0.41 / 1.36 ms), so on CPU recomputing cannot win.
// A forward under no_grad passes compute_grad=false and skips the gradient arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "qr_loss.h"
#include "qr_loss_op.h"

namespace minqr {
namespace {

// Pairs go kLanes at a time, one pair per SIMD lane, each block stored transposed
// (x[i * kLanes + w] = q[b0 + w, i]), so every inner loop runs over lanes with a fixed trip count
// and vectorises fully whatever N is, N = 1 included. (Vectorising over j instead would leave
// N = 10 mostly in the scalar remainder of a 16-wide loop.) 16 floats are one AVX-512 vector or
// two AVX2 vectors.
constexpr int64_t kLanes = 16;

// The default x86-64 target is SSE2 (4 floats). GCC also compiles the block kernel for AVX2+FMA
// and AVX-512 and picks the widest the CPU has when the library loads (an ifunc), so the build
// needs no -march=native and the wheel runs on any x86-64. To check that the `omp simd` loop below
// vectorised in every clone, compile this file with the build's flags plus -fopt-info-vec: GCC 12
// reports "loop vectorized using 64 / 32 / 16 byte vectors" for it (AVX-512 / AVX2 / SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MINQR_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MINQR_SIMD_CLONES
#endif

// One block of `lanes` (≤ kLanes) pairs starting at q_chosen / q_rejected (row-major [lanes, n]).
// scratch holds 4·n·kLanes values of T; lanes past `lanes` are zero padding whose results are
// never stored.
template <typename scalar_t, typename T, bool kWithGrad>
MINQR_SIMD_CLONES void loss_block(const scalar_t* q_chosen, const scalar_t* q_rejected,
                                  int64_t lanes, int64_t n, const LossConstants<T>& k,
                                  const T* tau, T* scratch, T* loss_out, scalar_t* grad_chosen,
                                  scalar_t* grad_rejected) {
  T* qc = scratch;                  // q_c[i], the chosen quantiles (predictions)
  T* target = scratch + n * kLanes;  // q_r[j] + m, the chosen side's targets
  T* gc = scratch + 2 * n * kLanes;  // Σ_j −w·clip(u_ij) per chosen quantile i
  T* gr = scratch + 3 * n * kLanes;  // Σ_i −w·clip(v_ji) per rejected quantile j

  T sum_c[kLanes] = {}, sum_r[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t w = 0; w < kLanes; ++w) {
      const bool real = w < lanes;
      const T c = real ? T(q_chosen[w * n + i]) : T(0);
      const T r = real ? T(q_rejected[w * n + i]) : T(0);
      qc[i * kLanes + w] = c;
      target[i * kLanes + w] = r + k.margin;
      sum_c[w] += c;
      sum_r[w] += r;
      gr[i * kLanes + w] = T(0);
    }
  }
  T d[kLanes];
  for (int64_t w = 0; w < kLanes; ++w) d[w] = sum_c[w] * k.inv_n - sum_r[w] * k.inv_n;

  // v_ji = (q_c[i] − m) − q_r[j] = −u_ij: one difference serves the chosen quantile i against
  // target j and the rejected quantile j against target i, and H_κ is even, so each (i, j)
  // evaluates clip and H once for both sides (the reference, written as the spec, computes u and
  // v separately; they agree up to the rounding of the margin shift).
  // A local copy: through the reference k, every store to gr_j could have changed κ, and the
  // compiler would reload it in the inner loop.
  const T kappa = k.kappa;
  T rho[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    const T tau_i = tau[i];
    const T* qc_i = qc + i * kLanes;
    T gc_i[kLanes] = {};
    for (int64_t j = 0; j < n; ++j) {
      const T tau_j = tau[j];
      const T* target_j = target + j * kLanes;
      T* gr_j = gr + j * kLanes;
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) {
        const T u = target_j[w] - qc_i[w];
        const T g = huber_clip(u, kappa);
        const T w_chosen = quantile_weight(u, tau_i);     // ρ_τi(u_ij)
        const T w_rejected = quantile_weight(-u, tau_j);  // ρ_τj(v_ji)
        rho[w] += (w_chosen + w_rejected) * huber(u, g);
        if constexpr (kWithGrad) {
          gc_i[w] -= w_chosen * g;
          gr_j[w] += w_rejected * g;  // −w·clip(v_ji) = +w·clip(u_ij): clip is odd
        }
      }
    }
    if constexpr (kWithGrad) {
      for (int64_t w = 0; w < kLanes; ++w) gc[i * kLanes + w] = gc_i[w];
    }
  }

  for (int64_t w = 0; w < lanes; ++w) {
    const T e = exp_neg_abs(d[w]);
    loss_out[w] = pair_loss(d[w], e, rho[w], k);
    if constexpr (kWithGrad) {
      const T s = sigmoid_neg(d[w], e);
      for (int64_t i = 0; i < n; ++i) {
        grad_chosen[w * n + i] = scalar_t(quantile_grad(T(-1), s, gc[i * kLanes + w], k));
        grad_rejected[w * n + i] = scalar_t(quantile_grad(T(1), s, gr[i * kLanes + w], k));
      }
    }
  }
}

template <typename scalar_t, bool kWithGrad>
void loss_cpu(const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa, double lam,
              double margin, at::Tensor& loss, at::Tensor& grad_chosen,
              at::Tensor& grad_rejected) {
  using T = at::opmath_type<scalar_t>;
  const int64_t batch = q_chosen.size(0);
  const int64_t n = q_chosen.size(1);
  const LossConstants<T> k(kappa, lam, margin, n);
  std::vector<T> tau(n);
  for (int64_t i = 0; i < n; ++i) tau[i] = quantile_level<T>(i, n);

  const scalar_t* qc = q_chosen.const_data_ptr<scalar_t>();
  const scalar_t* qr = q_rejected.const_data_ptr<scalar_t>();
  T* loss_out = loss.mutable_data_ptr<T>();
  scalar_t* gc = kWithGrad ? grad_chosen.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gr = kWithGrad ? grad_rejected.mutable_data_ptr<scalar_t>() : nullptr;

  const int64_t blocks = (batch + kLanes - 1) / kLanes;
  // A task should carry about 2^16 (i, j, pair) evaluations (~10 us): smaller ones cost more to
  // hand to a thread than they save, so small batches run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (kLanes * n * n));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(4 * n * kLanes);  // per task: blocks never share scratch
    for (int64_t block = begin; block < end; ++block) {
      const int64_t b0 = block * kLanes;  // int64: b0 * n exceeds 2^31 for large B·N
      const int64_t offset = b0 * n;
      loss_block<scalar_t, T, kWithGrad>(
          qc + offset, qr + offset, std::min(kLanes, batch - b0), n, k, tau.data(),
          scratch.data(), loss_out + b0, kWithGrad ? gc + offset : nullptr,
          kWithGrad ? gr + offset : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qr_pairwise_loss_cpu(
    const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa, double lam,
    double margin, bool compute_grad) {
  check_loss_args(q_chosen, q_rejected, kappa, lam, margin);
  // Strided inputs are copied once: the kernel's O(N²) work per pair dwarfs an O(N) copy.
  const at::Tensor qc = q_chosen.contiguous();
  const at::Tensor qr = q_rejected.contiguous();
  auto [loss, grad_chosen, grad_rejected] = empty_loss_outputs(qc, compute_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, qc.scalar_type(), "qr_pairwise_loss_cpu", [&] {
        if (compute_grad) {
          loss_cpu<scalar_t, true>(qc, qr, kappa, lam, margin, loss, grad_chosen, grad_rejected);
        } else {
          loss_cpu<scalar_t, false>(qc, qr, kappa, lam, margin, loss, grad_chosen,
                                    grad_rejected);
        }
      });
  return {loss, grad_chosen, grad_rejected};
}

}  // namespace

TORCH_LIBRARY_IMPL(minqr, CPU, m) {
  m.impl("paper_loss", &qr_pairwise_loss_cpu);
}

}  // namespace minqr
