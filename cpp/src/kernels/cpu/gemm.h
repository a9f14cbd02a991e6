// CPU GEMM kernels behind a small interface, so that Linear picks one at load time and faster
// kernels (AVX512-VNNI, AVX2) or other backends can slot in without touching the layers.
//
// All kernels compute y[M, N] = x[M, K] W[N, K]^T (+ bias) (+ activation), W in the nn.Linear
// layout, row-major and contiguous. Callers validate shapes; kernels assume valid input.
#pragma once
#include <cstdint>
#include <vector>

#include "finequant/quant.h"
#include "finequant/tensor.h"

namespace finequant {
namespace kernels {

// Activation fused into the GEMM epilogue.
enum class Epilogue { None, GeluErf, GeluTanh };

float apply_epilogue(Epilogue e, float v);

// ---- floating point ---------------------------------------------------------------------------
using GemmF32Fn = void (*)(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N,
                           int64_t K, Epilogue epilogue);
void gemm_f32_ref(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                  Epilogue epilogue);
GemmF32Fn select_gemm_f32();

// ---- integer (W8/W4 x A8/A4) ------------------------------------------------------------------
// The weight as the reference kernel wants it, prepared once at load from the file's canonical
// layout: INT4 unpacked to one value per byte, per-block column sums precomputed.
struct IntWeight {
  Tensor q;           // I8 (symmetric) or U8 (asymmetric) [N, K], one value per element
  Tensor scale;       // F32 [N / tile_rows, num_blocks]
  Tensor zero_point;  // U8 like scale; undefined when symmetric
  int64_t N = 0, K = 0;
  int64_t tile_rows = 1, tile_cols = 0;  // tile_cols = K-block length (== K when not blocked)
  int64_t num_blocks = 1;
  std::vector<int32_t> colsum;  // [N, num_blocks]: sum_k q[n, k] over each K-block
};

// Builds an IntWeight from unpacked integers + scales (+ zero points); computes the column sums.
IntWeight prepare_int_weight(Tensor q, Tensor scale, Tensor zero_point, int64_t tile_rows, int64_t tile_cols);

// x: the activation rows quantized with quantize_rows semantics (one scale / zero point per row).
using GemmIntFn = void (*)(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                           Epilogue epilogue);
// Reference: int32 accumulation per K-block, fused dequantization epilogue
//   y = sum_blocks sx sw (acc - zx colsum_w - zw rowsum_x + Kb zx zw) + b.
void gemm_int_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);
GemmIntFn select_gemm_int();

}  // namespace kernels
}  // namespace finequant
