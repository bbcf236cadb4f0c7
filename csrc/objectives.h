// The per-pair math of every objective, written once for the CPU kernels (cpu/objectives_cpu.cpp)
// and the CUDA kernels (cuda/objectives_cuda.cu). Each objective mirrors its PyTorch reference in
// minqr/objectives/, which is the formula as docs/design.md#objectives states it; per pair, with outputs h_c,
// h_r of shape [N]:
//
//   bradley_terry (N = 1)  L = softplus(−d), d = h_c − h_r              ∂L/∂h_c = −σ(−d) = −∂L/∂h_r
//   mixture                L = −log((1/N) Σ_i σ(d_i)), d_i = h_c,i − h_r,i
//                          ∂L/∂h_c,i = −w_i σ(−d_i) = −∂L/∂h_r,i, w = softmax_i(log σ(d_i))
//   independent            L = −log((1/N²) Σ_ij σ(d_ij)), d_ij = h_c,i − h_r,j
//                          ∂L/∂h_c,i = −Σ_j w_ij σ(−d_ij), ∂L/∂h_r,j = +Σ_i w_ij σ(−d_ij)
//   paper                  L = softplus(−(μ_c − μ_r)) + λ·L_qr (the quantile-Huber term below)
//
// Each objective has a forward (its loss) and a backward (its gradient) function, named as twins.
// T is the accumulation type: float for float16/bfloat16/float32 inputs, double for float64.
// Only plain arithmetic, comparisons, bit casts and <cmath> calls appear here, so the header
// compiles for the host without CUDA, and the element functions vectorise inside `#pragma omp simd`
// loops.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "simd_math.h"

namespace minqr {

// ---------------------------------------------------------------------------------------------
// Bradley–Terry: the pairwise term of every objective, and the whole of each at N = 1.

// e = exp(−|d|) ∈ (0, 1], shared by the two functions below: one exp per pair serves the loss
// and the gradient. Per-pair libm calls dominate at small N (sharing this one took the CPU kernel
// from 88 to 59 us at B=4096, N=1 on one core).
template <typename T>
MINQR_HD T exp_neg_abs(T d) {
  using std::exp;
  using std::fabs;
  return exp(-fabs(d));
}

// softplus(−d) = −log σ(d) = max(−d, 0) + log1p(e), without overflow for any d.
template <typename T>
MINQR_HD T softplus_neg(T d, T e) {
  using std::log1p;
  return (d < T(0) ? -d : T(0)) + log1p(e);
}

// σ(−d) = −∂softplus(−d)/∂d: e/(1+e) for d ≥ 0, 1/(1+e) for d < 0.
template <typename T>
MINQR_HD T sigmoid_neg(T d, T e) {
  return (d < T(0) ? T(1) : e) / (T(1) + e);
}

// L = −log σ(d), given e = exp_neg_abs(d).
template <typename T>
MINQR_HD T bradley_terry_forward(T d, T e) {
  return softplus_neg(d, e);
}

// ∂L/∂h_c = −σ(−d) (and ∂L/∂h_r = +σ(−d)).
template <typename T>
MINQR_HD T bradley_terry_backward(T d, T e) {
  return -sigmoid_neg(d, e);
}

// ---------------------------------------------------------------------------------------------
// mixture and independent: the mean of σ over K differences d (mixture: K = N, d_i; independent:
// K = N², d_ij), and its gradient:
//
//   L = −log((1/K) Σ σ(d)),   ∂L/∂d = −w·σ(−d),  w = σ(d) / Σ σ(d),  so ∂L/∂d = −σ(d)σ(−d) / Σ σ(d)
//
// Direct, when every |d| ≤ sigmoid_direct_span (80 for float, 700 for double): from x = exp(−d),
// σ(d) = 1/(1+x) and σ(d)σ(−d) = x/(1+x)², and L = log K − log Σ σ(d). Nothing overflows, and
// Σ σ(d) ≥ σ(−80) is a normal number. The CPU kernels take this way for a block of pairs whose
// differences all lie in the span (independent gets exp(−d_ij) as a product of per-output
// factors then, and no exp per difference at all), the other way for the rest.
//
// Shifted, for any d: every σ(d) relative to σ(M), M the largest d of the pair: ratio =
// σ(d)/σ(M) ∈ (0, 1], so Σ ratio ∈ [1, K] never underflows, even when every σ(d) does (d = −300
// for all), and L = softplus(−M) − log Σ ratio + log K. One exp per difference, from
// E = exp(−|M|) (per pair):
//
//   M ≥ 0:  y = exp(−|d|):  σ(d) = p/(1+y),  p = d < 0 ? y : 1,   σ(M) = 1/(1+E)
//   M < 0:  y = exp(d − M)  (every d ≤ M < 0, and exp(d) = y·E):  σ(d) = y·E/(1 + y·E),
//           σ(M) = E/(1+E), and E cancels from the ratio.
//
// Both give ratio = p·(1+E)/(1+t) and σ(−d) = (d < 0 ? 1 : t)/(1+t) with t = exp(−|d|) and
// p = exp(min(d, 0) − min(M, 0)); nothing overflows, and y = 0 (a difference too far below M)
// gives ratio 0 and a finite σ(−d).

// The largest |d| for the direct way.
template <typename T>
constexpr T sigmoid_direct_span() {
  return std::is_same_v<T, float> ? T(80) : T(700);
}

// Direct: σ(d) (the forward's share) and q = σ(d)σ(−d) (the backward's, before the division by
// Σ σ), from x = exp(−d).
template <typename T>
MINQR_HD void sigmoid_direct_terms(T x, T& sigma, T& q) {
  const T inv = T(1) / (T(1) + x);
  sigma = inv;
  q = x * inv * inv;
}

// Direct: L = log K − log Σ σ(d).
template <typename T>
MINQR_HD T sigmoid_direct_forward(T sum_sigma, T log_count) {
  return log_count - simd_log(sum_sigma);
}

// Shifted: ratio = σ(d)/σ(M) and q = ratio·σ(−d) for one difference d ≤ M. E = exp(−|M|).
template <typename T>
MINQR_HD void sigmoid_shifted_terms(T d, T M, T E, T& ratio, T& q) {
  const bool negative = M < T(0);
  const T y = simd_exp_neg_abs(select(negative, d - M, d));  // d − M ≤ 0
  const T t = select(negative, y * E, y);
  const T p = select(negative, y, select(d < T(0), t, T(1)));
  const T inv = T(1) / (T(1) + t);
  ratio = p * (T(1) + E) * inv;
  q = ratio * (select(d < T(0), T(1), t) * inv);  // ratio · σ(−d)
}

// Shifted: L = softplus(−M) − log Σ ratio + log K.
template <typename T>
MINQR_HD T sigmoid_shifted_forward(T M, T E, T sum_ratio, T log_count) {
  return ((M < T(0) ? -M : T(0)) + simd_log1p(E)) - simd_log(sum_ratio) + log_count;
}

// Either way: ∂L/∂d = −q/Σ (Σ σ, or Σ ratio).
template <typename T>
MINQR_HD T sigmoid_mean_backward(T q, T inv_sum) {
  return -q * inv_sum;
}

// ---------------------------------------------------------------------------------------------
// paper: Bradley–Terry on the means plus the quantile-Huber term towards the partner (docs/design.md#paper-loss):
//
//   d = μ_c − μ_r                      L_pair = softplus(−d)
//   u_ij = (q_r[j] + m) − q_c[i]       v_ij = (q_c[j] − m) − q_r[i]      (targets detached)
//   ρ_τ(u) = |τ − 1{u<0}| · H_κ(u)/κ    L_qr = ½ · (1/N) · Σ_ij [ρ_τi(u_ij) + ρ_τi(v_ij)]
//   L = L_pair + λ·L_qr
//   ∂L/∂q_c[i] = −σ(−d)/N + λ·½·(1/N)·Σ_j −|τ_i − 1{u_ij<0}|·clip(u_ij, −κ, κ)/κ
//   ∂L/∂q_r[i] = +σ(−d)/N + λ·½·(1/N)·Σ_j −|τ_i − 1{v_ij<0}|·clip(v_ij, −κ, κ)/κ

// τ_i = (2i+1)/(2N): the midpoints of N equal probability bins (N=10: 0.05 … 0.95).
template <typename T>
MINQR_HD T quantile_level(int64_t i, int64_t n) {
  return T(2 * i + 1) / T(2 * n);
}

// |τ − 1{u<0}|: a target above the quantile (u ≥ 0) pulls it up with weight τ, one below
// pulls it down with weight 1 − τ. At u == 0 exactly the weight is τ, as the spec's 1{u<0} says.
// Both candidates are computed before the select: GCC will not speculate a floating-point
// operation (it may trap) out of a conditional branch, and without AVX-512 masks a branch in the
// loop body stops the loop from vectorising.
template <typename T>
MINQR_HD T quantile_weight(T u, T tau) {
  const T below = T(1) - tau;
  return u < T(0) ? below : tau;
}

// clip(u, −κ, κ): κ times the derivative of H_κ(u)/κ. Written as selects rather than fmin/fmax
// so that the host compiler vectorises it without -ffast-math, both comparisons unconditional
// (see quantile_weight); a NaN u passes through.
template <typename T>
MINQR_HD T huber_clip(T u, T kappa) {
  const bool below = u < -kappa;
  const bool above = u > kappa;
  return below ? -kappa : (above ? kappa : u);
}

// H_κ(u) from g = clip(u, −κ, κ): g·(u − g/2) is ½u² when |u| ≤ κ and κ(|u| − ½κ) outside,
// one branch-free formula for both pieces. It is even in u exactly (g and u flip sign together),
// which is what lets the CPU loop evaluate H once for u_ij and v_ji = −u_ij.
template <typename T>
MINQR_HD T huber(T u, T g) {
  return g * (u - T(0.5) * g);
}

// The per-pair constants. κ is factored out of every ρ and every clip/κ: the inner loops sum
// w·H and w·clip, and qr_scale = λ·½·(1/N)·(1/κ) is applied once per pair.
template <typename T>
struct PaperConstants {
  T kappa, margin, inv_n, qr_scale;
  PaperConstants(double kappa_, double lam, double margin_, int64_t n)
      : kappa(T(kappa_)),
        margin(T(margin_)),
        inv_n(T(1) / T(n)),
        qr_scale(T(lam * 0.5 / (double(n) * kappa_))) {}
};

// L = softplus(−d) + λ·L_qr, given e = exp(−|d|) and rho_sum = Σ_ij w·H over both sides.
template <typename T>
MINQR_HD T paper_forward(T d, T e, T rho_sum, const PaperConstants<T>& k) {
  return bradley_terry_forward(d, e) + k.qr_scale * rho_sum;
}

// ∂L/∂q[i] for one quantile, given side_sign = −1 (chosen) or +1 (rejected), s = σ(−d), and
// grad_sum = Σ_j −w·clip for that quantile's row.
template <typename T>
MINQR_HD T paper_backward(T side_sign, T s, T grad_sum, const PaperConstants<T>& k) {
  return side_sign * s * k.inv_n + k.qr_scale * grad_sum;
}

// ---------------------------------------------------------------------------------------------
// The reduction over pairs, backward

// How loss_backward scales pair b's saved gradients: by the gradient of the op's loss with respect
// to that pair's loss, the chain rule through the reduction, here because both backends use it.
// Without a reduction, that is grad_loss[b] (stride: grad_loss's); with a sum, the one value
// grad_loss[] for every pair (stride 0); with a mean, grad_loss[] / B, computed as ATen's
// MeanBackward computes it on each device (a division on the CPU, a product with the reciprocal
// 1/B rounded to T on CUDA), so that the gradients have the bits they would have through
// `losses.mean()` in Python.
template <typename T>
struct LossScale {
  const T* grad_loss;
  int64_t stride;
  T divisor;
  MINQR_HD T value(int64_t b) const {
#ifdef __CUDA_ARCH__
    return grad_loss[b * stride] * (T(1) / divisor);
#else
    return grad_loss[b * stride] / divisor;
#endif
  }
  MINQR_HD bool uniform() const { return stride == 0; }
};

}  // namespace minqr
