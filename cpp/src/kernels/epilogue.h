// The integer GEMM epilogue of the math contract (docs/DESIGN.md section 2), shared by every
// backend: the CPU kernels and the CUDA kernels (host and device code) apply the same operations in
// the same order, so their outputs are bit-identical for the same integer sums.
//
// Per K-block b of row m and channel n (one block when the weight is not K-blocked):
//   corrected = sum_k (x[m,k] - zx[m]) (w[n,k] - zw[n,b])        exact integer
//   sum       = 0; for b in order: sum = fma(sw[n,b], float(corrected), sum)   fp32, one rounding a block
//   out       = sx[m] * sum
// then y = act(out + bias[n]). Files that compute it are built without FMA contraction (the one fused
// multiply-add is explicit).
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/act_math.h"

namespace finequant {
namespace kernels {

// Activation fused into a GEMM epilogue.
enum class Epilogue : int { None = 0, GeluErf = 1, GeluTanh = 2 };

FQ_ALWAYS_INLINE float apply_epilogue(Epilogue e, float v) {
  if (e == Epilogue::GeluErf) return actmath::gelu_erf(v);
  if (e == Epilogue::GeluTanh) return actmath::gelu_tanh(v);
  return v;
}

// One K-block's correction from a dot product of shifted operands (x' = x - cx, w' = w - cw for
// constants cx, cw; zx' = zx - cx, zw' = zw - cw): with rs = sum_k x', and the column term
// cm = sum_k w' - kb zw' precomputed per channel,
//   sum_k (x' - zx')(w' - zw') = acc - zx' cm - zw' rs.
// Wrap-around int32 arithmetic: the true value fits int32 (|(x - zx)(w - zw)| <= 255^2 per term,
// blocks up to ~33000 long), so the wrapped intermediate terms cancel exactly.
FQ_ALWAYS_INLINE int32_t correct_block(int32_t acc, int32_t zx, int32_t cm, int32_t zw, int32_t rs) {
  return static_cast<int32_t>(static_cast<uint32_t>(acc) - static_cast<uint32_t>(zx) * static_cast<uint32_t>(cm) -
                              static_cast<uint32_t>(zw) * static_cast<uint32_t>(rs));
}

// sum + sw * float(corrected) rounded once: one block's contribution to the sum over blocks (which
// starts at +0). sx stays out of the per-block step, so that a CPU kernel spends one vector FMA on it
// per 16 outputs and block (DESIGN.md section 2).
FQ_ALWAYS_INLINE float accumulate_block(float sum, float sw, int32_t corrected) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(sw, static_cast<float>(corrected), sum);
#else
  return std::fma(sw, static_cast<float>(corrected), sum);
#endif
}

// The row's dequantized output from its sum over blocks.
FQ_ALWAYS_INLINE float dequantize_sum(float sx, float sum) { return sx * sum; }

// act(out + bias) with bias optional (has_bias false: out unchanged before the activation).
FQ_ALWAYS_INLINE float finish_output(float out, bool has_bias, float bias, Epilogue e) {
  if (has_bias) out = out + bias;
  return apply_epilogue(e, out);
}

}  // namespace kernels
}  // namespace finequant
