// The per-pair math of the quantile-Huber + pairwise loss, written once for the CPU loop
// (qr_loss_cpu.cpp) and the CUDA kernel (qr_loss_cuda.cu). It mirrors
// minqr/loss.py:qr_pairwise_loss_reference, which is the formula as ../shared/DESIGN.md states it:
//
//   d = μ_c − μ_r                      L_pair = softplus(−d)
//   u_ij = (q_r[j] + m) − q_c[i]       v_ij = (q_c[j] − m) − q_r[i]      (targets detached)
//   ρ_τ(u) = |τ − 1{u<0}| · H_κ(u)/κ    L_qr = ½ · (1/N) · Σ_ij [ρ_τi(u_ij) + ρ_τi(v_ij)]
//   L = L_pair + λ·L_qr
//   ∂L/∂q_c[i] = −σ(−d)/N + λ·½·(1/N)·Σ_j −|τ_i − 1{u_ij<0}|·clip(u_ij, −κ, κ)/κ
//   ∂L/∂q_r[i] = +σ(−d)/N + λ·½·(1/N)·Σ_j −|τ_i − 1{v_ij<0}|·clip(v_ij, −κ, κ)/κ
//
// T is the accumulation type: float for float16/bfloat16/float32 inputs, double for float64.
// Only plain arithmetic, comparisons and <cmath> calls appear here, so the header compiles for
// the host without CUDA, and the element functions vectorise inside `#pragma omp simd` loops.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MINQR_HD __host__ __device__ __forceinline__
#else
#define MINQR_HD inline
#endif

namespace minqr {

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

// e = exp(−|d|) ∈ (0, 1], shared by the two functions below: one exp per pair serves the loss
// and the gradient. Per-pair libm calls dominate at small N (sharing this one took the CPU kernel
// from 88 to 59 us at B=4096, N=1 on one core).
template <typename T>
MINQR_HD T exp_neg_abs(T d) {
  using std::exp;
  using std::fabs;
  return exp(-fabs(d));
}

// softplus(−d) = −log σ(d) = max(−d, 0) + log1p(e), the pairwise (Bradley–Terry) loss, without
// overflow for any d.
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

// The per-pair constants. κ is factored out of every ρ and every clip/κ: the inner loops sum
// w·H and w·clip, and qr_scale = λ·½·(1/N)·(1/κ) is applied once per pair.
template <typename T>
struct LossConstants {
  T kappa, margin, inv_n, qr_scale;
  LossConstants(double kappa_, double lam, double margin_, int64_t n)
      : kappa(T(kappa_)),
        margin(T(margin_)),
        inv_n(T(1) / T(n)),
        qr_scale(T(lam * 0.5 / (double(n) * kappa_))) {}
};

// L = softplus(−d) + λ·L_qr, given e = exp(−|d|) and rho_sum = Σ_ij w·H over both sides.
template <typename T>
MINQR_HD T pair_loss(T d, T e, T rho_sum, const LossConstants<T>& k) {
  return softplus_neg(d, e) + k.qr_scale * rho_sum;
}

// ∂L/∂q[i] for one quantile, given side_sign = −1 (chosen) or +1 (rejected), s = σ(−d), and
// grad_sum = Σ_j −w·clip for that quantile's row.
template <typename T>
MINQR_HD T quantile_grad(T side_sign, T s, T grad_sum, const LossConstants<T>& k) {
  return side_sign * s * k.inv_n + k.qr_scale * grad_sum;
}

}  // namespace minqr
