// Elementary functions that vectorise: exp and log in plain arithmetic for the CPU kernels'
// `#pragma omp simd` loops (the CUDA library's functions on the GPU), and the select that keeps
// such a loop free of branches. The per-pair math of the objectives (objectives.h) uses them.
#pragma once

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
// paper keep libm's (exp_neg_abs, softplus_neg in objectives.h): one call per pair, and the scalar head's
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

}  // namespace minqr
