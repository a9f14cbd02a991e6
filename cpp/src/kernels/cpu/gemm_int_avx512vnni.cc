// AVX512-VNNI integer GEMM (vpdpbusd: u8 x s8 -> int32) with the activation quantization fused in
// front and the dequantization (+ bias + GeLU) fused behind; bit-identical to gemm_int_ref.
//
// One call:
//   1. quantize the F32 rows token-wise straight into the kernel's layout (same values as
//      quantize_rows: the same fp32 operations), with the per-block row sums, one row per thread
//      step while it sits in L1 (rows of a fused producer, e.g. LayerNorm, are computed right here);
//   2. register tiles of MR rows x 64 channels (4 panels of 16) accumulate int32 over one K-block:
//      per 4-k step, 4 weight vectors (INT4: one load, nibbles split in registers) are multiplied
//      with MR broadcast activation words;
//   3. per block, the exact integer correction and the fp32 scaling, in the reference's order
//      (sum = 0; sum = fma(sw, float(corrected), sum) per block; y = act(sx * sum + bias)), with
//      the sums over blocks in registers or L1. This file is compiled with -ffp-contract=off.
// Integer corrections use wrap-around int32, equal to the reference's exact values modulo 2^32;
// the true per-block values fit int32 (|(x - zx)(w - zw)| <= 255^2, blocks up to ~33000).
//   acc' = sum_k x (q + wc) = acc + wc rowsum_x
//   corrected = acc' - (zw + wc) rowsum_x - zx (colsum_w - kb zw)
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "core/convert.h"
#include "kernels/cpu/act_math_avx512.h"
#include "kernels/cpu/gemm.h"


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_VNNI_BUILD 1
#else
#define FQ_VNNI_BUILD 0
#endif

namespace finequant {
namespace kernels {

#if FQ_VNNI_BUILD

namespace {

constexpr int64_t kPanel = 16;         // output channels per zmm of int32 accumulators
constexpr int64_t kTileN = 4 * kPanel;  // channels per micro-kernel
// Rows per micro-kernel: 6 (24 int32 accumulators + 4 weights + 1 broadcast); with several K-blocks
// the fp32 sums over blocks wait in L1 between blocks (see micro_kernel).
constexpr int kMaxMR = 6, kMaxMRBlocked = 6;
// Software prefetch distance in a tile's weight stream: INT8 2 KiB, INT4 4 KiB (on Ice Lake SmolLM2 w4a8
// decode 1.035x, 23 of 30 alternated generate calls faster, 1.034x with the INT4 head; INT8 within noise
// at 4 or 8 KiB; a Xeon whose L3 held the whole model had measured 1 or 4 KiB 5% slower; DESIGN 5.4).
constexpr int64_t kPrefetchBytes = 2048, kPrefetchBytesInt4 = 4096;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Asymmetric activations against K-blocks of at most kPairBlock: a column's two block corrections,
// colsum - kb zw and zw + wc, are kept as the int16 halves of one int32 (int16_pair) and applied with one
// vpdpwssd against the row's (-zx, -rowsum): every factor fits int16 (row sums of u8 values up to 255 x 128,
// column sums of |q - zw| <= 255 the same), the products are exact and their sum wraps like the int32
// operations it replaces. (The AVX2 build of gemm_int_avxvnni.cc, with vpmaddwd, measured 0.97-1.0x.)
constexpr int64_t kPairBlock = 128;
inline int32_t int16_pair(int32_t lo, int32_t hi) {
  return static_cast<int32_t>((static_cast<uint32_t>(lo) & 0xffffu) | (static_cast<uint32_t>(hi) << 16));
}

// ---- the layout -------------------------------------------------------------------------------
// vpdpbusd multiplies u8 by s8: symmetric activations (s8) take the u8 side's other operand, so the
// weight is stored as u8; asymmetric activations (u8) get an s8 weight. Either way the stored value
// is q + wc (wc a constant that moves q into the operand's range: 128 for I8 weights against s8
// activations, -128 for U8 weights against u8 activations, 8 for signed INT4, else 0), undone
// exactly in the epilogue through the activation row sums.
// Tiles of 64 output channels (4 panels of 16, one micro-kernel), N padded to a multiple of 64.
// Each K-block is padded with zeros to a multiple of 8 (block_padded), Kp = padded total K. A
// tile is one contiguous stream (separate panel streams alias in L1 when Kp * 16 is a multiple
// of 4 KiB); with j = channel % 64:
//   8-bit: packed[(tile * Kp/4 + k/4) * 256 + j * 4 + k%4]
//   4-bit: packed[(tile * Kp/8 + k/8) * 256 + j * 4 + k%4], k%8 < 4 in the low nibble, else high.
// Per-column tables are indexed [(tile * nb + block) * 64 + n % 64], zero for padding channels:
// tile-major, so that a micro-kernel reads its blocks' values as one stream beside its weights (block-major
// tables jump Npad * 4 bytes per block: the TLB cost the AVX2 kernel measured on the LM head; DESIGN 5.4).
struct VnniLayout {
  int64_t N = 0, K = 0, nb = 1, bk = 0;  // bk: K-block length (K when not blocked)
  int bits = 8;
  QuantSpec act;
  bool wsym = true;
  int32_t wc = 0;
  int64_t Kp = 0, Npad = 0, block_padded = 0;
  WeightVector<uint8_t> packed;
  WeightVector<float> scale;            // sw of the column's tile (empty when scale_half holds them)
  WeightVector<uint16_t> scale_half;    // the same values as IEEE half, when every one is exactly one
  WeightVector<int32_t> zw_plus_wc;     // zw + wc (asymmetric weights only)
  WeightVector<int32_t> colsum_minus;   // colsum - kb * zw (asymmetric activations only, without corr_pairs)
  WeightVector<int32_t> corr_pairs;     // int16_pair(colsum - kb zw, zw + wc) (kPairBlock)
};

// ---- the call's context -----------------------------------------------------------------------
struct Ctx {
  int64_t M, N, K, nb, bk, bkp, Kp, Npad;
  const uint8_t* xp;      // [M, Kp] quantized rows (s8 or u8 bytes), zero padded per block
  const int32_t* rowsum;  // [M, nb] sum of the quantized row over each block
  const float* sx;        // [M]
  const int32_t* zx;      // [M] (asymmetric activations)
  const VnniLayout* v;
  bool wsym;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

// ---- 1. token-wise quantization into the kernel layout ----------------------------------------
// nearbyint(x / s) (the reference's rounding of the correctly rounded quotient) with a multiply by
// inv = fl(1 / s) where that gives the same integer: y = fl(x * inv) is within 3 * 2^-24 |x / s| of
// fl(x / s), so their nearest integers can differ only when y lies within that of a half-integer;
// those lanes (a few in 10^5) take the divide. |x / s| <= qmax (1 + 2^-22) for every value of the row
// (s is its range over qmax), so one bound, near = (qmax + 1) 2^-21, serves all lanes: a lane is redone
// when y's distance from its nearest integer (vreduceps, exact) is at least 0.5 - near (`far`; 0.5 - |y - r|
// <= near rearranged, exact where it matters: 0.5 - near is a float and 0.5 - t is exact for t >= 0.25,
// Sterbenz). The distances are compared as the bit patterns of their magnitudes (unsigned order is the
// float order for non-negative floats, and a NaN lane lies above every finite one), so 64 values take
// one compare and one rarely taken branch. A NaN lane takes the divide path too, where it is reported
// in `nan` (the range pass does not look for NaN: vminps / vmaxps may drop it). The multiply, with the
// AMX kernel's direct-store epilogue, made M = 128 GEMMs with asymmetric activations 4-12% faster (Xeon
// with AMX, old and new builds alternated; DESIGN 5.4); the one-branch test and the rounding in vcvtps2dq
// itself (no vrndscaleps) made a row of 768 ~1.25x faster on Ice Lake (DESIGN 5.4).
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// One row's quantization constants.
struct RowScale {
  __m512 s, inv;
  __m512i far_bits;  // the bits of 0.5 - near (see above)
  __m512i zero;      // the zero point (asymmetric)
  __m512i qmax;      // the largest code (the clamps)
};

// |y - nearbyint(y)| as bits (vreduceps with M = 0, nearest: exact).
FQ_VNNI inline __m512i distance_bits(__m512 y) {
  return _mm512_and_si512(_mm512_castps_si512(_mm512_reduce_ps(y, _MM_FROUND_TO_NEAREST_INT | 0x08)),
                          _mm512_set1_epi32(0x7fffffff));
}

// The lanes of q (nearbyint of y = x * inv) whose y lies near a half-integer (or is NaN), redone by division.
// NaN lanes (the row is reported) become 0, so that the row's sums stay defined.
FQ_VNNI inline __m512i redo_close(__m512 x, __m512 y, __m512i q, const RowScale& r, __mmask16& nan) {
  const __mmask16 close = _mm512_cmpge_epu32_mask(distance_bits(y), r.far_bits);
  if (close == 0) return q;
  const __mmask16 bad = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  nan |= bad;
  return _mm512_maskz_mov_epi32(static_cast<__mmask16>(~bad),
                                _mm512_mask_cvt_roundps_epi32(q, close, _mm512_div_ps(x, r.s), kNearest));
}

// 64 values quantized into the 64 bytes of one chunk, in order. Same values as the 16-value loop of
// quantize_blocks, with fewer instructions (a whole row of 768 from L2, both passes: 193 -> 125 ns on Zen 4;
// quantization was 10% of a 1024 x 768 x 768 GEMM there; DESIGN 5.4): the int32 -> int16 -> 8-bit packs
// saturate, which is the clamp for 8-bit ranges ([-128, 127] holds the symmetric [-qmax, qmax]; [0, 255] is
// the asymmetric range); the symmetric values need no clamp at all, since |x / s| <= qmax (1 + 2^-22)
// rounds to at most qmax; 4-bit asymmetric ranges (CLAMP) clamp. Needs the multiply path (inv normal, see
// quantize_row).
template <bool SYM, bool CLAMP>
FQ_VNNI inline __m512i quantize_64(const float* x, const RowScale& r, __mmask16& nan) {
  // After the two packs, 128-bit lane l holds 4 values of each input vector: q0[4l..4l+3], q1[...], ...
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i q[4], far = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * j), r.inv);
    q[j] = _mm512_cvt_roundps_epi32(y, kNearest);
    far = _mm512_max_epu32(far, distance_bits(y));
  }
  if (__builtin_expect(_mm512_cmpge_epu32_mask(far, r.far_bits) != 0, 0)) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 xv = _mm512_loadu_ps(x + 16 * j);
      q[j] = redo_close(xv, _mm512_mul_ps(xv, r.inv), q[j], r, nan);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    if (!SYM) q[j] = _mm512_add_epi32(q[j], r.zero);
    if (CLAMP) q[j] = _mm512_min_epi32(_mm512_max_epi32(q[j], _mm512_setzero_si512()), r.qmax);
  }
  const __m512i q01 = _mm512_packs_epi32(q[0], q[1]), q23 = _mm512_packs_epi32(q[2], q[3]);
  return _mm512_permutexvar_epi32(order, SYM ? _mm512_packs_epi16(q01, q23) : _mm512_packus_epi16(q01, q23));
}

// The sums of each 4 bytes of a chunk (s8 or u8 as stored): one vpdpbusd against ones.
template <bool SYM>
FQ_VNNI inline __m512i word_sums(__m512i acc, __m512i bytes) {
  const __m512i ones = _mm512_set1_epi8(1);
  return SYM ? _mm512_dpbusd_epi32(acc, ones, bytes) : _mm512_dpbusd_epi32(acc, bytes, ones);
}

// The bulk of one block of a row: whole 64-value chunks from the block's start (a 64-byte chunk), each
// stored at dst + (i / 64) * chunk_step, the block's sum accumulated in `sum`; the caller quantizes the
// rest 16 at a time. Returns the values done.
template <bool SYM, bool CLAMP>
FQ_VNNI inline int64_t quantize_chunks(const float* x, int64_t kb, const RowScale& r, uint8_t* dst, int64_t chunk_step,
                                       __m512i& sum, __mmask16& nan) {
  int64_t i = 0;
  for (; i + 64 <= kb; i += 64, dst += chunk_step) {
    const __m512i bytes = quantize_64<SYM, CLAMP>(x + i, r, nan);
    sum = word_sums<SYM>(sum, bytes);
    _mm512_storeu_si512(dst, bytes);
  }
  return i;
}

// K-blocks of 16 or 32 stored without padding (block_padded == bk): a chunk holds 64 / bk whole blocks, so
// the row goes 64 values at a time like one long block, and each chunk's word sums are added up per block
// (lanes of 4 or 8) and stored with one masked store. The 16-value loop took 2.5-3x as long per row for
// K-blocks of 32 (the default of INT4 weights; DESIGN 5.4). Returns the chunks done (whole chunks of the row).
template <bool SYM, bool CLAMP, int BK>
FQ_VNNI inline int64_t quantize_short_blocks(const float* x, const RowLayout& c, const RowScale& r, uint8_t* dst,
                                            int32_t* rowsum, __mmask16& nan) {
  static_assert(BK == 16 || BK == 32, "blocks that tile a 64-byte chunk");
  constexpr int kPerChunk = 64 / BK;
  // After the adds below, lane 4 j (BK 16) or 8 j (BK 32) holds block j's sum; gathered into the low lanes.
  const __m512i gather = BK == 16 ? _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                                  : _mm512_setr_epi32(0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const int64_t chunks = c.K / 64;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const __m512i bytes = quantize_64<SYM, CLAMP>(x + ch * 64, r, nan);
    _mm512_storeu_si512(dst + ch * 64 * c.group_rows, bytes);
    __m512i t = word_sums<SYM>(_mm512_setzero_si512(), bytes);
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));  // within each 128-bit lane
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_CDAB));
    if (BK == 32) t = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));  // lane pairs
    _mm512_mask_storeu_epi32(rowsum + ch * kPerChunk, static_cast<__mmask16>((1u << kPerChunk) - 1),
                             _mm512_permutexvar_epi32(gather, t));
  }
  return chunks;
}

// Every K-block of the row after its range pass: whole chunks where they start a 64-byte chunk, then 16
// values at a time (block tails, blocks shorter than 64 that are not quantize_short_blocks'). by_inverse: the
// multiply path (else every lane divides).
template <bool SYM, bool CLAMP>
FQ_VNNI void quantize_blocks(const float* x, const RowLayout& c, const RowScale& r, bool by_inverse, uint8_t* dst,
                             int32_t* rowsum, __mmask16& nan) {
  const int64_t K = c.K;
  int64_t b = 0;  // the first block left to quantize
  if (by_inverse && c.nb > 1 && c.block_padded == c.bk && (c.bk == 16 || c.bk == 32))
    b = (c.bk == 16 ? quantize_short_blocks<SYM, CLAMP, 16>(x, c, r, dst, rowsum, nan)
                    : quantize_short_blocks<SYM, CLAMP, 32>(x, c, r, dst, rowsum, nan)) * (64 / c.bk);
  for (; b < c.nb; ++b) {
    const int64_t k0 = b * c.bk, kb = std::min(K, k0 + c.bk) - k0;
    const int64_t kk0 = b * c.block_padded;  // the block's first padded position
    __m512i sum = _mm512_setzero_si512();
    int64_t i = 0;
    if (by_inverse && (c.group_rows == 1 || kk0 % 64 == 0))
      i = quantize_chunks<SYM, CLAMP>(x + k0, kb, r, dst + c.chunk_offset(kk0), 64 * c.group_rows, sum, nan);
    for (; i < kb; i += 16) {
      const __mmask16 m = kb - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (kb - i)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + k0 + i);
      __m512i q;
      if (by_inverse) {
        const __m512 y = _mm512_mul_ps(xv, r.inv);
        q = redo_close(xv, y, _mm512_cvt_roundps_epi32(y, kNearest), r, nan);
      } else {
        nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
        q = _mm512_cvt_roundps_epi32(_mm512_div_ps(xv, r.s), kNearest);
        // A subnormal scale carries fewer bits, so |x / s| may pass qmax by more than rounding: clamp, as
        // the reference does (e.g. max |x| = 940 x 2^-149: s = 7 x 2^-149, and 940 / 7 rounds to 134).
        if (SYM) q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_sub_epi32(_mm512_setzero_si512(), r.qmax)), r.qmax);
      }
      // Symmetric values from the multiply need no clamp (see quantize_64); asymmetric ones do (the store
      // truncates).
      if (!SYM) q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, r.zero), _mm512_setzero_si512()), r.qmax);
      q = _mm512_maskz_mov_epi32(m, q);
      sum = _mm512_add_epi32(sum, q);
      // The low byte (s8 or u8 as stored); 16 values never cross a 64-byte chunk (block_padded is a
      // multiple of 16 when rows are grouped).
      _mm_mask_storeu_epi8(dst + c.chunk_offset(kk0 + i), m, _mm512_cvtepi32_epi8(q));
    }
    const int64_t padded = (b + 1 < c.nb) ? c.block_padded : c.Kp - kk0;
    for (int64_t kk = kk0 + kb; kk < kk0 + padded;) {  // zeros up to each chunk's end
      const int64_t n = std::min(kk0 + padded, (kk | 63) + 1) - kk;
      std::memset(dst + c.chunk_offset(kk), 0, static_cast<size_t>(n));
      kk += n;
    }
    rowsum[b] = _mm512_reduce_add_epi32(sum);
  }
}

// dst: the row's first byte (RowLayout::row_offset). Returns false if the row holds NaN/Inf (or,
// asymmetric, a range that overflows fp32).
FQ_VNNI bool quantize_row(const float* x, const RowLayout& c, bool symmetric, float qmax, uint8_t* dst,
                          int32_t* rowsum, float* scale, int32_t* zero_point) {
  const int64_t K = c.K;
  __m512 vmin = _mm512_setzero_ps(), vmax = _mm512_setzero_ps();
  int64_t k = 0;
  {
    // Four independent chains: one min / max chain ran at its 4-cycle latency per 16 values, ~40% of
    // the whole quantization (perf, M = 128, K = 3072). Min and max are order-free; NaN is looked for in
    // the second pass (see redo_close), +-Inf by the range below.
    __m512 mn[4], mx[4];
    for (int i = 0; i < 4; ++i) mn[i] = mx[i] = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512 v = _mm512_loadu_ps(x + k + 16 * i);
        mn[i] = _mm512_min_ps(mn[i], v);
        mx[i] = _mm512_max_ps(mx[i], v);
      }
    }
    vmin = _mm512_min_ps(_mm512_min_ps(mn[0], mn[1]), _mm512_min_ps(mn[2], mn[3]));
    vmax = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vmin = _mm512_min_ps(vmin, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    vmin = _mm512_min_ps(vmin, v);
    vmax = _mm512_max_ps(vmax, v);
  }
  const float lo = _mm512_reduce_min_ps(vmin), hi = _mm512_reduce_max_ps(vmax);  // both include 0
  if (!std::isfinite(lo) || !std::isfinite(hi)) return false;  // +-Inf (or a NaN that min / max kept)
  float s, z;
  if (!row_scale_and_zero(lo, hi, symmetric, qmax, s, z)) return false;
  *scale = s;
  if (zero_point) *zero_point = static_cast<int32_t>(z);

  // A scale whose reciprocal is not a normal float divides every lane (the bound above needs it).
  const float inv = 1.0f / s;
  const bool by_inverse = std::isnormal(inv) && std::isnormal(s);
  const RowScale r{_mm512_set1_ps(s), _mm512_set1_ps(inv),
                   _mm512_castps_si512(_mm512_set1_ps(0.5f - (qmax + 1.0f) * 0x1p-21f)),
                   _mm512_set1_epi32(static_cast<int32_t>(z)), _mm512_set1_epi32(static_cast<int32_t>(qmax))};
  __mmask16 nan = 0;
  if (symmetric) quantize_blocks<true, false>(x, c, r, by_inverse, dst, rowsum, nan);
  else if (qmax == 255.0f) quantize_blocks<false, false>(x, c, r, by_inverse, dst, rowsum, nan);
  else quantize_blocks<false, true>(x, c, r, by_inverse, dst, rowsum, nan);
  return nan == 0;
}

// ---- 2 + 3. micro-kernel: MR rows x 64 channels over all blocks --------------------------------
// Where a call's software prefetches go: one per 256 bytes of its weight stream, every `stride`-th
// starting at the `phase`-th, `delta` bytes ahead (0: none). The first row group's call reads its tile
// from DRAM (decode: the only call) and prefetches kPrefetchBytes(Int4) ahead in it; the later groups read the
// tile from L2. In a run of tiles (one row chunk, M <= 96: BERT at batch 1, decode at batch 8) those
// later calls prefetch the same bytes of the run's next tile, a share each, so that its first call
// reads L2 too (BERT-base 1 x 32 ~7% faster on Zen 4, DESIGN 5.4); with several row chunks the next
// tile is another task's, and they prefetch nothing.
// (16 bytes, so passed in two registers: as 24 bytes on the stack the caller's copy stalled each call on
// store forwarding, 4% of a 1024 x 768 x 768 GEMM.)
struct Prefetch {
  int64_t delta = kPrefetchBytes;
  int32_t stride = 1, phase = 0;
};

// The prefetch of the NP panels' weight bytes `delta` past `at` (a 256-byte chunk's, offset to the
// call's first panel), when due: NP lines into L2 (T1; T0 held L1 miss buffers that the streams need:
// GPT-2 small w8a8 decode went ~1.2x faster on Zen 4; on Ice Lake T0 was within noise and NTA 15% slower
// for INT4, DESIGN 5.4). `wait`: 256-byte chunks before the next one.
template <int NP>
FQ_VNNI inline void prefetch_due(const Prefetch& pf, int32_t& wait, const uint8_t* at) {
  if (pf.delta == 0 || --wait >= 0) return;
  wait = pf.stride - 1;
#pragma GCC unroll 4
  for (int j = 0; j < NP; ++j) _mm_prefetch(reinterpret_cast<const char*>(at + pf.delta + j * 64), _MM_HINT_T1);
}

FQ_VNNI inline int32_t load_word(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// Bias, activation and masked store of 16 outputs of row m starting at channel n0 (< N).
FQ_VNNI inline void store_outputs(const Ctx& c, int64_t m, int64_t n0, __m512 o) {
  store_activated(c.y + m * c.N + n0, c.bias ? c.bias + n0 : nullptr, c.N - n0, o, c.epilogue);
}

// MULTI: several K-blocks, whose fp32 sums stay in registers (so MR <= 3); otherwise one block and
// the fp32 values go straight to the output (MR <= 6 without spilling).
// COLSUM (asymmetric activations, several blocks, MR <= 2: decode): each block's weight column sums
// are computed here (vpdpbusd of the weights with ones), instead of read from colsum_minus: at
// K-blocks of 32 that table is 4 bytes per 16 bytes of INT4 weight, a quarter more DRAM traffic for
// a memory-bound call, while these extra instructions are free there (DESIGN 5.4).
// NP: the panels of the tile this call computes, 4 (the whole tile) or 2 (half a tile, from panel
// `first_panel`: decode's last tile is split in two, see VnniIntLinear::run).
template <int MR, bool XU8, bool W4, bool MULTI, bool COLSUM = false, int NP = 4>
FQ_VNNI void micro_kernel(const Ctx& c, int64_t m0, int64_t tile, Prefetch pf, int first_panel) {
  static_assert(!COLSUM || (XU8 && MULTI && MR <= 2), "in-kernel column sums: asymmetric activations, blocked, MR <= 2");
  static_assert(NP == 4 || (NP == 2 && MR <= 2), "half tiles: decode rows only");
  const VnniLayout& v = *c.v;
  const int j0 = NP == 4 ? 0 : first_panel;  // the call's first panel in the tile
  const int64_t panel0 = tile * 4 + j0;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const __m512i ones = _mm512_set1_epi8(1);
  // The layout's tables and switches, read once per call.
  const bool wsym = c.wsym;
  const uint16_t* scale_half = v.scale_half.empty() ? nullptr : v.scale_half.data();
  const float* scale = v.scale.data();
  const int32_t* zw_plus_wc = v.zw_plus_wc.data();
  const int32_t* colsum_minus = v.colsum_minus.data();
  const int32_t* corr_pairs = v.corr_pairs.empty() ? nullptr : v.corr_pairs.data();
  // MULTI: the fp32 sum over blocks, as the reference: 0, then an FMA per block. Up to 3 rows in registers;
  // more in an L1 buffer (`sums`), so that the accumulators of 6 rows fit the registers: 6 rows share each
  // unpacked weight vector, where the sums in registers allowed 3 (INT4, K-blocks of 32: up to 7% faster
  // at M = 32-128, the same at M = 8; DESIGN 5.4).
  constexpr bool kSumsInL1 = MULTI && MR > 3;
  __m512 out[MULTI && !kSumsInL1 ? MR : 1][NP];
  alignas(64) float sums[kSumsInL1 ? MR : 1][kTileN];
  if constexpr (MULTI && !kSumsInL1) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) out[i][j] = _mm512_setzero_ps();
  }
  int32_t pf_wait = pf.phase;  // 256-byte chunks before the next prefetch
  for (int64_t b = 0; b < (MULTI ? c.nb : 1); ++b) {
    const int64_t kb = std::min(c.K, b * c.bk + c.bk) - b * c.bk;
    const int64_t s0 = b * c.bkp / 8, pairs = round_up(kb, 8) / 8;  // pairs of 4-k steps
    __m512i acc[MR][NP], colacc[NP];  // colacc (COLSUM): sum over the block of the stored weights
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) colacc[j] = _mm512_setzero_si512();
    // A tile's weights for 8 k: 512 bytes (8-bit: two 4-k steps of 4 panels x 64 bytes) or 256
    // (4-bit: the two steps share each panel's 64 bytes); one contiguous stream per tile.
    const int64_t pair_bytes = W4 ? 256 : 512;
    const uint8_t* wp = v.packed.data() + tile * (c.Kp / 8) * pair_bytes + s0 * pair_bytes + j0 * 64;
    const uint8_t* xr = c.xp + m0 * c.Kp + s0 * 8;
    if constexpr (W4 && MR <= 2) {
      // INT4 decode rows: one iteration per pair of 4-k steps, so that each 64 bytes of nibbles is
      // loaded and split once, and the column sums add bytes (a nibble pair <= 30, 8 pairs <= 240), one
      // vpdpbusd per panel per 8 pairs. A one-row GEMV from L2 ran 1.2-1.25x faster than with the general
      // loop; decode, which waits on DRAM, ~1.02x (Zen 4, DESIGN 5.4).
      // Chunks of up to 8 pairs, so that the byte sums flush once per chunk rather than on a test in
      // every iteration (the test, and the copies GCC made around it, cost ~1/4 of the loop).
      for (int64_t p0 = 0; p0 < pairs; p0 += 8) {
        __m512i colbytes[NP];
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) colbytes[j] = _mm512_setzero_si512();
        const int64_t p1 = std::min(pairs, p0 + 8);
        for (int64_t p = p0; p < p1; ++p) {
          prefetch_due<NP>(pf, pf_wait, wp + p * 256);
          __m512i xlo[MR], xhi[MR];
#pragma GCC unroll 2
          for (int i = 0; i < MR; ++i) {
            xlo[i] = _mm512_set1_epi32(load_word(xr + i * c.Kp + p * 8));
            xhi[i] = _mm512_set1_epi32(load_word(xr + i * c.Kp + p * 8 + 4));
          }
#pragma GCC unroll 4
          for (int j = 0; j < NP; ++j) {
            const __m512i packed = _mm512_loadu_si512(wp + p * 256 + j * 64);
            const __m512i lo = _mm512_and_si512(packed, nibble);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
            if constexpr (COLSUM) colbytes[j] = _mm512_add_epi8(colbytes[j], _mm512_add_epi8(lo, hi));
#pragma GCC unroll 2
            for (int i = 0; i < MR; ++i) {
              acc[i][j] = XU8 ? _mm512_dpbusd_epi32(acc[i][j], xlo[i], lo) : _mm512_dpbusd_epi32(acc[i][j], lo, xlo[i]);
              acc[i][j] = XU8 ? _mm512_dpbusd_epi32(acc[i][j], xhi[i], hi) : _mm512_dpbusd_epi32(acc[i][j], hi, xhi[i]);
            }
          }
        }
        if constexpr (COLSUM) {
#pragma GCC unroll 4
          for (int j = 0; j < NP; ++j) colacc[j] = _mm512_dpbusd_epi32(colacc[j], colbytes[j], ones);
        }
      }
    } else {
      // One 4-k step per iteration: 24 accumulators + 4 weight vectors + 1 broadcast fit the 32
      // registers. (Unrolling two steps, holding two steps' weights, or a helper lambda over acc made
      // GCC 12 copy and spill the accumulators on every step: half the throughput.) INT4: step s
      // takes the low (even s: a mask) or high (odd s: an immediate shift and a mask) nibbles of its pair's 64
      // bytes per panel (a shift by a register count, 0 or 4, cost two uops a vector: 1.09-1.13x slower, DESIGN 5.4).
      for (int64_t s = 0; s < 2 * pairs; ++s) {
        __m512i w[NP];
        const bool high = (s & 1) != 0;
        if (!W4 || !high) prefetch_due<NP>(pf, pf_wait, wp + (W4 ? (s >> 1) : s) * 256);
#pragma GCC unroll 4
        for (int j = 0; j < NP; ++j) {
          if (W4) {
            const __m512i packed = _mm512_loadu_si512(wp + (s >> 1) * 256 + j * 64);
            w[j] = _mm512_and_si512(high ? _mm512_srli_epi16(packed, 4) : packed, nibble);
          } else {
            w[j] = _mm512_loadu_si512(wp + s * 256 + j * 64);
          }
          if constexpr (COLSUM) colacc[j] = _mm512_dpbusd_epi32(colacc[j], ones, w[j]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          int32_t word;
          std::memcpy(&word, xr + i * c.Kp + s * 4, 4);
          const __m512i xb = _mm512_set1_epi32(word);
#pragma GCC unroll 4
          for (int j = 0; j < NP; ++j)
            acc[i][j] = XU8 ? _mm512_dpbusd_epi32(acc[i][j], xb, w[j]) : _mm512_dpbusd_epi32(acc[i][j], w[j], xb);
        }
      }
    }
    // Block epilogue: the exact integer correction, then sum = fma(sw, float(corrected), sum).
    // Constant trip counts, fully unrolled, so that acc[][] and out[][] stay in registers (a
    // `break` here made GCC keep a stack copy of the accumulators, stored on every k step).
    // Several rows: the block's column scales converted to fp32 once, into L1, not once per row (half
    // scales: vcvtph2ps is two uops on Intel), and each row's vpdpwssd operand built once, not per panel.
    constexpr bool kScalesOnce = MR > 2;
    alignas(64) float block_sw[kScalesOnce ? kTileN : 1];
    if constexpr (kScalesOnce) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t col = (tile * c.nb + b) * kTileN + j * kPanel;
        _mm512_store_ps(block_sw + j * kPanel,
                        scale_half ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale_half + col)))
                                   : _mm512_loadu_ps(scale + col));
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const uint32_t rx = static_cast<uint32_t>(c.rowsum[m * c.nb + b]);
      const __m512i vrx = _mm512_set1_epi32(static_cast<int32_t>(rx));
      const __m512i wc_rx = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(v.wc) * rx));
      const __m512i row_pair = XU8 && corr_pairs
                                   ? _mm512_set1_epi32(int16_pair(-c.zx[m], -static_cast<int32_t>(rx)))
                                   : _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) {
        const int64_t col = (tile * c.nb + b) * kTileN + (j0 + j) * kPanel;  // padding panels read zeros
        __m512i corr = acc[i][j];
        if constexpr (COLSUM) {
          // colacc = sum of q + wc over the block's kb real k (padding is stored as 0), so colsum - kb zw =
          // colacc - kb (zw + wc), and the correction below regrouped (equal modulo 2^32):
          // corr = acc - zx colacc - (zw + wc) (rx - zx kb), one per-row constant for symmetric weights.
          const uint32_t rx_minus = rx - static_cast<uint32_t>(c.zx[m]) * static_cast<uint32_t>(kb);
          corr = _mm512_sub_epi32(corr, _mm512_mullo_epi32(_mm512_set1_epi32(c.zx[m]), colacc[j]));
          corr = _mm512_sub_epi32(
              corr, wsym ? _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(v.wc) * rx_minus))
                         : _mm512_mullo_epi32(_mm512_loadu_si512(zw_plus_wc + col),
                                                _mm512_set1_epi32(static_cast<int32_t>(rx_minus))));
        } else if (XU8 && corr_pairs) {
          // corr = acc - zx (colsum - kb zw) - (zw + wc) rx in one vpdpwssd (kPairBlock): INT4 K-blocks of
          // 32 at M = 8-128, where the per-block epilogue costs as much as the dot products, 6-9% more GOPS
          // (Zen 4, DESIGN 5.4).
          corr = _mm512_dpwssd_epi32(corr, _mm512_loadu_si512(corr_pairs + col), row_pair);
        } else {
          if (wsym) corr = _mm512_sub_epi32(corr, wc_rx);
          else corr = _mm512_sub_epi32(corr, _mm512_mullo_epi32(_mm512_loadu_si512(zw_plus_wc + col), vrx));
          if (XU8)
            corr = _mm512_sub_epi32(
                corr, _mm512_mullo_epi32(_mm512_set1_epi32(c.zx[m]), _mm512_loadu_si512(colsum_minus + col)));
        }
        const __m512 sw = kScalesOnce ? _mm512_load_ps(block_sw + j * kPanel)
                          : scale_half ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale_half + col)))
                                       : _mm512_loadu_ps(scale + col);
        const __m512 f = _mm512_cvtepi32_ps(corr);
        if constexpr (kSumsInL1) {
          float* o = sums[i] + j * kPanel;
          _mm512_store_ps(o, _mm512_fmadd_ps(sw, f, b == 0 ? _mm512_setzero_ps() : _mm512_load_ps(o)));
        } else if constexpr (MULTI) {
          out[i][j] = _mm512_fmadd_ps(sw, f, out[i][j]);
        } else if ((panel0 + j) * kPanel < c.N) {
          store_outputs(c, m, (panel0 + j) * kPanel,
                        _mm512_mul_ps(_mm512_set1_ps(c.sx[m]), _mm512_fmadd_ps(sw, f, _mm512_setzero_ps())));
        }
      }
    }
  }
  if constexpr (MULTI) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j)
        if ((panel0 + j) * kPanel < c.N)
          store_outputs(c, m0 + i, (panel0 + j) * kPanel,
                        _mm512_mul_ps(_mm512_set1_ps(c.sx[m0 + i]), kSumsInL1 ? _mm512_load_ps(sums[i] + j * kPanel) : out[i][j]));
  }
}

using MicroFn = void (*)(const Ctx&, int64_t m0, int64_t tile, Prefetch, int first_panel);

// The micro-kernel for mr rows; NP = 2 (half tiles) exists for decode rows (mr <= 2) only.
template <bool XU8, bool W4, bool MULTI, int NP>
MicroFn pick_rows(int mr) {
  if constexpr (NP == 2) {
    return mr == 1 ? micro_kernel<1, XU8, W4, MULTI, false, 2> : micro_kernel<2, XU8, W4, MULTI, false, 2>;
  } else {
    switch (mr) {
      case 1: return micro_kernel<1, XU8, W4, MULTI>;
      case 2: return micro_kernel<2, XU8, W4, MULTI>;
      case 3: return micro_kernel<3, XU8, W4, MULTI>;
      case 4: return micro_kernel<4, XU8, W4, MULTI>;
      case 5: return micro_kernel<5, XU8, W4, MULTI>;
      default: return micro_kernel<6, XU8, W4, MULTI>;
    }
  }
}

template <bool XU8, bool W4, int NP>
MicroFn pick_rows(int mr, bool multi) {
  return multi ? pick_rows<XU8, W4, true, NP>(mr) : pick_rows<XU8, W4, false, NP>(mr);
}

// colsum: the in-kernel column sums (asymmetric activations, several blocks, mr <= 2). NP: whole tiles
// (4 panels) or the half tiles of decode rows (2).
template <int NP = 4>
MicroFn pick(int mr, bool xu8, bool w4, bool multi, bool colsum = false) {
  if (colsum) {
    if (w4) return mr == 1 ? micro_kernel<1, true, true, true, true, NP> : micro_kernel<2, true, true, true, true, NP>;
    return mr == 1 ? micro_kernel<1, true, false, true, true, NP> : micro_kernel<2, true, false, true, true, NP>;
  }
  if (xu8) return w4 ? pick_rows<true, true, NP>(mr, multi) : pick_rows<true, false, NP>(mr, multi);
  return w4 ? pick_rows<false, true, NP>(mr, multi) : pick_rows<false, false, NP>(mr, multi);
}

VnniLayout pack(const IntWeight& w, ThreadPool& pool) {
  VnniLayout v;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  const bool wsym = w.q.dtype() == DType::I8, xu8 = !w.act.symmetric, w4 = w.bits == 4;
  v.N = N;
  v.K = K;
  v.nb = nb;
  v.bk = bk;
  v.bits = w.bits;
  v.act = w.act;
  v.wsym = wsym;
  v.wc = w4 ? (wsym ? 8 : 0) : (xu8 ? (wsym ? 0 : -128) : (wsym ? 128 : 0));
  v.block_padded = round_up(bk, 8);
  v.Kp = (nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, 8);
  v.Npad = round_up(N, kTileN);
  v.packed.assign(static_cast<size_t>(w4 ? v.Npad * v.Kp / 2 : v.Npad * v.Kp), 0);
  v.scale.assign(static_cast<size_t>(nb * v.Npad), 0.f);
  v.zw_plus_wc.assign(wsym ? 0 : static_cast<size_t>(nb * v.Npad), 0);
  const bool pairs = xu8 && bk <= kPairBlock;
  v.colsum_minus.assign(xu8 && !pairs ? static_cast<size_t>(nb * v.Npad) : 0, 0);
  v.corr_pairs.assign(pairs ? static_cast<size_t>(nb * v.Npad) : 0, 0);
  const float* sw = w.scale.data<float>();
  // Scales that are all exact halves (quantize --scale-dtype fp16, DESIGN 2) take half the bytes:
  // with K-blocks of 32 the fp32 table is 4 bytes per 16 bytes of INT4 weight, read on every decode step.
  const bool half = nb > 1 && all_exact_halves(sw, w.scale.numel());
  if (half) {
    v.scale_half.assign(v.scale.size(), 0);
    v.scale.clear();
  }
  const uint8_t* zw = wsym ? nullptr : w.zero_point.data<uint8_t>();
  const int64_t tile_bytes = w4 ? v.Kp * 32 : v.Kp * 64;
  const uint8_t* codes = static_cast<const uint8_t*>(w.q.raw());  // I8 or U8 as stored
  // Channels own disjoint bytes (INT4 nibble pairs run along k), so they pack in parallel.
  parallel_for(pool, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t tile = n / kTileN, j = n % kTileN, g = n / w.tile_rows;  // j: panel * 16 + lane
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
        const int64_t kk0 = b * v.block_padded;  // the block's first position in the padded K (a multiple of 8)
        pack_vnni_words(codes + n * K + k0, kb, w.bits, v.wc,
                        v.packed.data() + tile * tile_bytes + kk0 / (w4 ? 8 : 4) * 256 + j * 4, 256);
        const size_t col = static_cast<size_t>((tile * nb + b) * kTileN + j);
        const int32_t z = zw ? zw[g * nb + b] : 0;
        if (half) v.scale_half[col] = float_to_half(sw[g * nb + b]);  // exact
        else v.scale[col] = sw[g * nb + b];
        if (!wsym) v.zw_plus_wc[col] = z + v.wc;
        if (xu8) {
          const int32_t colsum_minus = w.colsum[n * nb + b] - static_cast<int32_t>(kb) * z;
          if (pairs) v.corr_pairs[col] = int16_pair(colsum_minus, z + v.wc);
          else v.colsum_minus[col] = colsum_minus;
        }
      }
    }
  });
  return v;
}

class VnniIntLinear final : public CpuLinear {
 public:
  VnniIntLinear(const IntWeight& w, ThreadPool& pool) : v_(pack(w, pool)) {
    N = w.N;
    K = w.K;
    // A one-row call's reads (it sums blocked columns itself, not from the tables).
    const bool colsum_in_kernel = sums_columns(1);
    for (const MemorySpan& s :
         {span_of(v_.packed), span_of(v_.scale), span_of(v_.scale_half), span_of(v_.zw_plus_wc),
          colsum_in_kernel ? MemorySpan{} : span_of(v_.colsum_minus), colsum_in_kernel ? MemorySpan{} : span_of(v_.corr_pairs)})
      if (s.bytes) streamed.push_back(s);
  }
  void run(const ExecContext& ctx, const RowInput& x, float* y) const override;

 private:
  // Whether a call of M rows sums each block's weight columns in the kernel (see micro_kernel).
  bool sums_columns(int64_t M) const { return !v_.act.symmetric && v_.nb > 1 && M <= 2; }

  VnniLayout v_;  // the only copy of the weight in memory
};

void VnniIntLinear::run(const ExecContext& ctx, const RowInput& x, float* y) const {
  const int64_t M = x.rows;
  const VnniLayout& v = v_;
  ThreadPool& pool = ctx.threads();
  const RowLayout rows{v.K, v.nb, v.bk, v.block_padded, v.Kp};
  thread_local RowScratch scratch;
  const QuantizedRows q = scratch.resize(M, rows);
  quantize_rows_into_avx512(x, rows, v.act, q, pool);
  const bool multi = v.nb > 1;
  const int max_mr = multi ? kMaxMRBlocked : kMaxMR;
  const bool xu8 = !v.act.symmetric;
  // Decode-sized calls with blocked weights and asymmetric activations sum the weight columns in the
  // kernel rather than read the colsum_minus table (see micro_kernel).
  const bool colsum = sums_columns(M);
  const MicroFn full = pick(colsum ? static_cast<int>(M) : max_mr, xu8, v.bits == 4, multi, colsum);
  Ctx c{M, v.N, v.K, v.nb, v.bk, v.block_padded, v.Kp, v.Npad,
        q.xp, q.rowsum, q.sx, q.zx,
        &v, v.wsym, bias.defined() ? bias.data<float>() : nullptr, y, epilogue};

  // Tasks: row chunks x runs of channel tiles. Decode-sized M is one row chunk, so the weight is read
  // once and the threads split the channels (guided_runs); larger M uses chunks whose rows stay in L2.
  const int64_t mc = M <= 24 ? M : 96, mchunks = (M + mc - 1) / mc, tiles = v.Npad / kTileN;
  // Decode rows (M <= 2, one row group) over an odd number of tiles take the last tile as two units of
  // 32 channels: one thread ran that tile alone (SmolLM2's 576 and 960 channels: 1.03-1.08x GEMVs from
  // DRAM on Ice Lake; with an even number split too, INT4 measured 0.97x, DESIGN 5.4).
  const bool halves = mchunks == 1 && M <= 2 && pool.size() > 1 && tiles % 2 == 1 && tiles > 1;
  const int64_t units = tiles + (halves ? 1 : 0);  // unit tiles - 1 + h: half h of the last tile
  const WorkRuns runs = mchunks == 1 ? guided_runs(units, pool.size()) : uniform_runs(tiles, 1);
  const int64_t last_rows = (M - (mchunks - 1) * mc) % max_mr;  // the last chunk's remainder (others: none)
  const MicroFn rest = last_rows ? pick(static_cast<int>(last_rows), xu8, v.bits == 4, multi, colsum) : full;
  const MicroFn half = halves ? pick<2>(static_cast<int>(M), xu8, v.bits == 4, multi, colsum) : nullptr;
  const int64_t tile_bytes = v.bits == 4 ? v.Kp * 32 : v.Kp * 64;
  const int64_t ahead = v.bits == 4 ? kPrefetchBytesInt4 : kPrefetchBytes;
  pool.run(mchunks * runs.count, [&](int64_t t) {
    const int64_t m0 = (t / runs.count) * mc, m1 = std::min(M, m0 + mc), t0 = runs.begin(t % runs.count);
    const int64_t t1 = runs.end(t % runs.count), groups = (m1 - m0 + max_mr - 1) / max_mr;
    for (int64_t tile = t0; tile < t1; ++tile) {
      if (halves && tile >= tiles - 1) {
        const int first_panel = static_cast<int>(tile - (tiles - 1)) * 2;
        if ((tiles - 1) * kTileN + first_panel * kPanel < v.N) half(c, m0, tiles - 1, Prefetch{ahead}, first_panel);
        continue;
      }
      // Row groups after the first prefetch the run's next tile (see Prefetch), when there is one.
      const bool next = mchunks == 1 && groups > 1 && tile + 1 < t1;
      int64_t g = 0, m = m0;
      for (; m < m1; m += max_mr, ++g) {
        const Prefetch pf = g == 0 ? Prefetch{ahead}
                            : next ? Prefetch{tile_bytes, static_cast<int32_t>(groups - 1), static_cast<int32_t>(g - 1)}
                                   : Prefetch{0};
        (m + max_mr <= m1 ? full : rest)(c, m, tile, pf, 0);
      }
    }
  });
}

std::unique_ptr<CpuLinear> prepare_vnni(IntWeight w, ThreadPool& pool) { return std::make_unique<VnniIntLinear>(w, pool); }

}  // namespace

IntGemmKernel int_gemm_avx512vnni() { return {CpuIsa::Avx512Vnni, prepare_vnni}; }

void quantize_rows_into_avx512(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                               ThreadPool& pool) {
  quantize_rows_with(quantize_row, x, l, act, out, pool);
}

namespace {
// vpdpbusd on registers only until `seconds` after `start`; returns the ops done.
FQ_VNNI double peak_loop(std::chrono::steady_clock::time_point start, double seconds) {
  constexpr int kAcc = 12;  // independent chains: enough to cover vpdpbusd latency
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  int64_t iters = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    for (int r = 0; r < 4096; ++r)
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    iters += 4096;
  }
  // Keep every chain live; xor, not a sum: the wrapped accumulators would overflow a signed reduction (UB).
  __m512i s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_xor_si512(s, acc[i]);
  volatile int sink = _mm512_reduce_or_epi32(s);
  (void)sink;
  return static_cast<double>(iters) * kAcc * 64 * 2;
}
}  // namespace

double int8_peak_gops(int threads, double seconds) {
  return cpu_supports(CpuIsa::Avx512Vnni) ? peak_gops(threads, seconds, peak_loop) : 0.0;
}

#else  // no x86 build: the entry is never selected (the CPU does not support the level)

IntGemmKernel int_gemm_avx512vnni() { return {CpuIsa::Avx512Vnni, nullptr}; }
void quantize_rows_into_avx512(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                               ThreadPool& pool) {
  quantize_rows_into(x, l, act, out, pool);
}
double int8_peak_gops(int, double) { return 0.0; }

#endif

}  // namespace kernels
}  // namespace finequant
