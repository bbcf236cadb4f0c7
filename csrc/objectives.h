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
#ifndef __CUDA_ARCH__
#include <bit>
#endif

// Always inlined: a call left inside an `omp simd` loop stops it vectorising, and GCC's size
// heuristics would leave simd_exp_neg_abs out of line.
#ifdef __CUDACC__
#define MINQR_HD __host__ __device__ __forceinline__
#else
#define MINQR_HD inline __attribute__((always_inline))
#endif

// The polynomial loops below unrolled before GCC's vectoriser sees them (a loop inside the
// `omp simd` loop would stop it); nvcc's front end knows no GCC pragma, and uses the device
// functions there.
#ifdef __CUDACC__
#define MINQR_UNROLL
#else
#define MINQR_UNROLL _Pragma("GCC unroll 16")
#endif

namespace minqr {

// ---------------------------------------------------------------------------------------------
// Elementary functions that vectorise.
//
// libm's exp and log are calls that GCC does not vectorise without -ffast-math, and mixture and
// independent evaluate one exp per difference (B·N and B·N² of them): as scalar calls they cost
// more than the whole PyTorch reference. These are exp and log in plain arithmetic (range
// reduction, then a Taylor polynomial), on the domains the objectives need, accurate to a few
// units in the last place. On the GPU they are the CUDA library's functions. Bradley–Terry and
// paper keep libm's (exp_neg_abs, softplus_neg below): one call per pair, and the scalar head's
// numbers must not change.

namespace detail {

// 1/k!, k = 0 … K (exp's Taylor coefficients)
template <typename T, int K>
constexpr std::array<T, K + 1> reciprocal_factorials() {
  std::array<T, K + 1> c{};
  double factorial = 1.0;
  for (int k = 0; k <= K; ++k) {
    factorial *= k == 0 ? 1.0 : double(k);
    c[k] = T(1.0 / factorial);
  }
  return c;
}

// 2/(2j+1), j = 1 … J (atanh's series after its first term)
template <typename T, int J>
constexpr std::array<T, J> two_over_odds() {
  std::array<T, J> c{};
  for (int j = 1; j <= J; ++j) c[j - 1] = T(2.0 / double(2 * j + 1));
  return c;
}

// The float and double constants of simd_exp and simd_log.
template <typename T>
struct SimdMath;

template <>
struct SimdMath<float> {
  using Bits = uint32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kExponentBias = 127;
  static constexpr Bits kSqrtHalfBits = 0x3f3504f3;
  static constexpr float kExpRange = 87.0f;  // exp(−87) > 2^−126, the smallest normal float
  // ln 2 split so that n·kLn2Hi is exact for the |n| ≤ 127 that occur (Cody and Waite)
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
  // degree 7: |remainder| < 6e-9 for |r| ≤ ln2/2; up to s¹⁰: |remainder| < 2e-9 for |s| ≤ 0.172
  static constexpr auto kExp = reciprocal_factorials<float, 7>();
  static constexpr auto kLog = two_over_odds<float, 4>();
};

template <>
struct SimdMath<double> {
  using Bits = uint64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kExponentBias = 1023;
  static constexpr Bits kSqrtHalfBits = 0x3fe6a09e667f3bcd;
  static constexpr double kExpRange = 708.0;  // exp(−708) > 2^−1022
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;  // |n| ≤ 1022
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  // degree 13: |remainder| < 5e-18; up to s²⁴: |remainder| < 1e-18
  static constexpr auto kExp = reciprocal_factorials<double, 13>();
  static constexpr auto kLog = two_over_odds<double, 11>();
};

constexpr double kLog2e = 1.44269504088896338700e+00;

}  // namespace detail

// cond ? a : b, as bit masks on the host. GCC does not execute a floating-point operation (which
// may trap) that the source only reaches on one branch, and it sinks the computation of a
// select's arm into a branch of its own, or folds an arm and branches; either stops the loop from
// vectorising without AVX-512's masks. A select through integer masks leaves it nothing to move.
template <typename T>
MINQR_HD T select(bool cond, T a, T b) {
#ifdef __CUDA_ARCH__
  return cond ? a : b;
#else
  using Bits = typename detail::SimdMath<T>::Bits;
  const Bits mask = -Bits(cond);  // all ones, or 0
  return std::bit_cast<T>((std::bit_cast<Bits>(a) & mask) | (std::bit_cast<Bits>(b) & ~mask));
#endif
}

// exp(x) for |x| ≤ 87 (float) / 708 (double), where 2^n below stays a normal number: n =
// round(x / ln 2), r = x − n·ln 2, exp(x) = 2^n·exp(r). exp(0) is exactly 1.
template <typename T>
MINQR_HD T simd_exp(T x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  using M = detail::SimdMath<T>;
  using Bits = typename M::Bits;
  // Adding 1.5·2^mantissa rounds x·log2(e) to an integer (in the default rounding mode) and leaves
  // it in the low bits of t, where the scale 2^n is built from.
  constexpr T kRoundShift = T(1.5) * T(Bits(1) << M::kMantissaBits);
  const T t = x * T(detail::kLog2e) + kRoundShift;
  const T n = t - kRoundShift;
  const T r = (x - n * M::kLn2Hi) - n * M::kLn2Lo;  // |r| ≤ ln2/2
  T p = T(0);  // exp(r) = Σ_k r^k/k!, by Horner from the highest power
MINQR_UNROLL
  for (int k = int(M::kExp.size()) - 1; k >= 0; --k) p = p * r + M::kExp[k];
  const Bits n_bits = std::bit_cast<Bits>(t) - std::bit_cast<Bits>(kRoundShift);  // n, two's complement
  return p * std::bit_cast<T>((n_bits + M::kExponentBias) << M::kMantissaBits);
#endif
}

// exp(−|x|) for any x (NaN gives NaN). Results below 2^−125 (float) / 2^−1021 (double) are
// flushed to 0: they only ever weigh a term that is negligible next to the largest one.
template <typename T>
MINQR_HD T simd_exp_neg_abs(T x) {
#ifdef __CUDA_ARCH__
  return exp(-fabs(x));
#else
  using M = detail::SimdMath<T>;
  using Bits = typename M::Bits;
  constexpr Bits kAbsMask = ~Bits(0) >> 1;
  constexpr Bits kInfinityBits = std::bit_cast<Bits>(T(INFINITY));
  constexpr Bits kRangeBits = std::bit_cast<Bits>(M::kExpRange);
  // |x| clamped to the range by an integer minimum on its bits, the special cases settled by
  // masks (see select).
  const Bits magnitude = std::bit_cast<Bits>(x) & kAbsMask;
  const T result = simd_exp(-std::bit_cast<T>(std::min(magnitude, kRangeBits)));
  const Bits in_range = -Bits(magnitude <= kRangeBits);  // all ones, or 0 (also for ±inf)
  return select(magnitude > kInfinityBits, x, std::bit_cast<T>(std::bit_cast<Bits>(result) & in_range));
#endif
}

// log(x) for a positive normal x (NaN gives NaN): x = m·2^k with m ∈ [√½, √2), log x = k·ln2 +
// log m, and with f = m − 1, s = f/(2 + f), |s| ≤ 0.172: log m = 2·atanh(s) = 2s + R,
// R = Σ_j≥1 2s^(2j+1)/(2j+1). Since 2s = f − s·f, log m = f − s·(f − R/s): the exact f carries
// the leading digits.
template <typename T>
MINQR_HD T simd_log(T x) {
#ifdef __CUDA_ARCH__
  return log(x);
#else
  using M = detail::SimdMath<T>;
  using Bits = typename M::Bits;
  constexpr Bits kMantissaMask = (Bits(1) << M::kMantissaBits) - 1;
  constexpr Bits kBias = M::kExponentBias << M::kMantissaBits;
  constexpr T kTwoToMantissa = T(Bits(1) << M::kMantissaBits);
  // Subtracting √½'s bits moves the exponent's boundary to √½; k + bias ≥ 0 is in the high bits.
  const Bits shifted = std::bit_cast<Bits>(x) - M::kSqrtHalfBits;
  const T m = std::bit_cast<T>((shifted & kMantissaMask) + M::kSqrtHalfBits);
  // k as T through the bits of 2^mantissa + (k + bias): AVX2 cannot vectorise an int64-to-double
  // conversion.
  const Bits biased_k = (shifted + kBias) >> M::kMantissaBits;
  const T k = std::bit_cast<T>(biased_k | std::bit_cast<Bits>(kTwoToMantissa)) -
              (kTwoToMantissa + T(M::kExponentBias));
  const T f = m - T(1);
  const T s = f / (T(2) + f);
  const T z = s * s;
  T r_over_s = T(0);  // R/s = Σ_j≥1 2z^j/(2j+1), by Horner
MINQR_UNROLL
  for (int j = int(M::kLog.size()) - 1; j >= 0; --j) r_over_s = (r_over_s + M::kLog[j]) * z;
  const T log_m = f - s * (f - r_over_s);
  // + (x − x): 0 for finite x, NaN for NaN, which the bit manipulation above would have lost
  return k * M::kLn2Hi + (log_m + k * M::kLn2Lo) + (x - x);
#endif
}

// log(1 + e) for e ∈ [0, 1]: log(u) with u = 1 + e rounded, corrected by the rounding of u, so
// that a small e keeps its digits.
template <typename T>
MINQR_HD T simd_log1p(T e) {
#ifdef __CUDA_ARCH__
  return log1p(e);
#else
  const T u = T(1) + e;
  return simd_log(u) + (e - (u - T(1))) / u;
#endif
}

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
