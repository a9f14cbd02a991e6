// AVX-VNNI integer GEMM (VEX ymm vpdpbusd: u8 x s8 -> int32, no saturation) for CPUs with AVX-VNNI
// but without AVX-512; bit-identical to gemm_int_ref (docs/DESIGN.md sections 2 and 5.4).
//
// The operands and their shift are those of gemm_int_avx512vnni.cc at half the width: symmetric
// activations (s8) meet weights stored as u8, asymmetric activations (u8) weights stored as s8; the
// stored weight is q + wc (128 for I8 weights against s8 activations, -128 for U8 weights against u8
// activations, 8 for signed INT4, else 0), undone exactly through the activation row sums:
//   acc' = sum_k x (q + wc) = acc + wc rowsum_x
//   corrected = acc' - zx (colsum_w - kb zw) - (zw + wc) rowsum_x          (correct_block)
// Rows are quantized by quantize_rows_into_avx2 (the reference's own values) per K-block; the
// micro-kernel accumulates MR rows x 16 channels in int32 over one block, then the block's
// correction and fp32 accumulation run 8 channels a vector, each lane in the reference's order (this
// file is compiled with -ffp-contract=off).
//
// The only AVX-VNNI instruction goes through dpbusd() below. With FQ_KERNEL_EMULATE defined (the
// test build, cpp/tests/gemm_emulated_kernels.cc) it is computed exactly with AVX2 and the entry is
// int_gemm_avxvnni_emulated(): everything but the instruction itself is tested on AVX2 machines.
#include <algorithm>
#include <cstring>

#include "core/convert.h"
#include "kernels/cpu/gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_AVXVNNI_BUILD 1
#include <immintrin.h>
#if FQ_KERNEL_EMULATE || FQ_AVX2_MADDUBS
#define FQ_AVXVNNI __attribute__((target("avx2,fma,f16c")))
#else
#define FQ_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#endif
#else
#define FQ_AVXVNNI_BUILD 0
#endif
#if FQ_KERNEL_EMULATE
#define FQ_AVXVNNI_ENTRY int_gemm_avxvnni_emulated
#define FQ_AVXVNNI_LEVEL CpuIsa::AvxVnni
#elif FQ_AVX2_MADDUBS
#define FQ_AVXVNNI_ENTRY int_gemm_avx2_maddubs
#define FQ_AVXVNNI_LEVEL CpuIsa::Avx2
#else
#define FQ_AVXVNNI_ENTRY int_gemm_avxvnni
#define FQ_AVXVNNI_LEVEL CpuIsa::AvxVnni
#endif

namespace finequant {
namespace kernels {

#if FQ_AVXVNNI_BUILD

namespace {
namespace avxvnni {  // a name of its own: the emulation test compiles this file beside gemm_int_amx.cc

constexpr int64_t kPanel = 8;           // output channels per ymm of int32
constexpr int64_t kTileN = 2 * kPanel;  // channels per micro-kernel
constexpr int kMaxMR = 4;               // rows: 8 accumulators + 2 weights + 1 broadcast of 16 ymm
constexpr int64_t kShiftGrain = 32768;  // shift_range bytes per task: decode's rows are shifted without a dispatch
constexpr int64_t kPrefetchBytes = 2048;  // software prefetch distance in a tile's weight stream

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Per 32-bit lane: acc + the four products u8[4i + t] * s8[4i + t] (vpdpbusd, wrap-around int32).
FQ_AVXVNNI inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
#if FQ_KERNEL_EMULATE
  alignas(32) uint32_t a[8];
  alignas(32) uint8_t u[32];
  alignas(32) int8_t s[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), acc);
  _mm256_store_si256(reinterpret_cast<__m256i*>(u), u8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), s8);
  for (int i = 0; i < 8; ++i)
    for (int t = 0; t < 4; ++t) a[i] += static_cast<uint32_t>(int32_t{u[4 * i + t]} * int32_t{s[4 * i + t]});
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
#elif FQ_AVX2_MADDUBS
  // vpmaddubsw saturates a pair of products to int16: exact only for INT4 weights (|pair| <=
  // 2 x 255 x 15), the only ones this build sends here (int_gemm_avx2_maddubs, prepare checks).
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)));
#else
  return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#endif
}

#if FQ_AVX2_MADDUBS
constexpr bool kMaddubs = true;
// acc + the four products s8 w x s8 x per lane, for symmetric INT8 weights and activations (stored
// without a shift): |w| x (x with w's sign), so that vpmaddubsw's pairs stay within int16
// (|pair| <= 2 x 128 x 127: quantized activations never reach -128). w_abs = |w|, once per step.
FQ_AVXVNNI inline __m256i dp_s8s8(__m256i acc, __m256i w_abs, __m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
// acc + the four products (x - 128) w per lane, for u8 activations against symmetric INT8 weights
// without -128 (avx2_maddubs_exact checks): |x - 128| (<= 128 as u8) x (w with the sign of x - 128), so
// that the pairs stay within int16 (<= 2 x 128 x 127). The sum lacks 128 colsum, which the epilogue
// adds back by taking zx - 128 for zx. x_shifted = x - 128 as s8 and x_abs = its magnitude come from
// shift_range, once per call.
FQ_AVXVNNI inline __m256i dp_shifted_u8(__m256i acc, __m256i x_abs, __m256i x_shifted, __m256i w) {
  const __m256i pairs = _mm256_maddubs_epi16(x_abs, _mm256_sign_epi8(w, x_shifted));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#else
constexpr bool kMaddubs = false;
FQ_AVXVNNI inline __m256i dp_s8s8(__m256i acc, __m256i, __m256i, __m256i) { return acc; }        // never called
FQ_AVXVNNI inline __m256i dp_shifted_u8(__m256i acc, __m256i, __m256i, __m256i) { return acc; }  // never called
#endif
// INT4 rows per micro-kernel and the row counts that take the pair loop (one load and split of 32 bytes of
// nibbles per two 4-k steps). With vpmaddubsw, 3 rows of the pair loop beat 4 of the step loop (4 in the
// pair loop spill: 0.79x); on AVX2 1.0-1.17x at K-blocks of 32 and up to 1.4x with larger blocks, M >= 3
// (docs/DESIGN.md section 5.4). The AVX-VNNI build
// keeps 4 rows and the pair loop for decode (M <= 2) until it is measured on AVX-VNNI hardware.
constexpr int kMaxMRInt4 = kMaddubs ? 3 : kMaxMR;
constexpr int kPairRows = kMaddubs ? 3 : 2;
// dp_shifted_u8's operands for n bytes of u8 rows: x - 128 (as s8, in place) and |x - 128| (into x_abs).
// Once per call rather than two operations per row and 4-k step in the micro-kernel: 1.1-1.15x on
// W8A8 with asymmetric activations (docs/DESIGN.md section 5.4).
FQ_AVXVNNI inline void shift_range(uint8_t* x, uint8_t* x_abs, int64_t n) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i s = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), bias);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), s);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x_abs + i), _mm256_abs_epi8(s));
  }
  for (; i < n; ++i) {
    const int s = static_cast<int>(x[i]) - 128;
    x[i] = static_cast<uint8_t>(s);
    x_abs[i] = static_cast<uint8_t>(s < 0 ? -s : s);
  }
}

// ---- the layout -------------------------------------------------------------------------------
// Tiles of 16 output channels (2 panels of 8), N padded to a multiple of 16; each K-block padded
// with zeros to a multiple of 8 (block_padded), Kp = padded total K. With j = channel % 16:
//   8-bit: packed[(tile * Kp/4 + k/4) * 64 + j * 4 + k%4]
//   4-bit: packed[(tile * Kp/8 + k/8) * 64 + j * 4 + k%4], k%8 < 4 in the low nibble, else high.
// Per-column tables [(tile * nb + block) * 16 + j] (zero for padding channels): the scale, zw + wc
// and colsum - kb zw, so that the epilogue never divides by the row-group size; tile-major, so a
// tile reads its blocks' values as one stream (block-major tables cost a TLB miss per block and
// table: the 50257 x 768 LM head GEMM at K-blocks of 32, M = 1, took 8.5 ms instead of 2.1 on AVX2).
struct Layout {
  int64_t N = 0, K = 0, nb = 1, bk = 0, Kp = 0, Npad = 0, block_padded = 0;
  int bits = 8;
  QuantSpec act;
  int32_t wc = 0;
  WeightVector<uint8_t> packed;
  WeightVector<float> scale;          // empty when scale_half holds the scales
  WeightVector<uint16_t> scale_half;  // K-blocked weights whose scales are all exact halves (DESIGN 2)
  WeightVector<int32_t> zw_plus_wc;    // empty for symmetric weights (zw + wc = wc)
  WeightVector<int32_t> colsum_minus;  // empty for symmetric activations (zx = 0 multiplies it)
};

Layout pack(const IntWeight& w, ThreadPool& pool) {
  Layout v;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  const bool wsym = w.q.dtype() == DType::I8, xu8 = !w.act.symmetric, w4 = w.bits == 4;
  v.N = N;
  v.K = K;
  v.nb = nb;
  v.bk = bk;
  v.bits = w.bits;
  v.act = w.act;
  v.wc = w4 ? (wsym ? 8 : 0) : (xu8 ? (wsym ? 0 : -128) : (wsym ? (kMaddubs ? 0 : 128) : 0));  // kMaddubs: dp_s8s8
  v.block_padded = round_up(bk, 8);
  v.Kp = (nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, 8);
  v.Npad = round_up(N, kTileN);
  v.packed.assign(static_cast<size_t>(w4 ? v.Npad * v.Kp / 2 : v.Npad * v.Kp), 0);
  v.scale.assign(static_cast<size_t>(nb * v.Npad), 0.f);
  // Only the tables the scheme needs: at K-blocks of 32 each costs 1/8 byte per weight, a quarter
  // of the INT4 weight's own bytes (decode reads them all).
  v.zw_plus_wc.assign(wsym ? 0 : static_cast<size_t>(nb * v.Npad), 0);
  v.colsum_minus.assign(xu8 ? static_cast<size_t>(nb * v.Npad) : 0, 0);
  const float* sw = w.scale.data<float>();
  const bool half = nb > 1 && all_exact_halves(sw, w.scale.numel());  // half the scale bytes a step reads
  if (half) {
    v.scale_half.assign(v.scale.size(), 0);
    v.scale.clear();
  }
  const uint8_t* zw = wsym ? nullptr : w.zero_point.data<uint8_t>();
  const int64_t tile_bytes = w4 ? v.Kp * 8 : v.Kp * 16;
  const uint8_t* codes = static_cast<const uint8_t*>(w.q.raw());  // I8 or U8 as stored
  // Channels own disjoint bytes (INT4 nibble pairs run along k), so they pack in parallel.
  parallel_for(pool, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t tile = n / kTileN, j = n % kTileN, g = n / w.tile_rows;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
        const int64_t kk0 = b * v.block_padded;  // the block's first position in the padded K (a multiple of 8)
        pack_vnni_words(codes + n * K + k0, kb, w.bits, v.wc,
                        v.packed.data() + tile * tile_bytes + kk0 / (w4 ? 8 : 4) * 64 + j * 4, 64);
        const size_t col = static_cast<size_t>((tile * nb + b) * kTileN + j);
        const int32_t z = zw ? zw[g * nb + b] : 0;
        if (half) v.scale_half[col] = float_to_half(sw[g * nb + b]);  // exact
        else v.scale[col] = sw[g * nb + b];
        if (!wsym) v.zw_plus_wc[col] = z + v.wc;
        if (xu8) v.colsum_minus[col] = w.colsum[n * nb + b] - static_cast<int32_t>(kb) * z;
      }
    }
  });
  return v;
}

// ---- one call ---------------------------------------------------------------------------------
struct Ctx {
  int64_t M;
  const uint8_t* xp;      // [M, Kp] quantized rows (s8 or u8 bytes; dp_shifted_u8: x - 128), zero padded per block
  const uint8_t* x_abs;   // [M, Kp] |x - 128| for dp_shifted_u8, else null
  const int32_t* rowsum;  // [M, nb]
  const float* sx;        // [M]
  const int32_t* zx;      // [M]; null when symmetric
  const Layout* v;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

// acc + x_lo . w_lo + x_hi . w_hi per 32-bit lane (the two 4-k steps of an INT4 pair; XU8: x is the u8
// operand). With vpmaddubsw the two steps' int16 pair sums are added before one vpmaddwd: exact, as INT4
// pairs stay far inside int16 (u8 x [0, 15]: two pairs <= 2 x 2 x 255 x 15 = 15300; s8 x: 7620).
template <bool XU8>
FQ_AVXVNNI inline __m256i dot_int4_pair(__m256i acc, __m256i x_lo, __m256i w_lo, __m256i x_hi, __m256i w_hi) {
  if constexpr (kMaddubs) {
    const __m256i p = XU8 ? _mm256_add_epi16(_mm256_maddubs_epi16(x_lo, w_lo), _mm256_maddubs_epi16(x_hi, w_hi))
                          : _mm256_add_epi16(_mm256_maddubs_epi16(w_lo, x_lo), _mm256_maddubs_epi16(w_hi, x_hi));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  } else {
    return XU8 ? dpbusd(dpbusd(acc, x_lo, w_lo), x_hi, w_hi) : dpbusd(dpbusd(acc, w_lo, x_lo), w_hi, x_hi);
  }
}

// MR rows x 16 channels over every K-block: int32 sums per block, then the reference's correction
// and fp32 accumulation (8 channels a vector, each lane in correct_block's and accumulate_block's
// order), then bias and activation.
// COLSUM (asymmetric activations, several K-blocks, decode-sized MR <= 2): each block's weight column
// sums are computed here instead of read from the colsum_minus table, which at K-blocks of 32 is a
// quarter more bytes per INT4 weight for a memory-bound call (DESIGN 5.4).
template <int MR, bool XU8, bool W4, bool COLSUM = false>
FQ_AVXVNNI void micro_kernel(const Ctx& c, int64_t m0, int64_t tile) {
  static_assert(!COLSUM || (XU8 && MR <= 2), "in-kernel column sums: asymmetric activations, MR <= 2");
  const Layout& v = *c.v;
  const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1);
  __m256 out[MR][2];  // the fp32 sums over blocks, as the reference: 0, then an FMA per block
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) out[i][0] = out[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < v.nb; ++b) {
    const int64_t kb = std::min(v.K, b * v.bk + v.bk) - b * v.bk;
    const int64_t s0 = b * v.block_padded / 8, pairs = round_up(kb, 8) / 8;  // pairs of 4-k steps
    __m256i acc[MR][2], colacc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    // 8 k of a tile: 128 bytes (8-bit: two steps of 2 panels x 32 bytes) or 64 (4-bit: the two
    // steps share each panel's 32 bytes as low / high nibbles).
    const int64_t pair_bytes = W4 ? 64 : 128;
    const uint8_t* wp = v.packed.data() + (tile * (v.Kp / 8) + s0) * pair_bytes;
    const uint8_t* xr = c.xp + m0 * v.Kp + b * v.block_padded;
    constexpr bool kSignTrick = kMaddubs && !XU8 && !W4;  // dp_s8s8
    constexpr bool kShiftedX = kMaddubs && XU8 && !W4;    // dp_shifted_u8
    if constexpr (W4 && MR <= kPairRows) {
      // INT4 rows (kPairRows): one iteration per pair of steps (each 32 bytes of nibbles loaded and split
      // once); decode's column sums as byte adds (a nibble pair <= 30, 8 pairs <= 240) summed per 8 pairs.
      __m256i colbytes[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int64_t p = 0; p < pairs; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + p * 64 + kPrefetchBytes), _MM_HINT_T0);
        __m256i x_lo[MR], x_hi[MR];
#pragma GCC unroll 2
        for (int i = 0; i < MR; ++i) {
          int32_t words[2];
          std::memcpy(words, xr + i * v.Kp + p * 8, 8);
          x_lo[i] = _mm256_set1_epi32(words[0]);
          x_hi[i] = _mm256_set1_epi32(words[1]);
        }
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * 64 + j * 32));
          const __m256i lo = _mm256_and_si256(packed, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
          if constexpr (COLSUM) colbytes[j] = _mm256_add_epi8(colbytes[j], _mm256_add_epi8(lo, hi));
#pragma GCC unroll 2
          for (int i = 0; i < MR; ++i) acc[i][j] = dot_int4_pair<XU8>(acc[i][j], x_lo[i], lo, x_hi[i], hi);
        }
        if constexpr (COLSUM) {
          if ((p & 7) == 7 || p + 1 == pairs)
            for (int j = 0; j < 2; ++j) {
              colacc[j] = dpbusd(colacc[j], colbytes[j], ones);
              colbytes[j] = _mm256_setzero_si256();
            }
        }
      }
    } else {
      for (int64_t s = 0; s < 2 * pairs; ++s) {
        __m256i w[2], w_abs[2];
        // INT4: the low nibbles (even s: a mask) or the high ones (odd s: an immediate shift and a mask; a shift
        // by a register count, 0 or 4, is two uops on Intel: 1.09-1.13x slower in the AVX-512 kernel, DESIGN 5.4)
        const bool high = (s & 1) != 0;
        // The weight stream kPrefetchBytes ahead (decode reads it once, from DRAM): a line per 64 bytes.
        if (W4 ? !high : true)
          _mm_prefetch(reinterpret_cast<const char*>(wp + (W4 ? (s >> 1) : s) * 64 + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          if (W4) {
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (s >> 1) * 64 + j * 32));
            w[j] = _mm256_and_si256(high ? _mm256_srli_epi16(packed, 4) : packed, nibble);
          } else {
            w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + s * 64 + j * 32));
          }
          if constexpr (kSignTrick) w_abs[j] = _mm256_abs_epi8(w[j]);
          if constexpr (COLSUM) colacc[j] = dpbusd(colacc[j], ones, w[j]);  // sum of the stored q + wc
        }
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          int32_t word;
          std::memcpy(&word, xr + i * v.Kp + s * 4, 4);
          const __m256i xb = _mm256_set1_epi32(word);
          __m256i x_abs = xb;
          if constexpr (kShiftedX) {
            std::memcpy(&word, c.x_abs + (m0 + i) * v.Kp + b * v.block_padded + s * 4, 4);
            x_abs = _mm256_set1_epi32(word);
          }
#pragma GCC unroll 2
          for (int j = 0; j < 2; ++j) {
            if constexpr (kShiftedX) acc[i][j] = dp_shifted_u8(acc[i][j], x_abs, xb, w[j]);
            else if constexpr (kSignTrick) acc[i][j] = dp_s8s8(acc[i][j], w_abs[j], w[j], xb);
            else acc[i][j] = XU8 ? dpbusd(acc[i][j], xb, w[j]) : dpbusd(acc[i][j], w[j], xb);
          }
        }
      }
    }
    // The block's correct_block and accumulate_block, 8 channels a vector (wrap-around int32, then
    // sum = fma(sw, float(corrected), sum)); padding channels read zeros.
    const int64_t col = (tile * v.nb + b) * kTileN;
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      const __m256 sw = v.scale_half.empty()
                            ? _mm256_loadu_ps(v.scale.data() + col + j * kPanel)
                            : _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v.scale_half.data() + col + j * kPanel)));
      const __m256i zw = v.zw_plus_wc.empty()
                             ? _mm256_set1_epi32(v.wc)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.zw_plus_wc.data() + col + j * kPanel));
      __m256i cm = _mm256_setzero_si256();  // colsum - kb zw
      if constexpr (COLSUM)  // = sum of (q + wc) - kb (zw + wc); padding is stored as 0
        cm = _mm256_sub_epi32(colacc[j], _mm256_mullo_epi32(_mm256_set1_epi32(static_cast<int32_t>(kb)), zw));
      else if constexpr (XU8)
        cm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.colsum_minus.data() + col + j * kPanel));
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int64_t m = m0 + i;
        __m256i corrected = _mm256_sub_epi32(acc[i][j], _mm256_mullo_epi32(zw, _mm256_set1_epi32(c.rowsum[m * v.nb + b])));
        if constexpr (XU8)
          corrected = _mm256_sub_epi32(corrected, _mm256_mullo_epi32(_mm256_set1_epi32(c.zx[m] - (kShiftedX ? 128 : 0)), cm));
        out[i][j] = _mm256_fmadd_ps(sw, _mm256_cvtepi32_ps(corrected), out[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float sums[kTileN];
    _mm256_store_ps(sums, out[i][0]);
    _mm256_store_ps(sums + kPanel, out[i][1]);
    for (int64_t j = 0; j < kTileN; ++j) {
      const int64_t n = tile * kTileN + j;
      if (n >= v.N) break;
      c.y[(m0 + i) * v.N + n] =
          finish_output(dequantize_sum(c.sx[m0 + i], sums[j]), c.bias != nullptr, c.bias ? c.bias[n] : 0.f, c.epilogue);
    }
  }
}

using MicroFn = void (*)(const Ctx&, int64_t, int64_t);

template <bool XU8, bool W4>
MicroFn pick_rows(int mr) {
  switch (mr) {
    case 1: return micro_kernel<1, XU8, W4>;
    case 2: return micro_kernel<2, XU8, W4>;
    case 3: return micro_kernel<3, XU8, W4>;
    default: return micro_kernel<4, XU8, W4>;
  }
}

// colsum: the in-kernel column sums (asymmetric activations, several K-blocks, mr <= 2).
MicroFn pick(int mr, bool xu8, bool w4, bool colsum = false) {
  if (colsum) {
    if (w4) return mr == 1 ? micro_kernel<1, true, true, true> : micro_kernel<2, true, true, true>;
    return mr == 1 ? micro_kernel<1, true, false, true> : micro_kernel<2, true, false, true>;
  }
  if (xu8) return w4 ? pick_rows<true, true>(mr) : pick_rows<true, false>(mr);
  return w4 ? pick_rows<false, true>(mr) : pick_rows<false, false>(mr);
}

class AvxVnniIntLinear final : public CpuLinear {
 public:
  AvxVnniIntLinear(const IntWeight& w, ThreadPool& pool) : v_(pack(w, pool)) {
    N = w.N;
    K = w.K;
    // A one-row call's reads (it sums blocked columns itself, not from the table).
    const bool colsum_in_kernel = sums_columns(1);
    for (const MemorySpan& s : {span_of(v_.packed), span_of(v_.scale), span_of(v_.scale_half), span_of(v_.zw_plus_wc),
                                colsum_in_kernel ? MemorySpan{} : span_of(v_.colsum_minus)})
      if (s.bytes) streamed.push_back(s);
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const Layout& v = v_;
    const int64_t M = x.rows;
    ThreadPool& pool = ctx.threads();
    const RowLayout rows{v.K, v.nb, v.bk, v.block_padded, v.Kp};
    thread_local RowScratch scratch;
    const QuantizedRows q = scratch.resize(M, rows);
    quantize_rows_into_avx2(x, rows, v.act, q, pool);
    const bool xu8 = !v.act.symmetric, w4 = v.bits == 4;
    const bool shifted = kMaddubs && xu8 && !w4;  // dp_shifted_u8 (micro_kernel's kShiftedX)
    thread_local AlignedVector<uint8_t> x_abs;
    if (shifted) {
      x_abs.resize(static_cast<size_t>(M * v.Kp));
      uint8_t* dst = x_abs.data();  // (the workers take the pointer, not their own thread_local)
      parallel_for(pool, M * v.Kp, kShiftGrain,
                   [&](int64_t i0, int64_t i1) { shift_range(q.xp + i0, dst + i0, i1 - i0); });
    }
    const Ctx c{M, q.xp, shifted ? x_abs.data() : nullptr, q.rowsum, q.sx, xu8 ? q.zx : nullptr, &v,
                bias.defined() ? bias.data<float>() : nullptr, y, epilogue};
    const int max_mr = w4 ? kMaxMRInt4 : kMaxMR;
    const MicroFn full = pick(max_mr, xu8, w4);
    // Decode-sized calls with blocked weights and asymmetric activations sum the weight columns in the
    // kernel rather than read the colsum_minus table (micro_kernel).
    const bool colsum = sums_columns(M);
    // Row chunks x runs of adjacent channel tiles; decode-sized M is one chunk, so the threads
    // split the channels. A run is one contiguous weight stream (about 8 runs per thread) where
    // tile by tile the two threads interleaved 12 KiB pieces: GPT-2 small decode ~7% faster.
    const int64_t tiles = v.Npad / kTileN, mc = M <= 32 ? M : 64, mchunks = (M + mc - 1) / mc;
    const int64_t run = std::max<int64_t>(1, tiles / (8 * pool.size())), runs = (tiles + run - 1) / run;
    pool.run(mchunks * runs, [&](int64_t t) {
      const int64_t m0 = (t / runs) * mc, m1 = std::min(M, m0 + mc), first = (t % runs) * run;
      for (int64_t tile = first; tile < std::min(tiles, first + run); ++tile) {
        int64_t m = m0;
        for (; m + max_mr <= m1; m += max_mr) full(c, m, tile);
        if (m < m1) pick(static_cast<int>(m1 - m), xu8, w4, colsum)(c, m, tile);
      }
    });
  }

 private:
  // Whether a call of M rows sums each block's weight columns in the kernel (see micro_kernel).
  bool sums_columns(int64_t M) const { return !v_.act.symmetric && v_.nb > 1 && M <= 2; }
  Layout v_;  // the only copy of the weight in memory
};

std::unique_ptr<CpuLinear> prepare(IntWeight w, ThreadPool& pool) {
#if FQ_AVX2_MADDUBS
  FQ_CHECK(avx2_maddubs_exact(w), ErrorKind::Runtime, "the AVX2 maddubs kernel cannot take this scheme exactly");
#endif
  return std::make_unique<AvxVnniIntLinear>(w, pool);
}

}  // namespace avxvnni
}  // namespace

IntGemmKernel FQ_AVXVNNI_ENTRY() { return {FQ_AVXVNNI_LEVEL, avxvnni::prepare}; }

#else  // no x86 build: the entry is never selected (the CPU does not support the level)

IntGemmKernel FQ_AVXVNNI_ENTRY() { return {FQ_AVXVNNI_LEVEL, nullptr}; }

#endif

}  // namespace kernels
}  // namespace finequant
