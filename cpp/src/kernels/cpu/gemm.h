// CPU GEMM kernels behind a small interface, so that Linear picks one at load time and faster
// kernels (AVX512-VNNI) or other backends slot in without touching the layers.
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

// The input rows of a GEMM: stored F32 rows, or rows a fused producer (LayerNorm / RMSNorm)
// computes on demand, so the integer kernel quantizes each row straight from L1 and the producer's
// F32 output is never written to memory.
struct RowSource {
  int64_t rows = 0, cols = 0;
  // Row m: a pointer into stored data, or `scratch` (cols floats) after computing it there.
  virtual const float* row(int64_t m, float* scratch) const = 0;
  // All rows as one [rows, cols] F32 tensor (stored rows are borrowed, computed ones filled in).
  virtual Tensor materialize() const;
  virtual ~RowSource() = default;
};

struct StoredRows final : RowSource {
  const float* data;
  StoredRows(const float* d, int64_t m, int64_t k) : data(d) { rows = m; cols = k; }
  const float* row(int64_t m, float*) const override { return data + m * cols; }
  Tensor materialize() const override;
};

// Activation fused into the GEMM epilogue (kernels/cpu/act_math.h: identical on every ISA).
enum class Epilogue { None, GeluErf, GeluTanh };

float apply_epilogue(Epilogue e, float v);

// ---- floating point ---------------------------------------------------------------------------
// An F32 weight prepared once at load: row-major for the reference kernel, or (when the AVX-512
// kernel is active) only its packed layout, tiles of 64 output channels: packed[(tile * K + k) * 64
// + j] = W[tile * 64 + j, k], N padded with zero channels.
struct F32Weight {
  Tensor w;  // [N, K]; undefined once packed
  int64_t N = 0, K = 0;
  std::vector<float> packed;
};
F32Weight prepare_f32_weight(Tensor w);

using GemmF32Fn = void (*)(const float* x, int64_t M, const F32Weight& w, const float* bias, float* y,
                           Epilogue epilogue);
void gemm_f32_ref(const float* x, int64_t M, const F32Weight& w, const float* bias, float* y, Epilogue epilogue);
// AVX-512 register-tiled kernel (6 rows x 64 channels, FMA); needs the packed layout.
void gemm_f32_avx512(const float* x, int64_t M, const F32Weight& w, const float* bias, float* y, Epilogue epilogue);
GemmF32Fn select_gemm_f32();

// ---- integer (W8/W4 x A8/A4) ------------------------------------------------------------------
// An integer weight, prepared once at load from the file's canonical layout: the unpacked integers
// and column sums (what the reference kernel reads) plus, when the VNNI kernel is active, its own
// blocked layout. `act` is how this GEMM quantizes its input rows (token-wise, DESIGN section 2).
struct IntWeight {
  Tensor q;           // I8 (symmetric) or U8 (asymmetric) [N, K], one value per element
  Tensor scale;       // F32 [N / tile_rows, num_blocks]
  Tensor zero_point;  // U8 like scale; undefined when symmetric
  int bits = 8;       // 8 or 4 (the range of q)
  QuantSpec act;      // activation quantization
  int64_t N = 0, K = 0;
  int64_t tile_rows = 1, tile_cols = 0;  // tile_cols = K-block length (== K when not blocked)
  int64_t num_blocks = 1;
  std::vector<int32_t> colsum;  // [N, num_blocks]: sum_k q[n, k] over each K-block

  // AVX512-VNNI layout (prepare_int_weight_avx512vnni; empty otherwise). vpdpbusd multiplies u8 by
  // s8: symmetric activations (s8) take the u8 side's other operand, so the weight is stored as
  // u8; asymmetric activations (u8) get an s8 weight. Either way the stored value is q + wc (wc a
  // constant that moves q into the operand's range: 128 for I8 weights against s8 activations,
  // -128 for U8 weights against u8 activations, 8 for signed INT4, else 0), undone exactly in the
  // epilogue through the activation row sums.
  // Tiles of 64 output channels (4 panels of 16, one micro-kernel), N padded to a multiple of 64.
  // Each K-block is padded with zeros to a multiple of 8 (block_padded), Kp = padded total K. A
  // tile is one contiguous stream (separate panel streams alias in L1 when Kp * 16 is a multiple
  // of 4 KiB); with j = channel % 64:
  //   8-bit: packed[(tile * Kp/4 + k/4) * 256 + j * 4 + k%4]
  //   4-bit: packed[(tile * Kp/8 + k/8) * 256 + j * 4 + k%4], k%8 < 4 in the low nibble, else high.
  // Per-column tables are indexed [block * Npad + n], zero for padding channels.
  struct Vnni {
    bool ready = false;
    int32_t wc = 0;
    int64_t Kp = 0, Npad = 0, block_padded = 0;
    std::vector<uint8_t> packed;
    std::vector<float> scale;            // sw of the column's tile
    std::vector<int32_t> zw_plus_wc;     // zw + wc (asymmetric weights only)
    std::vector<int32_t> colsum_minus;   // colsum - kb * zw (asymmetric activations only)
  } vnni;

  // AVX2 layout (prepare_int_weight_avx2): tiles of 16 channels, the stored bytes of q by pairs of
  // k (K-blocks padded to even lengths, Kp = padded total K):
  //   packed[(tile * Kp + k - k%2) * 16 + (channel % 16) * 2 + k%2]
  struct Avx2 {
    bool ready = false;
    int64_t Kp = 0, block_padded = 0;
    std::vector<uint8_t> packed;
  } avx2;
};

// Builds an IntWeight from unpacked integers + scales (+ zero points); computes the column sums
// and, when active_isa() is Avx512Vnni, the VNNI layout.
IntWeight prepare_int_weight(Tensor q, Tensor scale, Tensor zero_point, int64_t tile_rows, int64_t tile_cols,
                             int bits, QuantSpec act);

// The integer GEMM of a quantized Linear: x's F32 rows [M, K] are quantized token-wise (w.act) inside,
// then y = sum_blocks sx sw (acc - zx colsum_w - zw rowsum_x + Kb zx zw) + b, then the activation.
using GemmIntFn = void (*)(const RowSource& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);
// Reference: quantize_rows, then gemm_int_quantized_ref.
void gemm_int_ref(const RowSource& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);
// The reference loops on already-quantized rows (quantize_rows semantics): int32 per K-block,
// exact int64 correction, fp32 epilogue in a fixed order that every kernel reproduces.
void gemm_int_quantized_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                            Epilogue epilogue);
// Picks the fastest kernel this CPU supports (see active_isa()).
GemmIntFn select_gemm_int();

// ---- instruction-set dispatch -----------------------------------------------------------------
enum class Isa { Auto, Ref, Avx2, Avx512Vnni };
// Auto: the best ISA the CPU supports, or the one the environment variable FINEQUANT_ISA names
// ("ref", "avx2", "avx512vnni"). force_isa overrides both (tests, benchmarks); an ISA the CPU lacks
// falls back to the next lower one. Weights prepared under one ISA keep working under another
// (kernels fall back to the reference). Only the integer GEMM has an AVX2 kernel; FP32 GEMM and
// attention use their portable (auto-vectorized) forms below AVX512-VNNI.
void force_isa(Isa isa);
Isa active_isa();
const char* isa_name(Isa isa);
bool cpu_has_avx512vnni();  // avx512f + avx512bw + avx512dq + avx512vl + avx512vnni
bool cpu_has_avx2();

// AVX2 kernel (vpmaddwd on widened bytes, exact), bit-identical to the reference. Falls back to
// gemm_int_ref for a weight without the AVX2 layout.
void prepare_int_weight_avx2(IntWeight& w);
void gemm_int_avx2(const RowSource& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);

// AVX512-VNNI kernel: quantizes the rows straight into its layout (the same values as
// quantize_rows), identical int32 sums and the same fp32 epilogue order as the reference, so the
// outputs are bit-identical. Falls back to gemm_int_ref for a weight without the VNNI layout.
void prepare_int_weight_avx512vnni(IntWeight& w);
void gemm_int_avx512vnni(const RowSource& x, const IntWeight& w, const float* bias, float* y, Epilogue epilogue);

// Throughput of a register-resident vpdpbusd loop on `threads` threads for about `seconds`:
// the machine's INT8 peak in GOPS (2 ops per multiply-add), 0 without VNNI.
double int8_peak_gops(int threads, double seconds);

}  // namespace kernels
}  // namespace finequant
