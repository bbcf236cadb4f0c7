// CUDA backend of minqr::qr_pairwise_loss: the same one pass as qr_loss_cpu.cpp (loss of every
// pair and, with compute_grad, its gradient; math in qr_loss.h), laid out for a GPU.
//
// A thread block takes kPairsPerBlock = max(1, kRows / N) consecutive pairs. Their rows are one
// contiguous span of q (pairs · N values from b0·N), so staging them in shared memory and writing
// the gradients back are both fully coalesced. Thread t owns row t of the span: quantile i of
// pair p, for which it sums the chosen row over j (u_ij) and the rejected row over j (v_ij).
// Nothing is accumulated across threads except each pair's loss: one reduction per pair over its
// N row partials, read back from shared memory in a fixed order, so results do not depend on
// scheduling. (The CPU loop's trick of evaluating u_ij once for both sides would need a column
// reduction here; per-row work keeps every thread independent.) For N > kRows a block has one pair
// and each thread strides over several of its rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "qr_loss.h"
#include "qr_loss_op.h"

namespace minqr {
namespace {

constexpr int kRows = 256;  // rows (pair, quantile) per block, and threads per block

template <typename scalar_t, typename T, bool kWithGrad>
__global__ void __launch_bounds__(kRows)
    qr_pairwise_loss_kernel(const scalar_t* __restrict__ q_chosen,
                            const scalar_t* __restrict__ q_rejected, int64_t batch, int64_t n,
                            int64_t pairs_per_block, LossConstants<T> k, T* __restrict__ loss,
                            scalar_t* __restrict__ grad_chosen,
                            scalar_t* __restrict__ grad_rejected) {
  // Dynamic shared memory, sized by the launcher: [pairs·N] q_c, [pairs·N] q_r, [pairs] d,
  // [kRows] per-thread ρ partials. Declared as T-aligned bytes: `extern __shared__ T x[]` with
  // two instantiations of T would be two declarations of one symbol.
  extern __shared__ __align__(sizeof(double)) unsigned char shared_bytes[];
  T* s_qc = reinterpret_cast<T*>(shared_bytes);
  T* s_qr = s_qc + pairs_per_block * n;
  T* s_d = s_qr + pairs_per_block * n;
  T* s_rho = s_d + pairs_per_block;

  // int64 throughout: b0·N and b0·N + row pass 2^31 once B·N does (B = 2^20 pairs, N = 2^11).
  const int64_t b0 = int64_t(blockIdx.x) * pairs_per_block;
  const int64_t pairs = min(pairs_per_block, batch - b0);
  const int64_t rows = pairs * n;
  const int64_t base = b0 * n;

  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    s_qc[r] = T(q_chosen[base + r]);
    s_qr[r] = T(q_rejected[base + r]);
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    T sum_c = T(0), sum_r = T(0);
    for (int64_t i = 0; i < n; ++i) {
      sum_c += s_qc[p * n + i];
      sum_r += s_qr[p * n + i];
    }
    s_d[p] = sum_c * k.inv_n - sum_r * k.inv_n;
  }
  __syncthreads();

  // Every row a thread visits belongs to one pair (N ≤ kRows: one row per thread; N > kRows: one
  // pair per block), so a single partial per thread is enough for the loss reduction below.
  T rho = T(0);
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t p = r / n;
    const int64_t i = r - p * n;
    const T* qc = s_qc + p * n;
    const T* qr = s_qr + p * n;
    const T tau_i = quantile_level<T>(i, n);
    T grad_c = T(0), grad_r = T(0);
    for (int64_t j = 0; j < n; ++j) {
      const T u = (qr[j] + k.margin) - qc[i];
      const T w_u = quantile_weight(u, tau_i);
      const T g_u = huber_clip(u, k.kappa);
      const T v = (qc[j] - k.margin) - qr[i];
      const T w_v = quantile_weight(v, tau_i);
      const T g_v = huber_clip(v, k.kappa);
      rho += w_u * huber(u, g_u) + w_v * huber(v, g_v);
      if constexpr (kWithGrad) {
        grad_c -= w_u * g_u;
        grad_r -= w_v * g_v;
      }
    }
    if constexpr (kWithGrad) {
      const T s = sigmoid_neg(s_d[p], exp_neg_abs(s_d[p]));
      grad_chosen[base + r] = scalar_t(quantile_grad(T(-1), s, grad_c, k));
      grad_rejected[base + r] = scalar_t(quantile_grad(T(1), s, grad_r, k));
    }
  }
  s_rho[threadIdx.x] = rho;
  __syncthreads();

  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    // Pair p's partials: threads p·N … p·N+N−1, or every thread when the block holds one pair.
    const int64_t first = n <= kRows ? p * n : 0;
    const int64_t count = n <= kRows ? n : int64_t(blockDim.x);
    T rho_sum = T(0);
    for (int64_t t = 0; t < count; ++t) rho_sum += s_rho[first + t];
    loss[b0 + p] = pair_loss(s_d[p], exp_neg_abs(s_d[p]), rho_sum, k);
  }
}

template <typename scalar_t, bool kWithGrad>
void loss_cuda(const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa, double lam,
               double margin, at::Tensor& loss, at::Tensor& grad_chosen,
               at::Tensor& grad_rejected) {
  using T = at::opmath_type<scalar_t>;
  const int64_t batch = q_chosen.size(0);
  const int64_t n = q_chosen.size(1);
  const int64_t pairs_per_block = std::max<int64_t>(1, kRows / n);
  const int64_t blocks = (batch + pairs_per_block - 1) / pairs_per_block;
  const size_t shared = sizeof(T) * (2 * pairs_per_block * n + pairs_per_block + kRows);

  TORCH_CHECK_VALUE(blocks <= INT_MAX, "q_chosen has B = ", batch,
                    " pairs, more than one launch of this kernel covers");

  auto kernel = qr_pairwise_loss_kernel<scalar_t, T, kWithGrad>;
  int device = 0, shared_limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(shared <= size_t(shared_limit), "q_chosen has N = ", n,
                    " quantiles, which needs ", shared,
                    " bytes of shared memory per block; this GPU allows ", shared_limit);
  if (shared > 48 * 1024) {  // above the default 48 KiB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)));
  }
  kernel<<<static_cast<unsigned int>(blocks), kRows, shared,
           c10::cuda::getCurrentCUDAStream()>>>(
      q_chosen.const_data_ptr<scalar_t>(), q_rejected.const_data_ptr<scalar_t>(), batch, n,
      pairs_per_block, LossConstants<T>(kappa, lam, margin, n), loss.mutable_data_ptr<T>(),
      kWithGrad ? grad_chosen.mutable_data_ptr<scalar_t>() : nullptr,
      kWithGrad ? grad_rejected.mutable_data_ptr<scalar_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qr_pairwise_loss_cuda(
    const at::Tensor& q_chosen, const at::Tensor& q_rejected, double kappa, double lam,
    double margin, bool compute_grad) {
  check_loss_args(q_chosen, q_rejected, kappa, lam, margin);
  const c10::cuda::CUDAGuard guard(q_chosen.device());
  const at::Tensor qc = q_chosen.contiguous();
  const at::Tensor qr = q_rejected.contiguous();
  auto [loss, grad_chosen, grad_rejected] = empty_loss_outputs(qc, compute_grad);
  if (qc.size(0) == 0) {
    return {loss, grad_chosen, grad_rejected};  // a grid of 0 blocks is a launch error
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, qc.scalar_type(), "qr_pairwise_loss_cuda", [&] {
        if (compute_grad) {
          loss_cuda<scalar_t, true>(qc, qr, kappa, lam, margin, loss, grad_chosen, grad_rejected);
        } else {
          loss_cuda<scalar_t, false>(qc, qr, kappa, lam, margin, loss, grad_chosen,
                                     grad_rejected);
        }
      });
  return {loss, grad_chosen, grad_rejected};
}

}  // namespace

TORCH_LIBRARY_IMPL(minqr, CUDA, m) {
  m.impl("paper_loss", &qr_pairwise_loss_cuda);
}

}  // namespace minqr
