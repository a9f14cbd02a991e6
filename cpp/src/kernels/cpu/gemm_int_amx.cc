// AMX-INT8 integer GEMM (tile registers, tdpb[su][su]d: int8 x int8 -> int32 in any sign
// combination); bit-identical to gemm_int_ref (docs/DESIGN.md sections 2 and 5.4).
//
// AMX multiplies s8 or u8 by s8 or u8, so the operands are the quantized integers themselves (no
// operand shift): A tiles hold 16 activation rows x 64 k, B tiles 64 k x 16 channels in the
// VNNI-interleaved form (row r = k 4r..4r+3 of the 16 channels), C tiles 16 x 16 int32. One
// micro-kernel covers up to 32 rows x 32 channels (2 A x 2 B -> 4 C tiles) over one K-block; the C
// tiles are stored to a small buffer per block and the reference's correction and fp32 accumulation
// run on it in the reference's order (this file is compiled with -ffp-contract=off).
//
// Tile config (palette 1, loaded per pool task and released at its end: ldtilecfg is per thread):
//   tmm0..3  C[i][j] = tmm(2i + j): 16 rows x 64 bytes (16 int32)
//   tmm4, 5  A: rows m0..m0+15, m0+16..m0+31, 16 x 64 bytes (each a contiguous 1 KiB: RowLayout)
//   tmm6, 7  B: panels of 16 channels, 16 x 64 bytes
// Calls of at most kVnniMaxRows rows run vpdpbusd on the same B tiles instead; weights with
// K-blocks under 64 go to the AVX512-VNNI kernel (prepare). Measurements: docs/DESIGN.md 5.4.
//
// Every AMX instruction goes through the FQ_TILE_* wrappers below (macros: the intrinsics take tile
// numbers as literal tokens). With FQ_KERNEL_EMULATE defined (the test build,
// cpp/tests/gemm_emulated_kernels.cc) they run on thread-local emulated tile registers with the
// documented semantics, the rest is the same portable code, and the entry is
// int_gemm_amx_emulated(): everything but the instructions themselves is tested on any CPU.
#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cpu/amx_tiles.h"
#include "kernels/cpu/gemm.h"

#if FQ_KERNEL_EMULATE
#define FQ_AMX_BUILD 1
#define FQ_AMX
#define FQ_AMX_ENTRY int_gemm_amx_emulated
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_AMX_BUILD 1
#include <immintrin.h>

#include <chrono>

#include "kernels/cpu/act_math_avx512.h"
// AVX-512 for the code around the tiles (INT4 widening, epilogue): every AMX CPU has it.
#define FQ_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")))
#define FQ_AMX_ENTRY int_gemm_amx
#else
#define FQ_AMX_BUILD 0
#define FQ_AMX_ENTRY int_gemm_amx
#endif

namespace finequant {
namespace kernels {

#if FQ_AMX_BUILD

namespace {
namespace amx {  // a name of its own: the emulation test compiles this file beside gemm_int_avxvnni.cc

constexpr int64_t kTileRows = 16;   // rows of an A or C tile, k-quads of a B tile
constexpr int64_t kTileK = 64;      // k of an A or B tile (bytes per row)
constexpr int64_t kPanel = 16;      // channels of a B or C tile
constexpr int64_t kBTileBytes = kTileRows * kTileK;
// Calls with at most this many rows take vpdpbusd instead of the tiles (GPT-2 sizes, 2 threads: the
// tiles were slower at M <= 4 and level at 5-8).
constexpr int64_t kVnniMaxRows = 4;
constexpr int64_t kPrefetchChunks = 2;  // B tiles prefetched this many 64-k chunks ahead

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

static_assert(kTileRows == 16 && kTileK == 64, "full_tile_config (amx_tiles.h) shapes every tile 16 x 64 bytes");
// Steps of 64 k: every tile 16 x 64 bytes; of 32 k (half tiles): A tiles 16 rows x 32 bytes, B tiles
// 8 rows (k quads) x 64 bytes.
TileConfig tile_config(int64_t unit) {
  TileConfig cfg = full_tile_config();
  if (unit != kTileK) {
    cfg.colsb[4] = cfg.colsb[5] = static_cast<uint16_t>(unit);
    cfg.rows[6] = cfg.rows[7] = static_cast<uint8_t>(unit / 4);
  }
  return cfg;
}

#if FQ_KERNEL_EMULATE
// Tile registers of this thread with the semantics of the Intel SDM (LDTILECFG, TILELOADD,
// TILESTORED, TILEZERO, TDPB[SU][SU]D, TILERELEASE), and its #UD conditions raised as errors: a
// tile used without a loaded config (e.g. a pool task that did not load it), shapes that do not
// match.
namespace emulated {
struct Tiles {
  bool configured = false;
  uint16_t colsb[8] = {};
  uint8_t rows[8] = {};
  uint8_t reg[8][16][64] = {};
};
thread_local Tiles tiles;

void require(bool ok, const char* what) {
  if (!ok) fail(ErrorKind::Runtime, std::string("emulated AMX: ") + what);
}
void check_tile(int t) {
  require(tiles.configured, "tile instruction without a tile config (ldtilecfg)");
  require(t >= 0 && t < 8 && tiles.rows[t] > 0, "tile not configured");
}

void load_config(const void* cfg) {
  uint8_t b[64];
  std::memcpy(b, cfg, 64);
  require(b[0] == 1, "palette must be 1");
  for (int t = 0; t < 16; ++t) {
    const uint16_t colsb = static_cast<uint16_t>(b[16 + 2 * t] | (b[17 + 2 * t] << 8));
    const uint8_t rows = b[48 + t];
    require(t < 8 ? (colsb <= 64 && rows <= 16 && (colsb == 0) == (rows == 0)) : (colsb == 0 && rows == 0),
            "invalid tile shape in the config");
    if (t < 8) {
      tiles.colsb[t] = colsb;
      tiles.rows[t] = rows;
    }
  }
  std::memset(tiles.reg, 0, sizeof tiles.reg);  // ldtilecfg zeroes the tile data
  tiles.configured = true;
}
void release() {
  tiles = Tiles{};
}
void zero(int t) {
  check_tile(t);
  std::memset(tiles.reg[t], 0, sizeof tiles.reg[t]);
}
// Rows beyond the configured rows and bytes beyond colsb read as zero.
void load(int t, const void* base, int64_t stride) {
  check_tile(t);
  std::memset(tiles.reg[t], 0, sizeof tiles.reg[t]);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(tiles.reg[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles.colsb[t]);
}
void store(int t, void* base, int64_t stride) {
  check_tile(t);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.reg[t][r], tiles.colsb[t]);
}
// C[m].dword[n] += sum_{i<4} A[m].byte[4k + i] * B[k].byte[4n + i] over k < colsb(A) / 4, each
// byte sign- (S) or zero- (U) extended, wrap-around int32.
template <bool AU8, bool BU8>
void dp(int c, int a, int b) {
  check_tile(c);
  check_tile(a);
  check_tile(b);
  require(c != a && c != b && a != b, "tdpb*d operands must be different tiles");
  require(tiles.rows[c] == tiles.rows[a] && tiles.colsb[c] == tiles.colsb[b] && tiles.rows[b] * 4 == tiles.colsb[a],
          "tdpb*d tile shapes do not match");
  auto ext = [](uint8_t v, bool u8) { return u8 ? int32_t{v} : int32_t{static_cast<int8_t>(v)}; };
  for (int m = 0; m < tiles.rows[c]; ++m)
    for (int n = 0; n < tiles.colsb[c] / 4; ++n) {
      uint32_t sum;
      std::memcpy(&sum, &tiles.reg[c][m][4 * n], 4);
      for (int k = 0; k < tiles.colsb[a] / 4; ++k)
        for (int i = 0; i < 4; ++i)
          sum += static_cast<uint32_t>(ext(tiles.reg[a][m][4 * k + i], AU8) * ext(tiles.reg[b][k][4 * n + i], BU8));
      std::memcpy(&tiles.reg[c][m][4 * n], &sum, 4);
    }
}
}  // namespace emulated

#define FQ_TILE_CONFIG(cfg) emulated::load_config(cfg)
#define FQ_TILE_RELEASE() emulated::release()
#define FQ_TILE_ZERO(t) emulated::zero(t)
#define FQ_TILE_LOAD(t, base, stride) emulated::load(t, base, stride)
#define FQ_TILE_STORE(t, base, stride) emulated::store(t, base, stride)
#define FQ_TILE_DP(XU8, WU8, c, a, b) emulated::dp<XU8, WU8>(c, a, b)

#else  // the instructions
// GCC's tile intrinsics are asm statements that declare no memory input (ldtilecfg: 8 bytes of
// it): without a compiler barrier, stores to a buffer that a tile load reads next (the INT4
// widening, the config) could be moved past it or dropped.
#define FQ_COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")
#define FQ_TILE_CONFIG(cfg)    \
  do {                         \
    FQ_COMPILER_BARRIER();     \
    _tile_loadconfig(cfg);     \
  } while (0)
#define FQ_TILE_RELEASE() _tile_release()
#define FQ_TILE_ZERO(t) _tile_zero(t)
#define FQ_TILE_LOAD(t, base, stride) \
  do {                                \
    FQ_COMPILER_BARRIER();            \
    _tile_loadd(t, base, stride);     \
  } while (0)
#define FQ_TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define FQ_TILE_DP(XU8, WU8, c, a, b)                 \
  do {                                                \
    if constexpr (XU8 && WU8) _tile_dpbuud(c, a, b);  \
    else if constexpr (XU8) _tile_dpbusd(c, a, b);    \
    else if constexpr (WU8) _tile_dpbsud(c, a, b);    \
    else _tile_dpbssd(c, a, b);                       \
  } while (0)
#endif

// ---- the layout -------------------------------------------------------------------------------
// Panels of 16 output channels (N padded to a multiple of 16); each K-block padded with zeros to a
// multiple of 64 (block_padded), Kp = padded total K, chunks = Kp / 64. One B tile (panel p, chunk
// c) is contiguous: with j = channel % 16 and kc = k % 64,
//   8-bit: packed[(p * chunks + c) * 1024 + (kc / 4) * 64 + j * 4 + kc % 4]
//   4-bit: the same 1024 positions i in 512 bytes: i < 512 in the low nibble of byte i, else the
//          high nibble of byte i - 512 (two's complement for signed weights), widened to a
//          1024-byte L1 buffer right before its tile load.
// Per-column tables [(strip * nb + block) * 32 + n % 32] (strips of 2 panels, zero for padding
// channels; strip-major so that a task reads its blocks' values as one stream): the scale, zw and
// colsum - kb zw (correct_block's operands).
struct Layout {
  int64_t N = 0, K = 0, nb = 1, bk = 0, Kp = 0, Npad = 0, block_padded = 0;
  int64_t unit = kTileK;  // k per tile step: 64, or 32 (half tiles) where that pads the K-blocks less
  bool w4 = false, wu8 = false;
  QuantSpec act;
  WeightVector<uint8_t> packed;
  WeightVector<float> scale;
  WeightVector<int32_t> zw, colsum_minus;

  int64_t chunks() const { return Kp / kTileK; }
  int64_t tile_bytes() const { return w4 ? kBTileBytes / 2 : kBTileBytes; }
  const uint8_t* b_tile(int64_t panel, int64_t chunk) const {
    return packed.data() + (panel * chunks() + chunk) * tile_bytes();
  }
};

Layout pack(const IntWeight& w, ThreadPool& pool) {
  Layout v;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  v.N = N;
  v.K = K;
  v.nb = nb;
  v.bk = bk;
  v.w4 = w.bits == 4;
  v.wu8 = w.q.dtype() == DType::U8;
  v.act = w.act;
  // K-blocks that would be padded by more than 32 (e.g. 96) take half tiles of 32 k. A half step reads
  // half of each 64-byte A tile row and rows 0-7 or 8-15 of a B tile, so the layouts are the same;
  // it costs more per product than a full step (one block of K = 800: 1,498 GOPS against 1,758
  // padded to 832), so a single block is padded to 64 instead.
  v.unit = nb > 1 && round_up(bk, kTileK / 2) < round_up(bk, kTileK) ? kTileK / 2 : kTileK;
  v.block_padded = round_up(bk, v.unit);
  v.Kp = round_up((nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, v.unit), kTileK);
  v.Npad = round_up(N, kPanel);
  v.packed.assign(static_cast<size_t>((v.Npad / kPanel) * v.chunks() * v.tile_bytes()), 0);
  const int64_t table = nb * round_up(N, 2 * kPanel);
  v.scale.assign(static_cast<size_t>(table), 0.f);
  v.zw.assign(static_cast<size_t>(table), 0);
  v.colsum_minus.assign(static_cast<size_t>(table), 0);
  const uint8_t* q = static_cast<const uint8_t*>(w.q.raw());  // I8 or U8: the bytes as stored
  const float* sw = w.scale.data<float>();
  const uint8_t* zw = v.wu8 ? w.zero_point.data<uint8_t>() : nullptr;
  // Channels own disjoint bytes (INT4 nibble pairs join rows r and r + 8 of one channel).
  parallel_for(pool, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t panel = n / kPanel, j = n % kPanel, g = n / w.tile_rows;
      uint8_t* column = v.packed.data() + panel * v.chunks() * v.tile_bytes() + j * 4;  // its word in tile row 0
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
        const int64_t kk0 = b * v.block_padded;  // position in the padded K (a multiple of 32)
        if (!v.w4) {
          // 8-bit: the panel's tiles are consecutive, so its words for 4 k each are 64 bytes apart throughout.
          pack_vnni_words(q + n * K + k0, kb, 8, 0, column + kk0 / 4 * kTileK, kTileK);
        } else {
          // 4-bit: a word's 4 k at chunk position kc go to row (kc % 32) / 4, low nibbles for kc < 32, else high.
          for (int64_t k = 0; k < kb; k += 4) {
            const int64_t kk = kk0 + k, kc = kk % kTileK;
            uint32_t word = 0;
            std::memcpy(&word, q + n * K + k0 + k, static_cast<size_t>(std::min<int64_t>(4, kb - k)));
            word = (word & 0x0f0f0f0fu) << (kc < kTileK / 2 ? 0 : 4);
            uint8_t* at = column + (kk / kTileK) * v.tile_bytes() + (kc % (kTileK / 2)) / 4 * kTileK;
            uint32_t old;
            std::memcpy(&old, at, 4);
            old |= word;
            std::memcpy(at, &old, 4);
          }
        }
        const size_t col = static_cast<size_t>(((n / (2 * kPanel)) * nb + b) * 2 * kPanel + n % (2 * kPanel));
        const int32_t z = zw ? zw[g * nb + b] : 0;
        v.scale[col] = sw[g * nb + b];
        v.zw[col] = z;
        v.colsum_minus[col] = w.colsum[n * nb + b] - static_cast<int32_t>(kb) * z;
      }
    }
  });
  return v;
}

// One INT4 B tile (512 bytes) widened to its 1024 int8 / uint8 values.
template <bool WU8>
FQ_AMX inline void widen_int4(const uint8_t* src, uint8_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < kBTileBytes / 2; ++i) {
    const uint8_t lo = src[i] & 0x0f, hi = static_cast<uint8_t>(src[i] >> 4);
    dst[i] = WU8 ? lo : static_cast<uint8_t>((lo ^ 8) - 8);  // sign-extended nibble
    dst[i + kBTileBytes / 2] = WU8 ? hi : static_cast<uint8_t>((hi ^ 8) - 8);
  }
}
// Half of it: rows 0-7 (the low nibbles, half 0) or 8-15 (the high ones) into 512 bytes.
template <bool WU8>
FQ_AMX inline void widen_int4_half(const uint8_t* src, int half, uint8_t* dst) {
  const int shift = 4 * half;
#pragma omp simd
  for (int64_t i = 0; i < kBTileBytes / 2; ++i) {
    const uint8_t n = static_cast<uint8_t>(src[i] >> shift) & 0x0f;
    dst[i] = WU8 ? n : static_cast<uint8_t>((n ^ 8) - 8);
  }
}

// ---- one call ---------------------------------------------------------------------------------
struct Ctx {
  int64_t M;
  const uint8_t* xp;      // quantized rows (s8 or u8) as A tiles, [M/16][Kp/64][16][64]; rows >= M stale
  const int32_t* rowsum;  // [M, nb]
  const float* sx;        // [M]
  const int32_t* zx;      // [M]; null when symmetric
  const Layout* v;
  const TileConfig* cfg;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

// ---- the epilogue of one 32 x 32 tile ----------------------------------------------------------
// acc: one K-block's int32 sums of rows x (16 nt) outputs; out: the fp32 sums over the blocks so
// far (not read for block 0: the sum starts at 0). Per output, the block's exact correction, then
// out = fma(sw, float(corrected), out): the reference's operations in its order (correct_block,
// accumulate_block); the row's sx multiplies the sum when it is stored (dequantize_sum).
using TileI32 = int32_t[2 * kTileRows][2 * kPanel];
using TileF32 = float[2 * kTileRows][2 * kPanel];

#if FQ_KERNEL_EMULATE
template <bool XU8, bool WU8>
inline void accumulate_tile(const Ctx& c, int64_t m0, int64_t rows, int nt, int64_t strip, int64_t b,
                            const int32_t (*acc)[2 * kPanel], TileF32& out) {
  const Layout& v = *c.v;
  const int64_t col = (strip * v.nb + b) * 2 * kPanel;  // padding channels read zeros
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const int32_t zxm = c.zx ? c.zx[m] : 0, rs = c.rowsum[m * v.nb + b];
    for (int64_t j = 0; j < nt * kPanel; ++j)
      out[i][j] = accumulate_block(b == 0 ? 0.f : out[i][j], v.scale[col + j],
                                   correct_block(acc[i][j], zxm, v.colsum_minus[col + j], v.zw[col + j], rs));
  }
}
// y = act(sx * out + bias) for the real rows x cols outputs (dequantize_sum, finish_output).
inline void store_tile(const Ctx& c, int64_t m0, int64_t rows, int64_t n0, int64_t cols, const TileF32& out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c.y[(m0 + i) * c.v->N + n0 + j] = finish_output(dequantize_sum(c.sx[m0 + i], out[i][j]), c.bias != nullptr,
                                                      c.bias ? c.bias[n0 + j] : 0.f, c.epilogue);
}
#else
// The same operations, 16 channels per zmm (act_math_avx512.h rounds like act_math.h).
// The terms of a symmetric side are zero (zx = 0, zw = 0) and skipped.
// sum + one block's contribution to 16 outputs of a row (table columns t..): the block's exact
// correction of the int32 sums acc, then fma(sw, float(corrected), sum).
template <bool XU8, bool WU8>
FQ_AMX inline __m512 add_block(const Layout& v, int64_t t, __m512i acc, __m512i zx, __m512i rs, __m512 sum) {
  if (XU8) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zx, _mm512_loadu_si512(v.colsum_minus.data() + t)));
  if (WU8) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_loadu_si512(v.zw.data() + t), rs));
  return _mm512_fmadd_ps(_mm512_loadu_ps(v.scale.data() + t), _mm512_cvtepi32_ps(acc), sum);
}

template <bool XU8, bool WU8>
FQ_AMX inline void accumulate_tile(const Ctx& c, int64_t m0, int64_t rows, int nt, int64_t strip, int64_t b,
                                   const int32_t (*acc)[2 * kPanel], TileF32& out) {
  const Layout& v = *c.v;
  const int64_t col = (strip * v.nb + b) * 2 * kPanel;  // padding channels read zeros
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i;
    const __m512i zx = _mm512_set1_epi32(XU8 ? c.zx[m] : 0), rs = _mm512_set1_epi32(c.rowsum[m * v.nb + b]);
    for (int j = 0; j < nt; ++j) {
      const __m512 sum = b == 0 ? _mm512_setzero_ps() : _mm512_load_ps(&out[i][j * kPanel]);
      _mm512_store_ps(&out[i][j * kPanel], add_block<XU8, WU8>(v, col + j * kPanel, _mm512_load_si512(&acc[i][j * kPanel]),
                                                               zx, rs, sum));
    }
  }
}
FQ_AMX inline void store_tile(const Ctx& c, int64_t m0, int64_t rows, int64_t n0, int64_t cols, const TileF32& out) {
  for (int64_t j = 0; j < cols; j += kPanel)
    for (int64_t i = 0; i < rows; ++i)
      store_activated(c.y + (m0 + i) * c.v->N + n0 + j, c.bias ? c.bias + n0 + j : nullptr, cols - j,
                      _mm512_mul_ps(_mm512_set1_ps(c.sx[m0 + i]), _mm512_load_ps(&out[i][j])), c.epilogue);
}
#endif

#if !FQ_KERNEL_EMULATE
// ---- decode-sized M: vpdpbusd on the same B tiles ----------------------------------------------
// A B tile's 64-byte row r is one zmm: 16 channels x k 4r..4r+3, what vpdpbusd multiplies with a
// broadcast quad of one activation row (an A tile would carry 15 zero rows at M = 1). vpdpbusd takes
// u8 x s8, so the weight operand is moved into the range the activations leave free:
//   8-bit, x and w of the same signedness: w ^ 0x80 (= w + 128 as u8, or w - 128 as s8);
//   INT4: the nibble as stored (unsigned weights: already in [0, 15], a valid u8 and s8) or, for
//         signed weights, nibble ^ 8 = w + 8 in [0, 15]; one 64-byte load serves tile rows r and
//         r + 8 (low and high nibbles).
// The exact sums are restored by -+ offset * rowsum, so they equal the tile path's and the epilogue
// is shared. Rows m0.. (R of them, within one A tile) x the strip's channels, the padded positions
// [kk0, kk1) of block b. Decode streams the weight once: the B tiles are prefetched a few chunks
// ahead, as in the tile loop.
// acc += x . w with the activations on their side of vpdpbusd (u8 x s8).
template <bool XU8>
FQ_AMX inline __m512i dot(__m512i acc, __m512i x, __m512i w) {
  return XU8 ? _mm512_dpbusd_epi32(acc, x, w) : _mm512_dpbusd_epi32(acc, w, x);
}
// Quad r (k 4r..4r+3) of row i of the A tile at a, in every lane.
FQ_AMX inline __m512i quad(const uint8_t* a, int i, int r) {
  int32_t q;
  std::memcpy(&q, a + i * kTileK + r * 4, 4);
  return _mm512_set1_epi32(q);
}

template <int R, bool XU8, bool WU8, bool W4>
FQ_AMX void vnni_rows(const Ctx& c, int64_t m0, int64_t strip, int nt, int64_t b, int64_t kk0, int64_t kk1,
                      int32_t (*acc_out)[2 * kPanel]) {
  const Layout& v = *c.v;
  // offset: what the operand adds to each weight; sign: +1 if the u8 side is the weight.
  constexpr int32_t offset = W4 ? (WU8 ? 0 : 8) : (XU8 == WU8 ? (XU8 ? -128 : 128) : 0);
  const __m512i nibble = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8), high = _mm512_set1_epi8(-128);
  // Two sums per output vector (even / odd quads, or an INT4 load's low / high nibbles), so a row has
  // four vpdpbusd chains, not two behind its latency: 1 x 2304 x 768 W8A8 asymmetric 14.7-15.0 -> 11.9 us,
  // other decode shapes 0-10%, GPT-2 decode within noise (DESIGN.md 5.4); int32 sums are exact in any order.
  __m512i acc[R][2][2];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc[i][0][0] = acc[i][1][0] = acc[i][0][1] = acc[i][1][1] = _mm512_setzero_si512();
  const uint8_t* rows = c.xp + (m0 / kTileRows) * kTileRows * v.Kp + (m0 % kTileRows) * kTileK;
  const int64_t panel1 = nt == 2 ? 2 * strip + 1 : 2 * strip;  // a lone last panel: computed twice, stored once
  // Chunk by chunk (64 padded positions, 16 quads: quad r of a chunk is row r of its tiles).
  for (int64_t ch = kk0 / kTileK; ch * kTileK < kk1; ++ch) {
    const int r0 = static_cast<int>(std::max<int64_t>(kk0 - ch * kTileK, 0) / 4);
    const int r1 = static_cast<int>(std::min<int64_t>(kk1 - ch * kTileK, kTileK) / 4);
    const uint8_t* bt[2] = {v.b_tile(2 * strip, ch), v.b_tile(panel1, ch)};
    const uint8_t* a = rows + ch * kBTileBytes;
    if (r0 == 0)  // this chunk's first visit: the tiles kPrefetchChunks ahead (may run into the next panel)
      for (int64_t l = 0; l < v.tile_bytes(); l += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(bt[0] + kPrefetchChunks * v.tile_bytes() + l), _MM_HINT_T0);
        if (nt == 2) _mm_prefetch(reinterpret_cast<const char*>(bt[1] + kPrefetchChunks * v.tile_bytes() + l), _MM_HINT_T0);
      }
    if (W4) {
      // Rows r (low nibbles) and r + 8 (high) of one load; a half-tile block covers rows 0-7 or 8-15.
      const bool lo = r0 < 8, hi = r1 > 8;
      for (int r = r0 & 7; r < ((r1 - 1) & 7) + 1; ++r) {
        __m512i wl[2], wh[2];
#pragma GCC unroll 2
        for (int j = 0; j < 2; ++j) {
          const __m512i raw = _mm512_loadu_si512(bt[j] + r * kTileK);
          wl[j] = _mm512_and_si512(raw, nibble);
          wh[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
          if (!WU8) {
            wl[j] = _mm512_xor_si512(wl[j], eight);
            wh[j] = _mm512_xor_si512(wh[j], eight);
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          if (lo) {
            const __m512i x = quad(a, i, r);
            acc[i][0][0] = dot<XU8>(acc[i][0][0], x, wl[0]);
            acc[i][1][0] = dot<XU8>(acc[i][1][0], x, wl[1]);
          }
          if (hi) {
            const __m512i x = quad(a, i, r + 8);
            acc[i][0][1] = dot<XU8>(acc[i][0][1], x, wh[0]);
            acc[i][1][1] = dot<XU8>(acc[i][1][1], x, wh[1]);
          }
        }
      }
    } else {
      // Quads in pairs, the first of each into sums 0, the second into sums 1 (r1 - r0 may be odd).
      for (int r = r0; r < r1; r += 2) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && r + 1 >= r1) break;
          __m512i w[2];
#pragma GCC unroll 2
          for (int j = 0; j < 2; ++j) {
            w[j] = _mm512_loadu_si512(bt[j] + (r + h) * kTileK);
            if (offset != 0) w[j] = _mm512_xor_si512(w[j], high);
          }
#pragma GCC unroll 8
          for (int i = 0; i < R; ++i) {
            const __m512i x = quad(a, i, r + h);
            acc[i][0][h] = dot<XU8>(acc[i][0][h], x, w[0]);
            acc[i][1][h] = dot<XU8>(acc[i][1][h], x, w[1]);
          }
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const __m512i fix = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset) *
                                                               static_cast<uint32_t>(c.rowsum[(m0 + i) * v.nb + b])));
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j)
      _mm512_storeu_si512(&acc_out[i][j * kPanel], _mm512_sub_epi32(_mm512_add_epi32(acc[i][j][0], acc[i][j][1]), fix));
  }
}

template <bool XU8, bool WU8, bool W4>
FQ_AMX void vnni_block(const Ctx& c, int64_t m0, int64_t rows, int64_t strip, int nt, int64_t b, int64_t kk0,
                       int64_t kk1, int32_t (*acc)[2 * kPanel]) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) vnni_rows<4, XU8, WU8, W4>(c, m0 + i, strip, nt, b, kk0, kk1, acc + i);
  if (i + 2 <= rows) {
    vnni_rows<2, XU8, WU8, W4>(c, m0 + i, strip, nt, b, kk0, kk1, acc + i);
    i += 2;
  }
  if (i < rows) vnni_rows<1, XU8, WU8, W4>(c, m0 + i, strip, nt, b, kk0, kk1, acc + i);
}
#endif

// A single-block tile's int32 sums waiting for their epilogue: run_task keeps two, and the next
// tile loop finishes the previous tile a few rows per 64-k chunk, so the epilogue's vector work
// runs beside the tile instructions and the drain (the last tdpb*d results before the tile
// stores) no longer stalls it.
struct PendingTile {
  int64_t m0 = -1, strip = 0;
  int nt = 0, mt = 0;
  alignas(64) TileI32 acc;
};

// Rows [r0, r1) of a pending (single-block) tile, clamped to its real rows: epilogue and store.
template <bool XU8, bool WU8>
FQ_AMX void finish_pending(const Ctx& c, const PendingTile& p, int64_t r0, int64_t r1) {
  r1 = std::min<int64_t>(r1, std::min<int64_t>(p.mt * kTileRows, c.M - p.m0));
  if (r0 >= r1) return;
  const int64_t n0 = p.strip * 2 * kPanel, cols = std::min<int64_t>(p.nt * kPanel, c.v->N - n0);
#if FQ_KERNEL_EMULATE
  alignas(64) TileF32 out;
  accumulate_tile<XU8, WU8>(c, p.m0 + r0, r1 - r0, p.nt, p.strip, 0, p.acc + r0, out);
  store_tile(c, p.m0 + r0, r1 - r0, n0, cols, out);
#else
  // accumulate_tile + store_tile in one pass, without the fp32 tile in between.
  const Layout& v = *c.v;
  const int64_t col = p.strip * v.nb * 2 * kPanel;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t m = p.m0 + i;
    const __m512i zx = _mm512_set1_epi32(XU8 ? c.zx[m] : 0), rs = _mm512_set1_epi32(c.rowsum[m]);
    const __m512 sx = _mm512_set1_ps(c.sx[m]);
    for (int64_t j = 0; j < cols; j += kPanel)
      store_activated(
          c.y + m * v.N + n0 + j, c.bias ? c.bias + n0 + j : nullptr, cols - j,
          _mm512_mul_ps(sx, add_block<XU8, WU8>(v, col + j, _mm512_load_si512(&p.acc[i][j]), zx, rs, _mm512_setzero_ps())),
          c.epilogue);
  }
#endif
}

// Rows m0.. (mt row tiles, of which `rows` are real) x channels of panels 2 strip.. (nt panels)
// over every K-block. The task's thread has the tile config loaded. With `next` (single-block
// weights on the tiles) the sums go there and wait; `prev`'s pending tile, if any, is finished
// on the way.
template <bool XU8, bool WU8, bool W4>
FQ_AMX void micro_kernel(const Ctx& c, int64_t m0, int mt, int64_t strip, int nt, PendingTile* next,
                         PendingTile* prev) {
  const Layout& v = *c.v;
  const int64_t rows = std::min<int64_t>(mt * kTileRows, c.M - m0), n0 = strip * 2 * kPanel;
  const int64_t cols = std::min<int64_t>(nt * kPanel, v.N - n0);
  // The C tiles of a block; with several blocks, block b's epilogue runs while block b + 1's tile
  // instructions are in flight (the sums of two blocks are alive).
  alignas(64) TileI32 own[2];
  alignas(64) uint8_t wide[2][kBTileBytes];  // INT4: the widened B tiles
  alignas(64) TileF32 out;                   // the fp32 sums over blocks (block 0 adds to 0, as the reference)
  const int64_t unit = v.unit, step_bytes = unit * kPanel;  // B bytes (8-bit) per panel and tile step
  bool tiled = false;
  for (int64_t b = 0; b < v.nb; ++b) {
    int32_t(*acc)[2 * kPanel] = next ? next->acc : own[b & 1];
    const int64_t kb = std::min(v.K, b * v.bk + v.bk) - b * v.bk;
    const int64_t kk0 = b * v.block_padded, kk1 = kk0 + round_up(kb, unit);  // padded positions
#if !FQ_KERNEL_EMULATE
    if (c.M <= kVnniMaxRows) {
      vnni_block<XU8, WU8, W4>(c, m0, rows, strip, nt, b, kk0, kk1, acc);
      accumulate_tile<XU8, WU8>(c, m0, rows, nt, strip, b, acc, out);
      continue;
    }
#endif
    tiled = true;
    FQ_TILE_ZERO(0);
    if (nt == 2) FQ_TILE_ZERO(1);
    if (mt == 2) {
      FQ_TILE_ZERO(2);
      if (nt == 2) FQ_TILE_ZERO(3);
    }
    const bool overlap = next && prev->m0 >= 0;
    const int64_t steps = (kk1 - kk0) / unit, slice = (2 * kTileRows + steps - 1) / steps;  // rows per step
    for (int64_t kk = kk0; kk < kk1; kk += unit) {
      const int64_t ch = kk / kTileK, half = (kk % kTileK) / (kTileK / 2);  // half: of a 64-k tile
      const uint8_t* a = c.xp + m0 * v.Kp + ch * kBTileBytes + half * (kTileK / 2);  // A tile (m0 / 16, ch)
      FQ_TILE_LOAD(4, a, kTileK);
      if (mt == 2) FQ_TILE_LOAD(5, a + kTileRows * v.Kp, kTileK);
      const uint8_t* b0 = v.b_tile(2 * strip, ch);
      const uint8_t* b1 = nt == 2 ? v.b_tile(2 * strip + 1, ch) : nullptr;
#if !FQ_KERNEL_EMULATE
      // The B tiles 2 chunks ahead from L2/L3 into L1 (a strip's tiles are a sequential stream per
      // panel): 10-16% at 2 threads on the BERT shapes; prefetching A tiles lost.
      if (half == 0 && kk + kPrefetchChunks * kTileK < kk1)
        for (int64_t l = 0; l < v.tile_bytes(); l += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(b0 + kPrefetchChunks * v.tile_bytes() + l), _MM_HINT_T0);
          if (nt == 2) _mm_prefetch(reinterpret_cast<const char*>(b1 + kPrefetchChunks * v.tile_bytes() + l), _MM_HINT_T0);
        }
#endif
      if (W4) {
        if (unit == kTileK) {
          widen_int4<WU8>(b0, wide[0]);
          if (nt == 2) widen_int4<WU8>(b1, wide[1]);
        } else {
          widen_int4_half<WU8>(b0, static_cast<int>(half), wide[0]);
          if (nt == 2) widen_int4_half<WU8>(b1, static_cast<int>(half), wide[1]);
        }
        b0 = wide[0];
        b1 = wide[1];
      } else {
        b0 += half * step_bytes;  // rows 8-15 of the tile
        b1 = nt == 2 ? b1 + half * step_bytes : nullptr;
      }
      FQ_TILE_LOAD(6, b0, kTileK);
      if (nt == 2) FQ_TILE_LOAD(7, b1, kTileK);
      FQ_TILE_DP(XU8, WU8, 0, 4, 6);
      if (nt == 2) FQ_TILE_DP(XU8, WU8, 1, 4, 7);
      if (mt == 2) {
        FQ_TILE_DP(XU8, WU8, 2, 5, 6);
        if (nt == 2) FQ_TILE_DP(XU8, WU8, 3, 5, 7);
      }
      if (overlap) {
        const int64_t i = (kk - kk0) / unit;
        finish_pending<XU8, WU8>(c, *prev, i * slice, (i + 1) * slice);
      }
    }
    if (b > 0 && !next) accumulate_tile<XU8, WU8>(c, m0, rows, nt, strip, b - 1, own[(b - 1) & 1], out);
    constexpr int64_t stride = 2 * kPanel * sizeof(int32_t);
    FQ_TILE_STORE(0, &acc[0][0], stride);
    if (nt == 2) FQ_TILE_STORE(1, &acc[0][kPanel], stride);
    if (mt == 2) {
      FQ_TILE_STORE(2, &acc[kTileRows][0], stride);
      if (nt == 2) FQ_TILE_STORE(3, &acc[kTileRows][kPanel], stride);
    }
    if (next) {  // this tile becomes pending (the previous one is finished)
      next->m0 = m0;
      next->strip = strip;
      next->nt = nt;
      next->mt = mt;
      return;
    }
  }
  if (tiled) accumulate_tile<XU8, WU8>(c, m0, rows, nt, strip, v.nb - 1, own[(v.nb - 1) & 1], out);
  store_tile(c, m0, rows, n0, cols, out);
}

using MicroFn = void (*)(const Ctx&, int64_t, int, int64_t, int, PendingTile*, PendingTile*);
using FinishFn = void (*)(const Ctx&, const PendingTile&, int64_t, int64_t);

template <bool XU8>
MicroFn pick_weight(bool wu8, bool w4) {
  if (wu8) return w4 ? micro_kernel<XU8, true, true> : micro_kernel<XU8, true, false>;
  return w4 ? micro_kernel<XU8, false, true> : micro_kernel<XU8, false, false>;
}

FinishFn pick_finish(bool xu8, bool wu8) {
  if (xu8) return wu8 ? finish_pending<true, true> : finish_pending<true, false>;
  return wu8 ? finish_pending<false, true> : finish_pending<false, false>;
}

// One pool task: its own tile config, released at the end (the thread may next run other code).
// Rows [m0, m1) x strips [s0, s1); calls that take vpdpbusd need no tile config.
FQ_AMX void run_task(const Ctx& c, MicroFn micro, FinishFn finish, int64_t m0, int64_t m1, int64_t s0,
                     int64_t s1) {
  const int64_t panels = c.v->Npad / kPanel;
#if FQ_KERNEL_EMULATE
  const bool tiles = true;  // the emulation runs the tiles at every M
#else
  const bool tiles = c.M > kVnniMaxRows;
#endif
  const bool defer = tiles && c.v->nb == 1;
  PendingTile pending[2];
  int slot = 0;
  if (tiles) FQ_TILE_CONFIG(c.cfg);
  for (int64_t strip = s0; strip < s1; ++strip)
    for (int64_t m = m0; m < m1; m += 2 * kTileRows, slot ^= 1)
      micro(c, m, m1 - m > kTileRows ? 2 : 1, strip, 2 * strip + 1 < panels ? 2 : 1,
            defer ? &pending[slot] : nullptr, &pending[slot ^ 1]);
  if (tiles) FQ_TILE_RELEASE();
  if (defer && pending[slot ^ 1].m0 >= 0) finish(c, pending[slot ^ 1], 0, 2 * kTileRows);  // the last tile
}

class AmxIntLinear final : public CpuLinear {
 public:
  AmxIntLinear(const IntWeight& w, ThreadPool& pool) : v_(pack(w, pool)), cfg_(tile_config(v_.unit)) {
    N = w.N;
    K = w.K;
    for (const MemorySpan& s : {span_of(v_.packed), span_of(v_.scale), span_of(v_.zw), span_of(v_.colsum_minus)})
      if (s.bytes) streamed.push_back(s);
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const Layout& v = v_;
    const int64_t M = x.rows;
    ThreadPool& pool = ctx.threads();
    const RowLayout rows{v.K, v.nb, v.bk, v.block_padded, v.Kp, kTileRows};  // A tiles: 1 KiB each, contiguous
    thread_local RowScratch scratch;
    const QuantizedRows q = scratch.resize(round_up(M, kTileRows), rows);  // whole A tiles
#if FQ_KERNEL_EMULATE
    quantize_rows_into(x, rows, v.act, q, pool);
#else
    quantize_rows_into_avx512(x, rows, v.act, q, pool);
#endif
    const bool xu8 = !v.act.symmetric;
    const Ctx c{M, q.xp, q.rowsum, q.sx, xu8 ? q.zx : nullptr,
                &v, &cfg_, bias.defined() ? bias.data<float>() : nullptr, y, epilogue};
    const MicroFn micro = xu8 ? pick_weight<true>(v.wu8, v.w4) : pick_weight<false>(v.wu8, v.w4);
    const FinishFn finish = pick_finish(xu8, v.wu8);
    // Row chunks x runs of strips of 32 channels (2 panels; the last strip may have 1). Decode-sized
    // M is one chunk, so the weight is read once and the threads split the channels. Runs of up to
    // 4 strips, at least 4 runs per thread: a pool task per strip cost 5% in GPT-2 decode and 10-25%
    // at M = 128-512 (BERT shapes, 2 threads). Decode (M <= 4): guided_runs.
    const int64_t strips = (v.Npad / kPanel + 1) / 2;
    const WorkRuns runs = M <= kVnniMaxRows
                              ? guided_runs(strips, pool.size())
                              : uniform_runs(strips, std::clamp<int64_t>(strips / (4 * pool.size()), 1, 4));
    const int64_t mc = M <= 128 ? M : 128, mchunks = (M + mc - 1) / mc;
    pool.run(mchunks * runs.count, [&](int64_t t) {
      const int64_t m0 = (t / runs.count) * mc, r = t % runs.count;
      run_task(c, micro, finish, m0, std::min(M, m0 + mc), runs.begin(r), runs.end(r));
    });
  }

 private:
  Layout v_;  // the only copy of the weight in memory
  TileConfig cfg_;
};

std::unique_ptr<CpuLinear> prepare(IntWeight w, ThreadPool& pool) {
#if !FQ_KERNEL_EMULATE
  // K-blocks shorter than 64 (the INT4 default of 32) go to the AVX512-VNNI kernel (every AMX CPU has
  // it): on half tiles a block's epilogue outweighs its tile work, 1.3-1.4x the VNNI kernel at M >= 32
  // but 0.5-0.8x at M <= 8, i.e. in decode (W4A8 kb32, 2 threads; DESIGN 5.4).
  if (w.num_blocks > 1 && w.tile_cols < kTileK) {
    std::unique_ptr<CpuLinear> p = int_gemm_avx512vnni().prepare(std::move(w), pool);
    p->kernel = "cpu/avx512vnni int";
    return p;
  }
#endif
  return std::make_unique<AmxIntLinear>(w, pool);
}

}  // namespace amx
}  // namespace

IntGemmKernel FQ_AMX_ENTRY() { return {CpuIsa::Amx, amx::prepare}; }

#if !FQ_KERNEL_EMULATE
namespace {
// tdpbssd on 4 independent C tiles from 4 loaded operand tiles, until `seconds` after `start`;
// returns the ops done (2 per multiply-add).
FQ_AMX double amx_peak_loop(std::chrono::steady_clock::time_point start, double seconds) {
  const TileConfig cfg = full_tile_config();
  alignas(64) static const uint8_t operand[amx::kBTileBytes] = {};
  FQ_TILE_CONFIG(&cfg);
  FQ_TILE_LOAD(4, operand, amx::kTileK);
  FQ_TILE_LOAD(5, operand, amx::kTileK);
  FQ_TILE_LOAD(6, operand, amx::kTileK);
  FQ_TILE_LOAD(7, operand, amx::kTileK);
  FQ_TILE_ZERO(0);
  FQ_TILE_ZERO(1);
  FQ_TILE_ZERO(2);
  FQ_TILE_ZERO(3);
  int64_t iters = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    for (int r = 0; r < 1024; ++r) {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    iters += 1024;
  }
  FQ_TILE_RELEASE();
  return static_cast<double>(iters) * 4 * (amx::kTileRows * amx::kPanel * amx::kTileK) * 2;
}

// The same 4 products per step with their 4 operand tiles loaded each step, as a 2 x 2 GEMM tile loop
// does (8 tile registers: 4 C, 2 A, 2 B), from 8 KiB of A and 8 KiB of B that stay in L1: the most
// such a loop can do on this CPU whatever its cache blocking. Loads first, then products, as
// micro_kernel issues them (interleaving them measured the same in a standalone test; DESIGN 5.4).
FQ_AMX double amx_tile_loop(std::chrono::steady_clock::time_point start, double seconds) {
  constexpr int64_t kChunks = 4;  // 4 steps of 64 k over the same operands
  const TileConfig cfg = full_tile_config();
  // Written, 64-byte aligned operands (untouched zeros would all read the one shared zero page).
  alignas(64) uint8_t a[2][kChunks][amx::kBTileBytes], b[2][kChunks][amx::kBTileBytes];
  std::memset(a, 1, sizeof a);
  std::memset(b, 1, sizeof b);
  FQ_TILE_CONFIG(&cfg);
  FQ_TILE_ZERO(0);
  FQ_TILE_ZERO(1);
  FQ_TILE_ZERO(2);
  FQ_TILE_ZERO(3);
  int64_t steps = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    for (int r = 0; r < 256; ++r)
      for (int64_t c = 0; c < kChunks; ++c) {
        FQ_TILE_LOAD(4, a[0][c], amx::kTileK);
        FQ_TILE_LOAD(5, a[1][c], amx::kTileK);
        FQ_TILE_LOAD(6, b[0][c], amx::kTileK);
        FQ_TILE_LOAD(7, b[1][c], amx::kTileK);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    steps += 256 * kChunks;
  }
  FQ_TILE_RELEASE();
  return static_cast<double>(steps) * 4 * (amx::kTileRows * amx::kPanel * amx::kTileK) * 2;
}
}  // namespace

double amx_int8_peak_gops(int threads, double seconds) {
  return cpu_supports(CpuIsa::Amx) ? peak_gops(threads, seconds, amx_peak_loop) : 0.0;
}

double amx_tile_loop_gops(int threads, double seconds) {
  return cpu_supports(CpuIsa::Amx) ? peak_gops(threads, seconds, amx_tile_loop) : 0.0;
}
#endif

#else  // no x86 build: the entry is never selected (the CPU does not support the level)

IntGemmKernel FQ_AMX_ENTRY() { return {CpuIsa::Amx, nullptr}; }
double amx_int8_peak_gops(int, double) { return 0.0; }
double amx_tile_loop_gops(int, double) { return 0.0; }

#endif

}  // namespace kernels
}  // namespace finequant
