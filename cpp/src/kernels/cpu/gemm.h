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

  // AVX512-VNNI layout (filled by prepare_int_weight_avx512vnni; empty otherwise). The weight is
  // stored as s8 w' = q - wshift (wshift = 128 for U8 weights, 0 for I8), in panels of 16 output
  // channels x 4 consecutive k (64 bytes = one zmm per k4 step): packed[(panel * Kp4 + k4) * 64 +
  // j * 4 + t]. Each K-block is padded with zeros to a multiple of 4 (Kp = padded total length),
  // N is padded with zero channels to Npad (a multiple of 16). The per-column tables are indexed
  // [block * Npad + n] and hold zeros for the padding channels.
  struct Vnni {
    bool ready = false;
    int32_t wshift = 0;
    int64_t Kp = 0, Npad = 0, block_padded = 0;  // block_padded: a full K-block's padded length
    std::vector<int8_t> packed;
    std::vector<int32_t> colsum_shifted;  // sum_k w'[n, k] over the block
    std::vector<int32_t> colsum;          // sum_k q[n, k] over the block (== IntWeight::colsum)
    std::vector<int32_t> zero_point;      // zw of the column's tile (0 when symmetric)
    std::vector<float> scale;             // sw of the column's tile
  } vnni;
};

// Builds an IntWeight from unpacked integers + scales (+ zero points); computes the column sums.
IntWeight prepare_int_weight(Tensor q, Tensor scale, Tensor zero_point, int64_t tile_rows, int64_t tile_cols);

// x: the activation rows quantized with quantize_rows semantics (one scale / zero point per row).
using GemmIntFn = void (*)(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                           Epilogue epilogue);
// Reference: int32 accumulation per K-block, fused dequantization epilogue
//   y = sum_blocks sx sw (acc - zx colsum_w - zw rowsum_x + Kb zx zw) + b.
void gemm_int_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);
// Picks the fastest kernel this CPU supports (see active_isa()). Call after prepare_int_weight,
// which also builds the layout the chosen kernel needs.
GemmIntFn select_gemm_int();

// ---- instruction-set dispatch -----------------------------------------------------------------
enum class Isa { Auto, Ref, Avx512Vnni };
// Auto: the environment variable FINEQUANT_ISA ("ref" forces the reference kernels, "avx512vnni"
// asks for VNNI). For now Auto without FINEQUANT_ISA=avx512vnni means Ref: the VNNI kernel has not
// yet run on AVX-512 hardware (the build machine lacks AVX-512); once test_gemm_vnni passes there,
// make Auto pick the best ISA the CPU supports. force_isa overrides the environment (tests); an
// ISA the CPU lacks falls back to Ref.
void force_isa(Isa isa);
Isa active_isa();
bool cpu_has_avx512vnni();  // avx512f + avx512bw + avx512vl + avx512vnni

// AVX512-VNNI kernel: identical int32 sums and the same fp32 epilogue order as gemm_int_ref, so the
// outputs are bit-identical. Needs prepare_int_weight_avx512vnni(w) (done by prepare_int_weight
// when active_isa() is Avx512Vnni); falls back to gemm_int_ref for a weight without that layout or
// on a CPU without VNNI.
void prepare_int_weight_avx512vnni(IntWeight& w);
void gemm_int_avx512vnni(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                         Epilogue epilogue);

}  // namespace kernels
}  // namespace finequant
