// CUDA kernels of the loss ops: the same one pass as cpu/objectives_cpu.cpp (each pair's loss and,
// with compute_grad, its gradient; the math is objectives.h), laid out for a GPU, and
// loss_backward.
//
// A thread block takes pairs_per_block = max(1, kRows / N) consecutive pairs. Their rows are one
// contiguous span of the inputs (pairs · N values from b0·N), so staging them in shared memory and
// writing the gradients back are both fully coalesced. Thread t owns row t of the span: output i
// of pair p. Nothing is accumulated across threads except each pair's sums: one reduction per pair
// over its N row partials, read back from shared memory in a fixed order, so results do not depend
// on scheduling. For N > kRows a block has one pair and each thread strides over several of its
// rows. mixture and independent always take the shifted way of objectives.h here: the GPU's exp
// is cheap, and one way keeps every warp on the same path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "../objectives.h"
#include "../ops.h"

namespace minqr {
namespace {

constexpr int kRows = 256;  // rows (pair, output) per block, and threads per block

// Shared memory, sized by the launcher and carved by the kernels in the order they list it.
// Declared as T-aligned bytes: `extern __shared__ T x[]` with two instantiations of T would be
// two declarations of one symbol.
template <typename T>
__device__ T* shared_array() {
  extern __shared__ __align__(sizeof(double)) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}

// The rows (p, i) of this block that thread t owns, and the pair whose sums collect its partials:
// every row a thread visits belongs to one pair (N ≤ kRows: one row per thread; N > kRows: one
// pair per block).
struct Span {
  int64_t b0, pairs, rows, base;  // first pair, pairs in this block, their rows, b0·N
  __device__ Span(int64_t batch, int64_t n, int64_t pairs_per_block) {
    // int64 throughout: b0·N and b0·N + row pass 2^31 once B·N does (B = 2^20 pairs, N = 2^11).
    b0 = int64_t(blockIdx.x) * pairs_per_block;
    pairs = min(pairs_per_block, batch - b0);
    rows = pairs * n;
    base = b0 * n;
  }
};

// The block's rows of both inputs into shared memory, in T (coalesced), for every thread to read;
// the barrier makes every row visible before any thread reads another's.
template <typename scalar_t, typename T>
__device__ void stage_rows(const Span& span, const scalar_t* h_chosen, const scalar_t* h_rejected,
                           T* s_c, T* s_r) {
  for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
    s_c[r] = T(h_chosen[span.base + r]);
    s_r[r] = T(h_rejected[span.base + r]);
  }
  __syncthreads();
}

// Σ of pair p's row partials (threads p·N … p·N+N−1, or every thread when the block holds one
// pair), in a fixed order.
template <typename T>
__device__ T pair_sum(const T* partial, int64_t p, int64_t n) {
  const int64_t first = n <= kRows ? p * n : 0;
  const int64_t count = n <= kRows ? n : int64_t(blockDim.x);
  T sum = T(0);
  for (int64_t t = 0; t < count; ++t) sum += partial[first + t];
  return sum;
}

// paper. Shared: [pairs·N] q_c, [pairs·N] q_r, [pairs] d, [kRows] ρ partials. (The CPU loop's
// trick of evaluating u_ij once for both sides would need a column reduction here; per-row work
// keeps every thread independent.)
template <typename scalar_t, typename T, bool kWithGrad>
__global__ void __launch_bounds__(kRows)
    paper_kernel(const scalar_t* __restrict__ h_chosen, const scalar_t* __restrict__ h_rejected,
                 int64_t batch, int64_t n, int64_t pairs_per_block, PaperConstants<T> k,
                 T* __restrict__ loss, scalar_t* __restrict__ grad_chosen,
                 scalar_t* __restrict__ grad_rejected) {
  const Span span(batch, n, pairs_per_block);
  T* s_qc = shared_array<T>();
  T* s_qr = s_qc + pairs_per_block * n;
  T* s_d = s_qr + pairs_per_block * n;
  T* s_rho = s_d + pairs_per_block;

  stage_rows(span, h_chosen, h_rejected, s_qc, s_qr);
  for (int64_t p = threadIdx.x; p < span.pairs; p += blockDim.x) {
    T sum_c = T(0), sum_r = T(0);
    for (int64_t i = 0; i < n; ++i) {
      sum_c += s_qc[p * n + i];
      sum_r += s_qr[p * n + i];
    }
    s_d[p] = sum_c * k.inv_n - sum_r * k.inv_n;
  }
  __syncthreads();

  T rho = T(0);
  for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
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
      grad_chosen[span.base + r] = scalar_t(paper_backward(T(-1), s, grad_c, k));
      grad_rejected[span.base + r] = scalar_t(paper_backward(T(1), s, grad_r, k));
    }
  }
  s_rho[threadIdx.x] = rho;
  __syncthreads();

  for (int64_t p = threadIdx.x; p < span.pairs; p += blockDim.x) {
    loss[span.b0 + p] = paper_forward(s_d[p], exp_neg_abs(s_d[p]), pair_sum(s_rho, p, n), k);
  }
}

// mixture and independent, after their terms: each thread's partial Σ ratio into s_partial, each
// pair's sum into s_sum (for the gradients, readable by every thread on return) and its loss.
template <typename T>
__device__ void sigmoid_mean_losses(const Span& span, int64_t n, T partial, T* s_partial,
                                    const T* s_max, const T* s_E, T* s_sum, T log_count, T* loss) {
  s_partial[threadIdx.x] = partial;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < span.pairs; p += blockDim.x) {
    s_sum[p] = pair_sum(s_partial, p, n);
    loss[span.b0 + p] = sigmoid_shifted_forward(s_max[p], s_E[p], s_sum[p], log_count);
  }
  __syncthreads();
}

// bradley_terry, which mixture and independent are at N = 1: a thread per pair, computed by the
// same functions as paper's pairwise term, so that the scalar head gives the same bits through
// either op. (The constant is the kernels' log K, 0 here.)
template <typename scalar_t, typename T, bool kWithGrad>
__global__ void __launch_bounds__(kRows)
    bradley_terry_kernel(const scalar_t* __restrict__ h_chosen,
                         const scalar_t* __restrict__ h_rejected, int64_t batch, int64_t, int64_t,
                         T, T* __restrict__ loss, scalar_t* __restrict__ grad_chosen,
                         scalar_t* __restrict__ grad_rejected) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const T d = T(h_chosen[b]) - T(h_rejected[b]);
  const T e = exp_neg_abs(d);
  loss[b] = bradley_terry_forward(d, e);
  if constexpr (kWithGrad) {
    const T grad = bradley_terry_backward(d, e);
    grad_chosen[b] = scalar_t(grad);
    grad_rejected[b] = scalar_t(-grad);
  }
}

// mixture, N ≥ 2. Shared: [pairs·N] differences, then q's, [pairs] maxima, E's and sums, [kRows]
// partials.
template <typename scalar_t, typename T, bool kWithGrad>
__global__ void __launch_bounds__(kRows)
    mixture_kernel(const scalar_t* __restrict__ h_chosen, const scalar_t* __restrict__ h_rejected,
                   int64_t batch, int64_t n, int64_t pairs_per_block, T log_n,
                   T* __restrict__ loss, scalar_t* __restrict__ grad_chosen,
                   scalar_t* __restrict__ grad_rejected) {
  const Span span(batch, n, pairs_per_block);
  T* s_d = shared_array<T>();
  T* s_q = s_d + pairs_per_block * n;
  T* s_max = s_q + pairs_per_block * n;
  T* s_E = s_max + pairs_per_block;
  T* s_sum = s_E + pairs_per_block;
  T* s_partial = s_sum + pairs_per_block;

  for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
    s_d[r] = T(h_chosen[span.base + r]) - T(h_rejected[span.base + r]);
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < span.pairs; p += blockDim.x) {
    T max_d = s_d[p * n];
    for (int64_t i = 1; i < n; ++i) max_d = s_d[p * n + i] > max_d ? s_d[p * n + i] : max_d;
    s_max[p] = max_d;
    s_E[p] = simd_exp_neg_abs(max_d);
  }
  __syncthreads();

  T partial = T(0);
  for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
    const int64_t p = r / n;
    T ratio;
    sigmoid_shifted_terms(s_d[r], s_max[p], s_E[p], ratio, s_q[r]);
    partial += ratio;
  }
  sigmoid_mean_losses(span, n, partial, s_partial, s_max, s_E, s_sum, log_n, loss);
  if constexpr (kWithGrad) {
    for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
      const T grad = sigmoid_mean_backward(s_q[r], T(1) / s_sum[r / n]);
      grad_chosen[span.base + r] = scalar_t(grad);
      grad_rejected[span.base + r] = scalar_t(-grad);
    }
  }
}

// independent, N ≥ 2. Shared: [pairs·N] c, r, then Σ_j q_ij (row i) and Σ_j q_ji (column i), [pairs]
// maxima, E's and sums, [kRows] partials. Thread (p, i) evaluates row i (d_ij over j, counted in
// the sum) and column i (d_ji over j) of its pair: every (i, j) twice, no thread waits on another.
template <typename scalar_t, typename T, bool kWithGrad>
__global__ void __launch_bounds__(kRows)
    independent_kernel(const scalar_t* __restrict__ h_chosen,
                       const scalar_t* __restrict__ h_rejected, int64_t batch, int64_t n,
                       int64_t pairs_per_block, T log_n2, T* __restrict__ loss,
                       scalar_t* __restrict__ grad_chosen, scalar_t* __restrict__ grad_rejected) {
  const Span span(batch, n, pairs_per_block);
  T* s_c = shared_array<T>();
  T* s_r = s_c + pairs_per_block * n;
  T* s_q_row = s_r + pairs_per_block * n;
  T* s_q_column = s_q_row + pairs_per_block * n;
  T* s_max = s_q_column + pairs_per_block * n;
  T* s_E = s_max + pairs_per_block;
  T* s_sum = s_E + pairs_per_block;
  T* s_partial = s_sum + pairs_per_block;

  stage_rows(span, h_chosen, h_rejected, s_c, s_r);
  for (int64_t p = threadIdx.x; p < span.pairs; p += blockDim.x) {
    // max_ij (c_i − r_j) = max_i c_i − min_j r_j exactly: rounding is monotonic in each argument
    T max_c = s_c[p * n], min_r = s_r[p * n];
    for (int64_t i = 1; i < n; ++i) {
      max_c = s_c[p * n + i] > max_c ? s_c[p * n + i] : max_c;
      min_r = s_r[p * n + i] < min_r ? s_r[p * n + i] : min_r;
    }
    s_max[p] = max_c - min_r;
    s_E[p] = simd_exp_neg_abs(s_max[p]);
  }
  __syncthreads();

  T partial = T(0);
  for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
    const int64_t p = r / n;
    const T* c = s_c + p * n;
    const T* rr = s_r + p * n;
    const int64_t i = r - p * n;
    T q_row = T(0), q_column = T(0);
    for (int64_t j = 0; j < n; ++j) {
      T ratio, q;
      sigmoid_shifted_terms(c[i] - rr[j], s_max[p], s_E[p], ratio, q);
      partial += ratio;
      q_row += q;
      if constexpr (kWithGrad) {
        sigmoid_shifted_terms(c[j] - rr[i], s_max[p], s_E[p], ratio, q);
        q_column += q;
      }
    }
    s_q_row[r] = q_row;
    s_q_column[r] = q_column;
  }
  sigmoid_mean_losses(span, n, partial, s_partial, s_max, s_E, s_sum, log_n2, loss);
  if constexpr (kWithGrad) {
    for (int64_t r = threadIdx.x; r < span.rows; r += blockDim.x) {
      const T inv_sum = T(1) / s_sum[r / n];
      grad_chosen[span.base + r] = scalar_t(sigmoid_mean_backward(s_q_row[r], inv_sum));
      grad_rejected[span.base + r] = scalar_t(-sigmoid_mean_backward(s_q_column[r], inv_sum));
    }
  }
}

// Every loss kernel's signature: (inputs, batch, N, pairs per block, the objective's constants,
// outputs).
template <typename scalar_t, typename Constants>
using LossKernel = void (*)(const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, Constants,
                            at::opmath_type<scalar_t>*, scalar_t*, scalar_t*);

// Launches kernel over blocks of pairs, with rows_arrays·(pairs·N) + pair_arrays·pairs + kRows
// values of T in shared memory, after checking that they fit.
template <typename scalar_t, typename Constants>
void launch(LossKernel<scalar_t, Constants> kernel, const at::Tensor& hc, const at::Tensor& hr,
            LossOutputs& outputs, bool with_grad, int64_t rows_arrays, int64_t pair_arrays,
            Constants constants) {
  using T = at::opmath_type<scalar_t>;
  const int64_t batch = hc.size(0);
  const int64_t n = hc.size(1);
  const int64_t pairs_per_block = std::max<int64_t>(1, kRows / n);
  const int64_t blocks = (batch + pairs_per_block - 1) / pairs_per_block;
  const size_t shared =
      sizeof(T) * (rows_arrays * pairs_per_block * n + pair_arrays * pairs_per_block + kRows);
  TORCH_CHECK_VALUE(blocks <= INT_MAX, "h_chosen has B = ", batch,
                    " pairs, more than one launch of this kernel covers");
  int device = 0, shared_limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(shared <= size_t(shared_limit), "h_chosen has N = ", n,
                    " outputs, which needs ", shared,
                    " bytes of shared memory per block; this GPU allows ", shared_limit);
  if (shared > 48 * 1024) {  // above the default 48 KiB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)));
  }
  auto& [loss, grad_chosen, grad_rejected] = outputs;
  kernel<<<static_cast<unsigned int>(blocks), kRows, shared, c10::cuda::getCurrentCUDAStream()>>>(
      hc.const_data_ptr<scalar_t>(), hr.const_data_ptr<scalar_t>(), batch, n, pairs_per_block,
      constants, loss.mutable_data_ptr<T>(),
      with_grad ? grad_chosen.mutable_data_ptr<scalar_t>() : nullptr,
      with_grad ? grad_rejected.mutable_data_ptr<scalar_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define MINQR_LOSS_TYPES(scalar, with_grad)         \
  using scalar_t = typename decltype(scalar)::type; \
  using T = at::opmath_type<scalar_t>;              \
  constexpr bool kWithGrad = decltype(with_grad)::value

LossOutputs paper_loss_cuda(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                            double kappa, double lam, double margin, c10::string_view reduction,
                            bool compute_grad) {
  check_outputs(h_chosen, h_rejected);  // first, as minqr/objectives/ops.py's checks go
  check_paper_hyperparameters(kappa, lam, margin);
  const c10::cuda::CUDAGuard guard(h_chosen.device());
  return run_loss(h_chosen, h_rejected, reduction, compute_grad,
                  [&](auto scalar, auto with_grad, const at::Tensor& hc, const at::Tensor& hr,
                      LossOutputs& outputs) {
                    MINQR_LOSS_TYPES(scalar, with_grad);
                    launch<scalar_t, PaperConstants<T>>(
                        paper_kernel<scalar_t, T, kWithGrad>, hc, hr, outputs, kWithGrad, 2, 1,
                        PaperConstants<T>(kappa, lam, margin, hc.size(1)));
                  });
}

// mixture and independent, which share everything but their kernel: Bradley–Terry itself at
// N = 1, else kernel<scalar_t, T, with_grad> (from kernel_for(scalar, with_grad)) with log K,
// K = N^power, and rows_arrays [pairs·N] arrays in shared memory.
template <typename KernelFor>
LossOutputs sigmoid_mean_loss_cuda(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                                   c10::string_view reduction, bool compute_grad, int power,
                                   int64_t rows_arrays, const KernelFor& kernel_for) {
  const c10::cuda::CUDAGuard guard(h_chosen.device());
  return run_loss(h_chosen, h_rejected, reduction, compute_grad,
                  [&](auto scalar, auto with_grad, const at::Tensor& hc, const at::Tensor& hr,
                      LossOutputs& outputs) {
                    MINQR_LOSS_TYPES(scalar, with_grad);
                    const int64_t n = hc.size(1);
                    if (n == 1) {
                      // one pair per thread: at N = 1 a block has kRows pairs, thread t the t-th
                      launch<scalar_t, T>(bradley_terry_kernel<scalar_t, T, kWithGrad>, hc, hr, outputs,
                                          kWithGrad, 0, 0, T(0));
                    } else {
                      launch<scalar_t, T>(kernel_for(scalar, with_grad), hc, hr, outputs, kWithGrad,
                                          rows_arrays, 3, T(power * std::log(double(n))));
                    }
                  });
}

LossOutputs mixture_loss_cuda(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                              c10::string_view reduction, bool compute_grad) {
  return sigmoid_mean_loss_cuda(h_chosen, h_rejected, reduction, compute_grad, 1, 2, [](auto scalar, auto with_grad) {
    MINQR_LOSS_TYPES(scalar, with_grad);
    return mixture_kernel<scalar_t, T, kWithGrad>;
  });
}

LossOutputs independent_loss_cuda(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                                  c10::string_view reduction, bool compute_grad) {
  return sigmoid_mean_loss_cuda(h_chosen, h_rejected, reduction, compute_grad, 2, 4, [](auto scalar, auto with_grad) {
    MINQR_LOSS_TYPES(scalar, with_grad);
    return independent_kernel<scalar_t, T, kWithGrad>;
  });
}

#undef MINQR_LOSS_TYPES

// loss_backward: out[b, i] = grad[b, i] · scale.value(b), a thread per value (grid-stride).
template <typename scalar_t, typename T>
__global__ void scale_rows_kernel(LossScale<T> scale, int64_t n,
                                  int64_t count, const scalar_t* __restrict__ gc,
                                  const scalar_t* __restrict__ gr, scalar_t* __restrict__ out_c,
                                  scalar_t* __restrict__ out_r) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
       k += int64_t(gridDim.x) * blockDim.x) {
    const T s = scale.value(k / n);
    out_c[k] = scalar_t(T(gc[k]) * s);
    out_r[k] = scalar_t(T(gr[k]) * s);
  }
}

std::tuple<at::Tensor, at::Tensor> loss_backward_cuda(const at::Tensor& grad_loss,
                                                      const at::Tensor& grad_chosen,
                                                      const at::Tensor& grad_rejected,
                                                      c10::string_view reduction) {
  const c10::cuda::CUDAGuard guard(grad_chosen.device());
  return run_loss_backward(grad_loss, grad_chosen, grad_rejected, reduction, [&](auto scalar, const auto& scale,
                                                                                 const at::Tensor& gc,
                                                                                 const at::Tensor& gr,
                                                                                 at::Tensor& out_c,
                                                                                 at::Tensor& out_r) {
    using scalar_t = typename decltype(scalar)::type;
    using T = at::opmath_type<scalar_t>;
    const int64_t count = gc.numel();
    // enough blocks to fill the GPU, few enough that each thread strides over several values
    const int64_t blocks = std::min<int64_t>((count + kRows - 1) / kRows, 65536);
    scale_rows_kernel<scalar_t, T><<<static_cast<unsigned int>(blocks), kRows, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        scale, gc.size(1), count,
        gc.const_data_ptr<scalar_t>(), gr.const_data_ptr<scalar_t>(), out_c.mutable_data_ptr<scalar_t>(),
        out_r.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minqr, CUDA, m) {
  m.impl("paper_loss", &paper_loss_cuda);
  m.impl("mixture_loss", &mixture_loss_cuda);
  m.impl("independent_loss", &independent_loss_cuda);
  m.impl("loss_backward", &loss_backward_cuda);
}

}  // namespace minqr
