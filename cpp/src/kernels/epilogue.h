// The integer GEMM epilogue of the math contract (docs/DESIGN.md section 2), shared by every
// backend: the CPU kernels and the CUDA kernels (host and device code) apply the same operations in
// the same order, so their outputs are bit-identical for the same integer sums.
//
// Per K-block b of row m and channel n (one block when the weight is not K-blocked):
//   corrected = sum_k (x[m,k] - zx[m]) (w[n,k] - zw[n,b])        exact integer
//   out       = out + (sx[m] * sw[n,b]) * float(corrected)        fp32, out starts at 0, blocks in order
// then y = act(out + bias[n]). Files that compute it are built without FMA contraction.
#pragma once
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

// out + (sx * sw) * float(corrected): one block's contribution, in the reference's order.
FQ_ALWAYS_INLINE float accumulate_block(float out, float sx, float sw, int32_t corrected) {
  return out + sx * sw * static_cast<float>(corrected);
}

// act(out + bias) with bias optional (has_bias false: out unchanged before the activation).
FQ_ALWAYS_INLINE float finish_output(float out, bool has_bias, float bias, Epilogue e) {
  if (has_bias) out = out + bias;
  return apply_epilogue(e, out);
}

}  // namespace kernels
}  // namespace finequant
