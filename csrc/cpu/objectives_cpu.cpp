// CPU kernels of the loss ops: each pair's loss and, with compute_grad, its gradient, in one pass
// (the math is objectives.h; the references are minqr/objectives/), and loss_backward.
//
// Every objective runs in the same frame: pairs go kLanes at a time, a block of consecutive pairs
// per call of the objective's block function, blocks spread over threads by at::parallel_for.
// paper and independent, whose work per pair is O(N²), transpose a block into scratch
// (c[i * kLanes + w] = h_chosen[b0 + w, i], converted to T), one pair per SIMD lane, so that every
// inner loop runs over lanes with a fixed trip count and vectorises fully whatever N is, N = 1
// included. (Vectorising over i or j instead would leave N = 10 mostly in the scalar remainder of a
// 16-wide loop.) 16 floats are one AVX-512 vector or two AVX2 vectors. mixture, whose work per pair
// is O(N) like the transposition itself, stays in the rows' layout.
//
// Forward/backward split, decided by measurement (B = 4096, float32, one thread on the project's
// 2-core AMD EPYC, shared with other jobs; median ms): the forward computes each pair's gradients
// and saves them, and the backward only scales them by grad_output (loss_backward). Recomputing
// them in the backward instead (a loss-only forward, then the full pass) costs a loss-only pass
// more, and a loss-only pass costs 75-90% of the full one, since the exps, divisions and Huber
// terms are the work and the gradients only sum what they give:
//
//   ms                    loss only  with gradients  loss_backward   save   recompute
//   mixture      N = 10     0.074        0.085          0.012        0.097     0.159
//                N = 64     0.248        0.293          0.051        0.345     0.542
//   independent  N = 10     0.121        0.165          0.012        0.177     0.286
//                N = 64     2.326        2.770          0.051        2.821     5.096
//   paper        N = 10     0.177        0.244          0.013        0.257     0.421
//                N = 64     3.120        4.289          0.058        4.347     7.408
//
// A forward under no_grad passes compute_grad=false and skips the gradient arithmetic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../objectives.h"
#include "../ops.h"

namespace minqr {
namespace {

constexpr int64_t kLanes = 16;

// The default x86-64 target is SSE2 (4 floats). GCC also compiles each block function for AVX2+FMA
// and AVX-512 and picks the widest the CPU has when the library loads (an ifunc), so the build
// needs no -march=native and the wheel runs on any x86-64. (GCC contracts a·b + c into an FMA in
// the two clones that have one, even in ISO C++ mode, so results may differ from the SSE2 clone's
// in the last bit; one machine always picks the same clone.) To check that the `omp simd` loops
// vectorised in every clone, compile this file with the build's flags plus -fopt-info-vec: GCC 12
// reports "loop vectorized using 64 / 32 / 16 byte vectors" for them (AVX-512 / AVX2 / SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MINQR_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MINQR_SIMD_CLONES
#endif

// Below this much work a call runs on the calling thread: waking a second thread for less costs
// more than it saves, and on a machine shared with other jobs a team waits for its slowest,
// descheduled thread. The unit is one evaluation of paper's inner (i, j) body (about 0.15 ns on
// one core of the project's CPU, so 2^17 of them are about 20 us); a mixture term, an exp and a
// division, counts as 5 (measured 0.76 ns).
constexpr int64_t kMinTaskWork = int64_t(1) << 17;
constexpr int64_t kMixtureTermWork = 5;

// ---------------------------------------------------------------------------------------------
// Blocks and their transposition

// A block: lanes ≤ kLanes consecutive pairs, as rows [lanes][n] of the inputs and of the gradient
// outputs (null without compute_grad).
template <typename scalar_t>
struct Rows {
  const scalar_t* h_chosen;
  const scalar_t* h_rejected;
  scalar_t* grad_chosen;
  scalar_t* grad_rejected;
  int64_t lanes, n;
};

// Transposing a block costs as much as mixture's whole math at N = 10 when written naively (a
// branch per value for the lanes past the batch, and scalar loads and stores outside the cloned
// functions); these are inlined into the block functions, so they vectorise with each clone's
// instructions.

// x[i * kLanes + w] = value(w * n + i), the offset of (w, i) in the rows; 0 for lanes past the
// batch.
template <typename T, typename Value>
[[gnu::always_inline]] inline void transpose_in(int64_t lanes, int64_t n, T* x, const Value& value) {
  if (lanes < kLanes) std::fill(x, x + n * kLanes, T(0));  // the last block of the batch
  for (int64_t i = 0; i < n; ++i) {
    if (lanes == kLanes) {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) x[i * kLanes + w] = value(w * n + i);
    } else {
      for (int64_t w = 0; w < lanes; ++w) x[i * kLanes + w] = value(w * n + i);
    }
  }
}

// write(w, i) for every real lane w and every i, a row at a time: contiguous stores.
template <typename Write>
[[gnu::always_inline]] inline void transpose_out(int64_t lanes, int64_t n, const Write& write) {
  for (int64_t w = 0; w < lanes; ++w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) write(w, i);
  }
}

template <typename scalar_t, typename T>
[[gnu::always_inline]] inline void load_rows(const Rows<scalar_t>& rows, T* c, T* r) {
  transpose_in(rows.lanes, rows.n, c, [&](int64_t k) { return T(rows.h_chosen[k]); });
  transpose_in(rows.lanes, rows.n, r, [&](int64_t k) { return T(rows.h_rejected[k]); });
}

template <typename scalar_t, typename T>
[[gnu::always_inline]] inline void store_grads(const Rows<scalar_t>& rows, const T* grad_c,
                                               const T* grad_r) {
  transpose_out(rows.lanes, rows.n, [&](int64_t w, int64_t i) {
    rows.grad_chosen[w * rows.n + i] = scalar_t(grad_c[i * kLanes + w]);
    rows.grad_rejected[w * rows.n + i] = scalar_t(grad_r[i * kLanes + w]);
  });
}

// ---------------------------------------------------------------------------------------------
// The objectives, one block each: the block's losses into loss[kLanes] (lanes past the batch are
// computed on zeros and never stored) and, with kWithGrad, its gradients into the rows.

// bradley_terry, which mixture and independent are at N = 1: computed by the same functions as
// paper's pairwise term, so that the scalar head gives the same bits through either op.
template <typename scalar_t, typename T, bool kWithGrad>
void bradley_terry_block(const Rows<scalar_t>& rows, T* loss) {
  for (int64_t w = 0; w < rows.lanes; ++w) {  // libm's exp and log1p: calls, not vectorised
    const T d = T(rows.h_chosen[w]) - T(rows.h_rejected[w]);
    const T e = exp_neg_abs(d);
    loss[w] = bradley_terry_forward(d, e);
    if constexpr (kWithGrad) {
      const T grad = bradley_terry_backward(d, e);
      rows.grad_chosen[w] = scalar_t(grad);
      rows.grad_rejected[w] = scalar_t(-grad);
    }
  }
}

// independent's factors on its direct way (below): exp(s − c_i) into c and exp(r_j − s) into r,
// [n][kLanes] each, s = middle[w] per lane. A function of its own so that GCC may contract the
// exp polynomial's a·b + c into FMAs (in the clones that have them), which the region below
// forbids: these values are the same whether or not the gradients are computed. That took 13% off
// the whole kernel at B = 4096, N = 10 (one thread, best of rounds: 0.160 against 0.183 ms).
template <typename T>
MINQR_SIMD_CLONES void exp_factors(int64_t n, const T* middle, T* c, T* r) {
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      c[i * kLanes + w] = simd_exp(middle[w] - c[i * kLanes + w]);
      r[i * kLanes + w] = simd_exp(r[i * kLanes + w] - middle[w]);
    }
  }
}

// No FMA contraction in mixture and independent, which have no earlier numbers to keep (paper
// keeps its own): GCC fuses a·b + c where the product has no other use, and the loss then depended
// on whether the gradients (another use) were computed.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Whether every one of count values lies within ±bound (a NaN may go either way: both ways carry
// it to the loss).
template <typename T>
[[gnu::always_inline]] inline bool all_within(int64_t count, const T* x, T bound) {
  int64_t outside = 0;
#pragma omp simd reduction(+ : outside)
  for (int64_t k = 0; k < count; ++k) outside += std::fabs(x[k]) > bound;
  return outside == 0;
}

// The smallest and the largest of [n][kLanes] values, per lane (a NaN is passed over: its own
// terms carry it to the loss).
template <typename T>
[[gnu::always_inline]] inline void range_per_lane(int64_t n, const T* x, T* low, T* high) {
  for (int64_t w = 0; w < kLanes; ++w) {
    low[w] = INFINITY;
    high[w] = -INFINITY;
  }
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      const T x_i = x[i * kLanes + w];
      low[w] = x_i < low[w] ? x_i : low[w];
      high[w] = x_i > high[w] ? x_i : high[w];
    }
  }
}

// The block's losses from its sums (directly, or shifted by each pair's largest difference
// max_d, with E = exp(−|max_d|)), and the sums' inverses for the gradients.
template <typename T>
[[gnu::always_inline]] inline void lane_losses(bool direct, const T* max_d, const T* E, const T* sum,
                                               T log_count, T* loss, T* inv_sum) {
  if (direct) {
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) loss[w] = sigmoid_direct_forward(sum[w], log_count);
  } else {
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) loss[w] = sigmoid_shifted_forward(max_d[w], E[w], sum[w], log_count);
  }
#pragma omp simd
  for (int64_t w = 0; w < kLanes; ++w) inv_sum[w] = T(1) / sum[w];
}

// mixture, N ≥ 2, in the rows' own layout: its work per pair is O(N), the same order as a
// transposition, which would cost more than the math (measured: 2x the whole kernel at N = 32
// and 64). The terms go over the block's values as one run when the block is computed directly,
// row by row (each row with its pair's maximum) when shifted; then each pair's sum, its loss
// (across the block's pairs, in lanes), and the gradients row by row.
// scratch: [lanes][n] differences, σ's (or ratios), q's.
template <typename scalar_t, typename T, bool kWithGrad>
MINQR_SIMD_CLONES void mixture_block(const Rows<scalar_t>& rows, T log_n, T* scratch, T* loss) {
  const int64_t n = rows.n;
  const int64_t count = rows.lanes * n;
  T* d = scratch;
  T* part = d + n * kLanes;
  T* q = part + n * kLanes;
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) d[k] = T(rows.h_chosen[k]) - T(rows.h_rejected[k]);
  T sum[kLanes];
  T max_d[kLanes], E[kLanes], inv_sum[kLanes];
  const bool direct = all_within(count, d, sigmoid_direct_span<T>());
  if (direct) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) sigmoid_direct_terms(simd_exp(-d[k]), part[k], q[k]);
  } else {
    for (int64_t w = 0; w < kLanes; ++w) {
      max_d[w] = w < rows.lanes ? d[w * n] : T(0);
      for (int64_t i = 1; i < n && w < rows.lanes; ++i) {
        max_d[w] = d[w * n + i] > max_d[w] ? d[w * n + i] : max_d[w];  // a NaN reaches the loss through its term
      }
    }
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) E[w] = simd_exp_neg_abs(max_d[w]);
    for (int64_t w = 0; w < rows.lanes; ++w) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        sigmoid_shifted_terms(d[w * n + i], max_d[w], E[w], part[w * n + i], q[w * n + i]);
      }
    }
  }
  for (int64_t w = 0; w < kLanes; ++w) {
    T s = T(0);
    if (w < rows.lanes) {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += part[w * n + i];
    }
    sum[w] = w < rows.lanes ? s : T(1);  // lanes past the batch: any finite loss, never stored
  }
  lane_losses(direct, max_d, E, sum, log_n, loss, inv_sum);
  if constexpr (kWithGrad) {
    for (int64_t w = 0; w < rows.lanes; ++w) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T grad = sigmoid_mean_backward(q[w * n + i], inv_sum[w]);  // ∂L/∂d_i
        rows.grad_chosen[w * n + i] = scalar_t(grad);
        rows.grad_rejected[w * n + i] = scalar_t(-grad);
      }
    }
  }
}

// independent, N ≥ 2: one pass over (i, j), accumulating the sum, and q by row (for h_c,i) and by
// column (for h_r,j); the division by the sum follows.
//
// Directly when every output of a block's pairs lies within the span of each other: then
// exp(−d_ij) = exp(r_j − s)·exp(s − c_i), s the middle of the pair's outputs, each factor within
// exp(±span/2): 2N exps per pair instead of N². Shifted otherwise, where M = max_i c_i − min_j r_j
// is exactly the largest d_ij, since rounding c − r is monotonic in each argument.
// scratch: [n][kLanes] c, r (replaced by the factors on the direct way), Σ_j q_ij, Σ_i q_ij.
template <typename scalar_t, typename T, bool kWithGrad>
MINQR_SIMD_CLONES void independent_block(const Rows<scalar_t>& rows, T log_n2, T* scratch,
                                         T* loss) {
  const int64_t n = rows.n;
  T* c = scratch;
  T* r = c + n * kLanes;
  T* q_rows = r + n * kLanes;
  T* q_columns = q_rows + n * kLanes;
  load_rows(rows, c, r);
  T min_c[kLanes], max_c[kLanes], min_r[kLanes], max_r[kLanes], span[kLanes], middle[kLanes];
  range_per_lane(n, c, min_c, max_c);
  range_per_lane(n, r, min_r, max_r);
#pragma omp simd
  for (int64_t w = 0; w < kLanes; ++w) {
    const T high = max_c[w] > max_r[w] ? max_c[w] : max_r[w];
    const T low = min_c[w] < min_r[w] ? min_c[w] : min_r[w];
    span[w] = high - low;
    middle[w] = low + T(0.5) * span[w];  // not (high + low) / 2, which overflows near the type's max
  }
  T sum[kLanes] = {};
  if constexpr (kWithGrad) std::fill(q_columns, q_columns + n * kLanes, T(0));
  // terms(i, j, w) -> (σ or ratio, q), summed by lane, by row and by column
  const auto add_terms = [&](const auto& terms) {
    for (int64_t i = 0; i < n; ++i) {
      T q_row[kLanes] = {};
      for (int64_t j = 0; j < n; ++j) {
        T* q_column = q_columns + j * kLanes;
#pragma omp simd
        for (int64_t w = 0; w < kLanes; ++w) {
          T part, q;
          terms(i * kLanes + w, j * kLanes + w, w, part, q);
          sum[w] += part;
          if constexpr (kWithGrad) {
            q_row[w] += q;
            q_column[w] += q;
          }
        }
      }
      if constexpr (kWithGrad) std::copy(q_row, q_row + kLanes, q_rows + i * kLanes);
    }
  };
  T max_d[kLanes], E[kLanes], inv_sum[kLanes];
  const bool direct = all_within(kLanes, span, sigmoid_direct_span<T>());
  if (direct) {
    exp_factors(n, middle, c, r);  // exp(s − c_i), exp(r_j − s)
    add_terms([&](int64_t ci, int64_t rj, int64_t, T& sigma, T& q) {
      sigmoid_direct_terms(r[rj] * c[ci], sigma, q);
    });
  } else {
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      max_d[w] = max_c[w] - min_r[w];
      E[w] = simd_exp_neg_abs(max_d[w]);
    }
    add_terms([&](int64_t ci, int64_t rj, int64_t w, T& ratio, T& q) {
      sigmoid_shifted_terms(c[ci] - r[rj], max_d[w], E[w], ratio, q);
    });
  }
  lane_losses(direct, max_d, E, sum, log_n2, loss, inv_sum);
  if constexpr (kWithGrad) {
    // ∂L/∂h_c,i = Σ_j ∂L/∂d_ij, ∂L/∂h_r,j = −Σ_i ∂L/∂d_ij
    transpose_out(rows.lanes, n, [&](int64_t w, int64_t i) {
      rows.grad_chosen[w * n + i] = scalar_t(sigmoid_mean_backward(q_rows[i * kLanes + w], inv_sum[w]));
      rows.grad_rejected[w * n + i] =
          scalar_t(-sigmoid_mean_backward(q_columns[i * kLanes + w], inv_sum[w]));
    });
  }
}

#pragma GCC pop_options

// paper. scratch: [n][kLanes] q_c, q_r, the targets q_r[j] + m, and the two gradients.
template <typename scalar_t, typename T, bool kWithGrad>
MINQR_SIMD_CLONES void paper_block(const Rows<scalar_t>& rows, const PaperConstants<T>& k,
                                   const T* tau, T* scratch, T* loss) {
  const int64_t n = rows.n;
  T* qc = scratch;
  T* qr = qc + n * kLanes;
  T* target = qr + n * kLanes;  // q_r[j] + m, the chosen side's targets
  T* grad_c = target + n * kLanes;
  T* grad_r = grad_c + n * kLanes;
  load_rows(rows, qc, qr);
  T sum_c[kLanes] = {}, sum_r[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t w = 0; w < kLanes; ++w) {
      target[i * kLanes + w] = qr[i * kLanes + w] + k.margin;
      sum_c[w] += qc[i * kLanes + w];
      sum_r[w] += qr[i * kLanes + w];
      if constexpr (kWithGrad) grad_r[i * kLanes + w] = T(0);
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
      T* gr_j = grad_r + j * kLanes;
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
      for (int64_t w = 0; w < kLanes; ++w) grad_c[i * kLanes + w] = gc_i[w];
    }
  }

  for (int64_t w = 0; w < kLanes; ++w) {  // libm's exp and log1p, per pair
    const T e = exp_neg_abs(d[w]);
    loss[w] = paper_forward(d[w], e, rho[w], k);
    if constexpr (kWithGrad) {
      const T s = sigmoid_neg(d[w], e);
      for (int64_t i = 0; i < n; ++i) {
        grad_c[i * kLanes + w] = paper_backward(T(-1), s, grad_c[i * kLanes + w], k);
        grad_r[i * kLanes + w] = paper_backward(T(1), s, grad_r[i * kLanes + w], k);
      }
    }
  }
  if constexpr (kWithGrad) store_grads(rows, grad_c, grad_r);
}

// ---------------------------------------------------------------------------------------------
// The frame

// Runs block(rows, scratch, loss) over every block of pairs. work_per_pair: what a pair costs, in
// kMinTaskWork's unit, which sets how many blocks a task gets; scratch_rows: the [n][kLanes]
// arrays of T the objective needs.
template <typename scalar_t, bool kWithGrad, typename Block>
void for_each_block(const at::Tensor& h_chosen, const at::Tensor& h_rejected, LossOutputs& outputs,
                    int64_t work_per_pair, int64_t scratch_rows, const Block& block) {
  using T = at::opmath_type<scalar_t>;
  auto& [loss, grad_chosen, grad_rejected] = outputs;
  const int64_t batch = h_chosen.size(0);
  const int64_t n = h_chosen.size(1);
  const scalar_t* hc = h_chosen.const_data_ptr<scalar_t>();
  const scalar_t* hr = h_rejected.const_data_ptr<scalar_t>();
  T* loss_out = loss.mutable_data_ptr<T>();
  scalar_t* gc_out = kWithGrad ? grad_chosen.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gr_out = kWithGrad ? grad_rejected.mutable_data_ptr<scalar_t>() : nullptr;

  const int64_t blocks = (batch + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (kLanes * work_per_pair));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(scratch_rows * n * kLanes);  // per task: blocks never share scratch
    T block_loss[kLanes];
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b0 = index * kLanes;
      const int64_t offset = b0 * n;  // int64: b0·n exceeds 2^31 for large B·N
      const int64_t lanes = std::min(kLanes, batch - b0);
      const Rows<scalar_t> rows{hc + offset, hr + offset, kWithGrad ? gc_out + offset : nullptr,
                                kWithGrad ? gr_out + offset : nullptr, lanes, n};
      block(rows, scratch.data(), block_loss);
      std::copy(block_loss, block_loss + lanes, loss_out + b0);
    }
  });
}

// The ops: run_loss (ops.h) checks and allocates, then calls these with the dtype and
// compute_grad as types.
#define MINQR_LOSS_TYPES(scalar, with_grad)            \
  using scalar_t = typename decltype(scalar)::type;    \
  using T = at::opmath_type<scalar_t>;                 \
  constexpr bool kWithGrad = decltype(with_grad)::value

// mixture and independent, which share everything but their block: Bradley–Terry itself at N = 1
// (bradley_terry_block), else block(rows, log K, scratch, loss, with_grad) with K = N^power
// outputs' differences per pair, each of term_work (kMinTaskWork's unit).
template <typename Block>
LossOutputs sigmoid_mean_loss_cpu(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                                  c10::string_view reduction, bool compute_grad, int power,
                                  int64_t term_work, int64_t scratch_rows, const Block& block) {
  return run_loss(h_chosen, h_rejected, reduction, compute_grad,
                  [&](auto scalar, auto with_grad, const at::Tensor& hc, const at::Tensor& hr,
                      LossOutputs& outputs) {
                    MINQR_LOSS_TYPES(scalar, with_grad);
                    const int64_t n = hc.size(1);
                    const int64_t count = power == 1 ? n : n * n;
                    const T log_count = T(std::log(double(count)));
                    for_each_block<scalar_t, kWithGrad>(
                        hc, hr, outputs, term_work * count, scratch_rows,
                        [&](const Rows<scalar_t>& rows, T* scratch, T* loss) {
                          if (n == 1) {
                            bradley_terry_block<scalar_t, T, kWithGrad>(rows, loss);
                          } else {
                            block(rows, log_count, scratch, loss, with_grad);
                          }
                        });
                  });
}

LossOutputs mixture_loss_cpu(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                             c10::string_view reduction, bool compute_grad) {
  return sigmoid_mean_loss_cpu(
      h_chosen, h_rejected, reduction, compute_grad, 1, kMixtureTermWork, 3,
      [](const auto& rows, auto log_n, auto* scratch, auto* loss, auto with_grad) {
        using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(rows.h_chosen)>>;
        mixture_block<scalar_t, decltype(log_n), decltype(with_grad)::value>(rows, log_n, scratch, loss);
      });
}

LossOutputs independent_loss_cpu(const at::Tensor& h_chosen, const at::Tensor& h_rejected,
                                 c10::string_view reduction, bool compute_grad) {
  return sigmoid_mean_loss_cpu(
      h_chosen, h_rejected, reduction, compute_grad, 2, 1, 4,
      [](const auto& rows, auto log_n2, auto* scratch, auto* loss, auto with_grad) {
        using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(rows.h_chosen)>>;
        independent_block<scalar_t, decltype(log_n2), decltype(with_grad)::value>(rows, log_n2, scratch, loss);
      });
}

LossOutputs paper_loss_cpu(const at::Tensor& h_chosen, const at::Tensor& h_rejected, double kappa,
                           double lam, double margin, c10::string_view reduction,
                           bool compute_grad) {
  check_outputs(h_chosen, h_rejected);  // first, as minqr/objectives/ops.py's checks go
  check_paper_hyperparameters(kappa, lam, margin);
  return run_loss(h_chosen, h_rejected, reduction, compute_grad,
                  [&](auto scalar, auto with_grad, const at::Tensor& hc, const at::Tensor& hr,
                      LossOutputs& outputs) {
                    MINQR_LOSS_TYPES(scalar, with_grad);
                    const int64_t n = hc.size(1);
                    const PaperConstants<T> k(kappa, lam, margin, n);
                    std::vector<T> tau(n);
                    for (int64_t i = 0; i < n; ++i) tau[i] = quantile_level<T>(i, n);
                    for_each_block<scalar_t, kWithGrad>(
                        hc, hr, outputs, n * n, 5, [&](const Rows<scalar_t>& rows, T* scratch, T* loss) {
                          paper_block<scalar_t, T, kWithGrad>(rows, k, tau.data(), scratch, loss);
                        });
                  });
}

#undef MINQR_LOSS_TYPES

// ---------------------------------------------------------------------------------------------
// loss_backward: out[b, i] = grad[b, i] · scale.value(b), for both sides in one pass.

// Rows [begin, end). With one scale for every pair (the gradient of a mean or a sum of the
// losses, the usual case) the rows are one flat run of values; otherwise a row at a time, which
// at N = 10 leaves most of each vector empty.
template <typename scalar_t, typename T>
MINQR_SIMD_CLONES void scale_rows(const LossScale<T>& scale, bool uniform, int64_t n,
                                  int64_t begin, int64_t end, const scalar_t* gc,
                                  const scalar_t* gr, scalar_t* out_c, scalar_t* out_r) {
  if (uniform) {
    const T s = scale.value(0);
#pragma omp simd
    for (int64_t k = begin * n; k < end * n; ++k) {
      out_c[k] = scalar_t(T(gc[k]) * s);
      out_r[k] = scalar_t(T(gr[k]) * s);
    }
    return;
  }
  for (int64_t b = begin; b < end; ++b) {
    const T s = scale.value(b);
#pragma omp simd
    for (int64_t k = b * n; k < (b + 1) * n; ++k) {
      out_c[k] = scalar_t(T(gc[k]) * s);
      out_r[k] = scalar_t(T(gr[k]) * s);
    }
  }
}

// Whether every pair has the same scale: with a reduction, or a per-pair grad_loss that is one
// value expanded (stride 0) or holds B equal values (one pass over them to find out).
template <typename T>
bool uniform_scale(const LossScale<T>& scale, int64_t batch) {
  if (scale.uniform()) return true;
  int64_t differing = 0;
#pragma omp simd reduction(+ : differing)
  for (int64_t b = 1; b < batch; ++b) differing += scale.value(b) != scale.value(0);
  return differing == 0;
}

std::tuple<at::Tensor, at::Tensor> loss_backward_cpu(const at::Tensor& grad_loss,
                                                     const at::Tensor& grad_chosen,
                                                     const at::Tensor& grad_rejected,
                                                     c10::string_view reduction) {
  return run_loss_backward(grad_loss, grad_chosen, grad_rejected, reduction, [&](auto scalar, const auto& scale,
                                                                                 const at::Tensor& gc,
                                                                                 const at::Tensor& gr,
                                                                                 at::Tensor& out_c,
                                                                                 at::Tensor& out_r) {
    using scalar_t = typename decltype(scalar)::type;
    using T = at::opmath_type<scalar_t>;
    const int64_t batch = gc.size(0);
    const int64_t n = gc.size(1);
    const bool uniform = uniform_scale(scale, batch);
    // A multiplication per value, bound by memory: 2^14 values a task (a few us). At B = 4096,
    // N = 10, two tasks on two threads took it from 0.021 to 0.011 ms; a grain of 2^20 values, as
    // before, kept it on one.
    const int64_t grain = std::max<int64_t>(1, (kMinTaskWork / 8) / n);
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      scale_rows<scalar_t, T>(scale, uniform, n, begin, end, gc.const_data_ptr<scalar_t>(),
                              gr.const_data_ptr<scalar_t>(), out_c.mutable_data_ptr<scalar_t>(),
                              out_r.mutable_data_ptr<scalar_t>());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minqr, CPU, m) {
  m.impl("paper_loss", &paper_loss_cpu);
  m.impl("mixture_loss", &mixture_loss_cpu);
  m.impl("independent_loss", &independent_loss_cpu);
  m.impl("loss_backward", &loss_backward_cpu);
}

}  // namespace minqr
