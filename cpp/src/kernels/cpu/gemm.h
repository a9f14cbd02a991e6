// CPU GEMM kernels: y[M, N] = x[M, K] W[N, K]^T (+ bias) (+ activation), W in the nn.Linear
// layout. Each ISA's kernel owns its packed weight layout (its own file) and registers one entry
// (registry.cc); the CPU backend prepares a weight with the best entry for the active level
// (cpu_isa.h) and the prepared weight runs itself.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "finequant/quant.h"
#include "finequant/tensor.h"
#include "kernels/backend.h"
#include "kernels/cpu/aligned_vector.h"
#include "kernels/cpu/cpu_isa.h"
#include "kernels/cpu/elementwise.h"

namespace finequant {
namespace kernels {

// One LayerNorm / RMSNorm row (norm.cc): y = normalized x, C = norm.C values.
void normalize_row(const NormParams& norm, const float* x, float* y);
// Every row of x [M, C] into y [M, C] (threaded when large).
void normalize_rows(const NormParams& norm, const float* x, int64_t M, float* y, ThreadPool& pool);

// The input rows of a CPU GEMM: stored F32 rows, normalized and then rotated on demand when `norm`
// or `rotation` is set (the fused producers of GemmInput), so that an integer kernel quantizes each
// row straight from L1.
struct RowInput {
  const float* x = nullptr;  // [rows, cols]
  int64_t rows = 0, cols = 0;
  const NormParams* norm = nullptr;
  RowRotation rotation = {};  // none unless its block is set (elementwise.h)

  // Row m: a pointer into x, or `scratch` (cols floats) holding the normalized and/or rotated row.
  const float* row(int64_t m, float* scratch) const {
    const float* r = x + m * cols;
    if (!norm && !rotation) return r;
    if (norm) {
      normalize_row(*norm, r, scratch);
      r = scratch;
    }
    if (rotation) rotation.apply(r, scratch, cols);
    return scratch;
  }
  // All rows as one [rows, cols] F32 tensor (stored rows are borrowed, the others computed).
  Tensor materialize(ThreadPool& pool) const;
};

template <class V>
MemorySpan span_of(const V& v) {
  return {v.data(), v.size() * sizeof(typename V::value_type)};
}

// A weight prepared for one CPU kernel; runs that kernel (bias and epilogue from PreparedLinear).
class CpuLinear : public PreparedLinear {
 public:
  virtual void run(const ExecContext& ctx, const RowInput& x, float* y) const = 0;
  // What a decode-sized call reads from memory, in order (the packed weight, then its tables): the
  // GEMV before it has the pool's idle threads prefetch these (ThreadPool::prefetch_when_idle).
  std::vector<MemorySpan> streamed;
};

// ---- integer (W8/W4 x A8/A4) ------------------------------------------------------------------
// The canonical integer weight every CPU integer kernel prepares from (and the reference reads):
// the unpacked integers, scales, zero points and column sums, and how the activations are
// quantized (token-wise, DESIGN section 2).
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
};
IntWeight make_int_weight(const QuantizedTensor& w, QuantSpec act, ThreadPool& pool);

// One channel's codes of one K-block (kb bytes at `codes`, I8 or U8 as stored) into the 32-bit words of
// the VNNI kernels' layouts, each byte code + wc (mod 256): 8-bit, 4 k per word; 4-bit, 8 k per word with
// k % 8 < 4 in the low nibbles. Word i goes to dst + i * stride, which must hold zeros where the block's
// last partial word lands. wc is 0 or +-128 (8-bit) or 0 or 8 (4-bit), so the add is a per-byte xor (per
// nibble for 4-bit: signed codes in [-8, 7] with wc 8, unsigned ones in [0, 15] with wc 0) and whole words go
// at once: the byte-at-a-time loop was most of a model's load (DESIGN 3).
inline void pack_vnni_words(const uint8_t* codes, int64_t kb, int bits, int32_t wc, uint8_t* dst, int64_t stride) {
  const uint32_t flip = (static_cast<uint32_t>(wc) & 0xffu) * 0x01010101u;
  const int64_t per_word = bits == 4 ? 8 : 4;
  const bool by_xor = bits == 4 ? (wc == 0 || wc == 8) : (wc & 0x7f) == 0;  // else all bytes one at a time
  int64_t k = 0, i = 0;
  for (; by_xor && k + per_word <= kb; k += per_word, ++i) {
    uint32_t word, hi;
    std::memcpy(&word, codes + k, 4);
    if (bits == 4) {
      std::memcpy(&hi, codes + k + 4, 4);
      word = ((word & 0x0f0f0f0fu) ^ flip) | (((hi & 0x0f0f0f0fu) ^ flip) << 4);
    } else {
      word ^= flip;
    }
    std::memcpy(dst + i * stride, &word, 4);
  }
  for (; k < kb; ++k) {  // the last partial word, a byte (or nibble) at a time
    const uint8_t stored = static_cast<uint8_t>(codes[k] + wc);
    uint8_t* at = dst + (k / per_word) * stride + k % 4;
    if (bits == 4) *at |= static_cast<uint8_t>((stored & 0x0f) << (k % 8 < 4 ? 0 : 4));
    else *at = stored;
  }
}

// Where a kernel wants its quantized activation rows: each K-block of bk values zero padded to
// block_padded bytes (the last block to the row's end), Kp padded positions per row; group_rows
// rows interleaved per 64-byte k-chunk (16: whole AMX A tiles, [m/16][kk/64][m%16][kk%64], with
// Kp a multiple of 64 and block_padded of 16; 1: plain rows, [m][kk]).
struct RowLayout {
  int64_t K = 0, nb = 1, bk = 0, block_padded = 0, Kp = 0, group_rows = 1;

  // Byte offset of padded position kk of row m: row_offset(m) + chunk_offset(kk).
  int64_t row_offset(int64_t m) const { return (m / group_rows) * group_rows * Kp + (m % group_rows) * 64; }
  int64_t chunk_offset(int64_t kk) const { return (kk >> 6) * 64 * group_rows + (kk & 63); }
};
// One call's quantized rows, in the caller's buffers: xp (rows x Kp bytes in the RowLayout; I8 or
// U8 values as stored), rowsum [rows, nb] (each block's sum of the values), sx [rows], zx [rows]
// (asymmetric only).
struct QuantizedRows {
  uint8_t* xp;
  int32_t* rowsum;
  float* sx;
  int32_t* zx;
};
// Buffers for QuantizedRows, reused across calls (thread_local in a kernel: no page faults per GEMM;
// worker threads must be handed the pointers, not the thread_local).
struct RowScratch {
  AlignedVector<uint8_t> xp;
  std::vector<int32_t> rowsum, zx;
  std::vector<float> sx;
  // Room for `rows` rows (a kernel may round rows up, e.g. to whole AMX tiles; the extra rows hold
  // stale bytes whose results are never stored).
  QuantizedRows resize(int64_t rows, const RowLayout& l) {
    xp.resize(static_cast<size_t>(rows * l.Kp));
    rowsum.resize(static_cast<size_t>(rows * l.nb));
    sx.resize(static_cast<size_t>(rows));
    zx.resize(static_cast<size_t>(rows));
    return {xp.data(), rowsum.data(), sx.data(), zx.data()};
  }
};
// The values of quantize_rows (token-wise, DESIGN section 2) written into `out` in layout `l`;
// rows of a fused producer are computed on the way. Throws on a row with NaN / Inf.
// Portable (quantize_rows, then laid out: the AVX-VNNI kernel and the emulated AMX one):
void quantize_rows_into(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                        ThreadPool& pool);
// AVX-512 (the AVX512-VNNI and AMX kernels): each row quantized straight from L1, in one pass.
void quantize_rows_into_avx512(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                               ThreadPool& pool);
// AVX2 (the AVX2 and AVX-VNNI kernels; plain rows, group_rows 1): 8 values a vector, with the
// reference's division (portable where the build is not x86).
void quantize_rows_into_avx2(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                             ThreadPool& pool);

// The scale and zero point of a row from its range (lo <= 0 <= hi), exactly as quantize() computes them;
// false when the asymmetric range overflows fp32. (The vectorized row quantizers above share it.)
inline bool row_scale_and_zero(float lo, float hi, bool symmetric, float qmax, float& s, float& z) {
  z = 0.0f;
  if (symmetric) {
    s = std::max(hi, -lo) / qmax;  // = the largest magnitude, as the range includes 0
  } else {
    const float range = hi - lo;
    if (!std::isfinite(range)) return false;
    s = range / qmax;
  }
  if (s == 0.0f) s = 1.0f;
  if (!symmetric) z = std::clamp(std::nearbyint(-lo / s), 0.0f, qmax);
  return true;
}
// A kernel's one-row quantizer: row x into dst (the row's first byte, RowLayout::row_offset) with each
// block's sum, its scale and zero point; false for a row holding NaN / Inf (or an unrepresentable range).
using QuantizeRowFn = bool (*)(const float* x, const RowLayout& l, bool symmetric, float qmax, uint8_t* dst,
                               int32_t* rowsum, float* scale, int32_t* zero_point);
// Every row of x through `row`, the rows split over the pool (a fused producer's rows computed on the way
// into a per-thread scratch); throws naming the first row with NaN / Inf.
void quantize_rows_with(QuantizeRowFn row, const RowInput& x, const RowLayout& l, QuantSpec act,
                        const QuantizedRows& out, ThreadPool& pool);

struct IntGemmKernel {
  CpuIsa level;
  std::unique_ptr<CpuLinear> (*prepare)(IntWeight w, ThreadPool& pool);  // pool: for packing
};
// The reference loops on already-quantized rows (quantize_rows semantics): int32 per K-block,
// exact int64 correction, fp32 epilogue in a fixed order that every kernel reproduces.
void gemm_int_quantized_ref(const QuantizedTensor& x, const IntWeight& w, const float* bias, float* y,
                            Epilogue epilogue, ThreadPool& pool);

// ---- floating point ---------------------------------------------------------------------------
struct F32GemmKernel {
  CpuIsa level;
  std::unique_ptr<CpuLinear> (*prepare)(Tensor w, ThreadPool& pool);  // w: F32 [N, K]
};

// ---- the registry: one line per ISA (registry.cc) ----------------------------------------------
IntGemmKernel int_gemm_ref();
IntGemmKernel int_gemm_avx2();
// The schemes int_gemm_avx2 hands to int_gemm_avx2_maddubs (vpmaddubsw exact for them): INT4, and
// symmetric INT8 weights (against asymmetric activations only without the value -128).
bool avx2_maddubs_exact(const IntWeight& w);
IntGemmKernel int_gemm_avx2_maddubs();
IntGemmKernel int_gemm_avxvnni();
IntGemmKernel int_gemm_avx512vnni();
IntGemmKernel int_gemm_amx();  // short K-blocks (< 64) go to int_gemm_avx512vnni
F32GemmKernel f32_gemm_ref();
F32GemmKernel f32_gemm_avx512();
// BF16 products, FP32 sums (gemm_f32_bf16.cc): not a level of the FP32 family but the kernel of
// FloatPrecision::BF16, where bf16_kernel_eligible (elsewhere such Linears stay fp32).
F32GemmKernel f32_gemm_bf16_avx512();  // weights rounded by float_to_bf16 (core/convert.h)
inline bool bf16_kernel_eligible(CpuIsa active) {
  return cpu_has_avx512_bf16() && kernel_eligible(CpuIsa::Avx512Vnni, active);
}
const std::vector<IntGemmKernel>& int_gemm_kernels();
const std::vector<F32GemmKernel>& f32_gemm_kernels();

// Read bandwidth of a `bytes` buffer (far larger than the caches) swept by every thread of `pool`,
// best of the sweeps in about `seconds`, in GB/s.
double dram_read_gbps(ThreadPool& pool, int64_t bytes, double seconds);

// `loop(start, seconds)` (a register-resident loop that runs until `seconds` after `start` and returns
// the ops it did) on `threads` threads of the shared pool: their total ops per second, in GOPS.
using PeakLoop = double (*)(std::chrono::steady_clock::time_point start, double seconds);
double peak_gops(int threads, double seconds, PeakLoop loop);
// Throughput of a register-resident vpdpbusd loop on `threads` threads for about `seconds`:
// the machine's INT8 peak in GOPS (2 ops per multiply-add), 0 without AVX512-VNNI.
double int8_peak_gops(int threads, double seconds);
// The same for AMX-INT8 (tdpbssd on tile registers), 0 without AMX.
double amx_int8_peak_gops(int threads, double seconds);
// AMX-INT8 with its operands loaded from L1 every step, as a 2 x 2 GEMM tile loop needs (4 tile loads
// per 4 tdpbssd): the ceiling of any tile-loop GEMM on this CPU, 0 without AMX (DESIGN 5.4).
double amx_tile_loop_gops(int threads, double seconds);

}  // namespace kernels
}  // namespace finequant
