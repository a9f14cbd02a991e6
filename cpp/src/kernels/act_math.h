// Activation functions of the GEMM epilogues, written as plain fp32 operation sequences so that
// the scalar form here, the AVX-512 form (kernels/cpu/act_math_avx512.h) and the CUDA epilogues
// (the same operations in the same order, no FMA contraction: -ffp-contract=off on the CPU files,
// -fmad=false on the CUDA integer-GEMM files) give bit-identical results. std::erf / std::tanh would
// not: their vector and device counterparts round differently. Host and device code (FQ_HD).
//   exp: Cephes expf (range reduction by ln 2, degree-6 polynomial), relative error ~2e-7.
//   erf: Abramowitz & Stegun 7.1.26 (as PyTorch's vectorized erf), absolute error <= 1.5e-7.
//   tanh(u) = 1 - 2 / (exp(2u) + 1).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace finequant {
namespace kernels {
namespace actmath {


// Always inlined: callers are vectorized loops (a call stops vectorization).
#if defined(__CUDACC__)
#define FQ_ALWAYS_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FQ_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FQ_ALWAYS_INLINE inline
#endif

// Round half to even, |x|, copysign and the float with given bits, on the host and the device.
FQ_ALWAYS_INLINE float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
FQ_ALWAYS_INLINE float abs(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}
FQ_ALWAYS_INLINE float copy_sign(float magnitude, float sign) {
#if defined(__CUDA_ARCH__)
  return copysignf(magnitude, sign);
#else
  return std::copysign(magnitude, sign);
#endif
}
FQ_ALWAYS_INLINE float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

constexpr float kExpHi = 88.3f, kExpLo = -87.3f;  // 2^n stays a normal float
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;
// erf's rational approximation on [0, 4] (Eigen's and XLA's float erf): x * P(x^2) / Q(x^2).
constexpr float kErfP0 = -1.60960333262415e-02f, kErfP1 = -2.95459980854025e-03f, kErfP2 = -7.34990630326855e-04f,
                kErfP3 = -5.69250639462346e-05f, kErfP4 = -2.10102402082508e-06f, kErfP5 = 2.77068142495902e-08f,
                kErfP6 = -2.72614225801306e-10f;
constexpr float kErfQ0 = -1.42647390514189e-02f, kErfQ1 = -7.37332916720468e-03f, kErfQ2 = -1.68282697438203e-03f,
                kErfQ3 = -2.13374055278905e-04f, kErfQ4 = -1.45660718464996e-05f;
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f, kGeluTanhC = 0.044715f;

FQ_ALWAYS_INLINE float exp(float x) {
  // Ternaries, not std::fmin/fmax: those compile to library calls that stop vectorization.
  x = x < kExpLo ? kExpLo : x;
  x = x > kExpHi ? kExpHi : x;
  const float n = round_even(x * kLog2e);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  p = p * (r * r) + r;
  p = p + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * float_from_bits(bits);
}

// erf saturates: every |x| >= 4 gives exactly 1.0f (the true erf(4) = 1 - 1.5e-8 rounds to it), and
// the clamp keeps the polynomials' powers of x finite.
constexpr float kErfSaturate = 4.0f;

// erf(ax) for ax in [0, 4]: a rational function, no exp: max abs error 4.2e-7 on [0, 4] (relative
// 2.3e-7 near 0, where A&S 7.1.26's 1 - p * exp(-x^2) cancels to 1.7%), and in a GeLU epilogue half
// the instructions, in two independent chains (docs/DESIGN.md section 2). It rises to 1 + 4e-7 near 4:
// capped at 1.0f (NaN passes the comparison unchanged).
FQ_ALWAYS_INLINE float erf_of_abs(float ax) {
  const float x2 = ax * ax;
  float p = kErfP6;
  p = p * x2 + kErfP5;
  p = p * x2 + kErfP4;
  p = p * x2 + kErfP3;
  p = p * x2 + kErfP2;
  p = p * x2 + kErfP1;
  p = p * x2 + kErfP0;
  p = p * ax;
  float q = kErfQ4;
  q = q * x2 + kErfQ3;
  q = q * x2 + kErfQ2;
  q = q * x2 + kErfQ1;
  q = q * x2 + kErfQ0;
  const float r = p / q;
  return r > 1.0f ? 1.0f : r;
}

FQ_ALWAYS_INLINE float erf(float x) {
  float ax = abs(x);
  ax = ax > kErfSaturate ? kErfSaturate : ax;  // NaN stays NaN
  return copy_sign(erf_of_abs(ax), x);
}

FQ_ALWAYS_INLINE float gelu_erf(float v) { return 0.5f * v * (1.0f + erf(v * kSqrt1_2)); }

// tanh(u) = 1 - 2 / (exp(2u) + 1) is exactly -1.0f for u <= -10 (exp(2u) + 1 rounds to 1) and
// 1.0f for u >= 10 (2 / (exp(2u) + 1) < 2^-25); clamped there, 2 / (exp(2u) + 1) never goes
// denormal (exp saturates at 2^127), with the same results (see erf).
constexpr float kTanhSaturate = 10.0f;

FQ_ALWAYS_INLINE float gelu_tanh(float v) {
  float u = kSqrt2OverPi * (v + kGeluTanhC * (v * v * v));
  u = u > kTanhSaturate ? kTanhSaturate : (u < -kTanhSaturate ? -kTanhSaturate : u);  // NaN stays NaN
  const float th = 1.0f - 2.0f / (exp(2.0f * u) + 1.0f);
  return 0.5f * v * (1.0f + th);
}

}  // namespace actmath
}  // namespace kernels
}  // namespace finequant
