// AVX-512 forms of kernels/act_math.h: the same fp32 operations in the same order, so the
// vectorized GEMM epilogues round exactly like the reference (files including this are compiled
// with -ffp-contract=off where bit-identity matters).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 false positives inside the intrinsics (_mm512_undefined_* initialise themselves).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "kernels/act_math.h"
#include "kernels/cpu/gemm.h"

#define FQ_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

namespace finequant {
namespace kernels {
namespace {

FQ_VNNI inline __m512 exp_v(__m512 x) {
  using namespace actmath;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpP1));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpP2));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpP3));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpP4));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpP5));
  p = _mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

FQ_VNNI inline __m512 erf_v(__m512 x) {
  using namespace actmath;
  const __m512 sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_min_ps(_mm512_set1_ps(kErfSaturate), _mm512_andnot_ps(sign, x));  // NaN: the 2nd operand
  const __m512 x2 = _mm512_mul_ps(ax, ax);
  __m512 p = _mm512_set1_ps(kErfP6);
  for (const float c : {kErfP5, kErfP4, kErfP3, kErfP2, kErfP1, kErfP0})
    p = _mm512_add_ps(_mm512_mul_ps(p, x2), _mm512_set1_ps(c));
  p = _mm512_mul_ps(p, ax);
  __m512 q = _mm512_set1_ps(kErfQ4);
  for (const float c : {kErfQ3, kErfQ2, kErfQ1, kErfQ0}) q = _mm512_add_ps(_mm512_mul_ps(q, x2), _mm512_set1_ps(c));
  const __m512 y = _mm512_min_ps(one, _mm512_div_ps(p, q));  // NaN: the 2nd operand
  return _mm512_or_ps(_mm512_andnot_ps(sign, y), _mm512_and_ps(sign, x));  // copysign(y, x)
}

FQ_VNNI inline __m512 activation_v(Epilogue e, __m512 v) {
  using namespace actmath;
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  if (e == Epilogue::GeluErf)
    return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, erf_v(_mm512_mul_ps(v, _mm512_set1_ps(kSqrt1_2)))));
  if (e == Epilogue::GeluTanh) {
    const __m512 two = _mm512_set1_ps(2.0f);
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi), _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(kGeluTanhC), cube)));
    u = _mm512_min_ps(_mm512_set1_ps(kTanhSaturate), _mm512_max_ps(_mm512_set1_ps(-kTanhSaturate), u));  // NaN: the 2nd operand
    const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp_v(_mm512_mul_ps(two, u)), one)));
    return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, th));
  }
  return v;
}

// y[0, cols) = act(out + bias[0, cols)) for cols <= 16 (bias optional): the store of the AVX-512
// GEMM kernels' outputs (finish_output's operations).
FQ_VNNI inline void store_activated(float* y, const float* bias, int64_t cols, __m512 out, Epilogue e) {
  const __mmask16 mask = cols >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << cols) - 1);
  if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(y, mask, activation_v(e, out));
}

}  // namespace
}  // namespace kernels
}  // namespace finequant
#endif
