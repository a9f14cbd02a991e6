// BF16 products with FP32 sums, for Linears with floating-point inputs when the Engine asks for it
// (EngineOptions::float_precision = "bf16", docs/DESIGN.md section 5.4): an explicit precision
// choice, never made silently. The weight is stored once as bf16 (round to nearest even: half the
// bytes of fp32, what a decode step reads), each call rounds its input rows to bf16
// (vcvtne2ps2bf16), and vdpbf16ps (AVX512-BF16) adds pairs of exact bf16 products to fp32 sums.
//
// Layout: panels of 16 output channels x chunks of 32 k, one contiguous 1 KiB tile each (the form
// of an AMX-BF16 B tile: row r holds k pair 2r, 2r + 1 of the 16 channels):
//   packed[((panel * chunks + c) * 16 + r) * 32 + j * 2 + i] = bf16(W[panel * 16 + j, c * 32 + 2 r + i])
// K padded with zeros to a multiple of 32, N to a multiple of 64 (4 panels per micro-kernel). A
// micro-kernel holds MR rows x 64 channels in 24 zmm; per k pair it loads 4 weight vectors and
// broadcasts MR input pairs. With AMX-BF16 (and the amx level active) calls of kAmxMinRows rows or
// more run tdpbf16ps on the same tiles instead: 32 rows x 32 channels (2 A x 2 B -> 4 C tiles) per
// step, A tiles read from the bf16 rows in place. Both sum each chunk's 32 products before adding
// them to the running fp32 sums, in different orders: results agree to fp32 rounding, not bits.
#include <algorithm>
#include <cstring>

#include "core/convert.h"
#include "kernels/cpu/act_math_avx512.h"
#include "kernels/cpu/amx_tiles.h"
#include "kernels/cpu/gemm.h"

namespace finequant {
namespace kernels {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define FQ_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16")))
#define FQ_AMX_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,amx-tile,amx-bf16")))

namespace {

constexpr int64_t kPanel = 16, kChunk = 32, kTileN = 4 * kPanel, kTileWords = kPanel * kChunk;
constexpr int kMaxMR = 6;
constexpr int64_t kAmxMinRows = 4;  // 2 threads, N=768 K=768: tiles 0.7x vdpbf16ps at M=2, equal at 4, 1.9x at 8

struct Bf16Ctx {
  const uint16_t* x;  // [M, Kp] the input rows as bf16, zero padded
  int64_t M, N, Kp;
  const uint16_t* packed;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

template <int MR>
FQ_BF16 void bf16_micro(const Bf16Ctx& c, int64_t m0, int64_t tile) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t chunks = c.Kp / kChunk;
  const uint16_t* panel0 = c.packed + tile * 4 * chunks * kTileWords;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const uint16_t* xr = c.x + m0 * c.Kp + ch * kChunk;
    for (int r = 0; r < kChunk / 2; ++r) {
      __m512bh w[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        w[j] = (__m512bh)_mm512_loadu_si512(panel0 + (j * chunks + ch) * kTileWords + r * 2 * kPanel);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, xr + i * c.Kp + 2 * r, 4);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, w[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t n0 = tile * kTileN + j * kPanel;
      if (n0 >= c.N) continue;  // padding channels
      store_activated(c.y + (m0 + i) * c.N + n0, c.bias ? c.bias + n0 : nullptr, c.N - n0, acc[i][j], c.epilogue);
    }
  }
}

using Bf16MicroFn = void (*)(const Bf16Ctx&, int64_t, int64_t);

Bf16MicroFn pick_bf16(int mr) {
  switch (mr) {
    case 1: return bf16_micro<1>;
    case 2: return bf16_micro<2>;
    case 3: return bf16_micro<3>;
    case 4: return bf16_micro<4>;
    case 5: return bf16_micro<5>;
    default: return bf16_micro<6>;
  }
}

// AMX-BF16: rows m0.. (mt A tiles) x the 32 channels of panels 2 strip, 2 strip + 1 (nt of them),
// the thread's tile config loaded. x holds whole A tiles (rows past M are zeros or stale: never stored).
FQ_AMX_BF16 void amx_micro(const Bf16Ctx& c, int64_t m0, int mt, int64_t strip, int nt) {
  const int64_t chunks = c.Kp / kChunk, stride = c.Kp * 2;
  const uint16_t* b0 = c.packed + (2 * strip) * chunks * kTileWords;
  const uint16_t* b1 = b0 + chunks * kTileWords;
  const uint16_t* a = c.x + m0 * c.Kp;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    __asm__ __volatile__("" ::: "memory");  // the tile loads read memory the compiler does not see
    _tile_loadd(4, a + ch * kChunk, stride);
    if (mt == 2) _tile_loadd(5, a + kPanel * c.Kp + ch * kChunk, stride);
    _tile_loadd(6, b0 + ch * kTileWords, 64);
    if (nt == 2) _tile_loadd(7, b1 + ch * kTileWords, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (nt == 2) _tile_dpbf16ps(1, 4, 7);
    if (mt == 2) {
      _tile_dpbf16ps(2, 5, 6);
      if (nt == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float acc[2 * kPanel][2 * kPanel];
  _tile_stored(0, &acc[0][0], 2 * kPanel * 4);
  _tile_stored(1, &acc[0][kPanel], 2 * kPanel * 4);
  _tile_stored(2, &acc[kPanel][0], 2 * kPanel * 4);
  _tile_stored(3, &acc[kPanel][kPanel], 2 * kPanel * 4);
  const int64_t rows = std::min<int64_t>(mt * kPanel, c.M - m0), n0 = strip * 2 * kPanel;
  for (int j = 0; j < nt; ++j) {
    const int64_t n = n0 + j * kPanel;
    if (n >= c.N) break;  // a padding panel
    for (int64_t i = 0; i < rows; ++i)
      store_activated(c.y + (m0 + i) * c.N + n, c.bias ? c.bias + n : nullptr, c.N - n, _mm512_load_ps(&acc[i][j * kPanel]),
                      c.epilogue);
  }
}

FQ_AMX_BF16 void amx_task(const Bf16Ctx& c, int64_t m0, int64_t m1, int64_t strip, int nt) {
  const TileConfig cfg = full_tile_config();
  _tile_loadconfig(&cfg);
  for (int64_t m = m0; m < m1; m += 2 * kPanel) amx_micro(c, m, m1 - m > kPanel ? 2 : 1, strip, nt);
  _tile_release();
}

// Row m of x (a fused norm computed on the way) as bf16 into dst, Kp values, zero padded.
FQ_BF16 void round_row(const RowInput& x, int64_t m, float* scratch, uint16_t* dst, int64_t Kp) {
  const float* row = x.row(m, scratch);
  const int64_t K = x.cols;
  for (int64_t k = 0; k < Kp; k += 32) {
    const __mmask16 lo = k >= K ? 0 : (K - k >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1));
    const __mmask16 hi = k + 16 >= K ? 0 : (K - k - 16 >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (K - k - 16)) - 1));
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + k + 16), _mm512_maskz_loadu_ps(lo, row + k));
    _mm512_storeu_si512(dst + k, (__m512i)v);
  }
}

class Bf16Linear final : public CpuLinear {
 public:
  Bf16Linear(const Tensor& w, ThreadPool& pool)
      : amx_(cpu_has_amx_bf16() && kernel_eligible(CpuIsa::Amx, active_isa())) {
    N = w.dim(0);
    K = w.dim(1);
    Kp_ = (K + kChunk - 1) / kChunk * kChunk;
    const int64_t tiles = (N + kTileN - 1) / kTileN, chunks = Kp_ / kChunk;
    packed_.assign(static_cast<size_t>(tiles * kTileN * Kp_), 0);
    const float* src = w.data<float>();
    parallel_for(pool, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t panel = n / kPanel, j = n % kPanel;
        for (int64_t k = 0; k < K; ++k)
          packed_[static_cast<size_t>(((panel * chunks + k / kChunk) * (kChunk / 2) + (k % kChunk) / 2) * 2 * kPanel +
                                      j * 2 + k % 2)] = float_to_bf16(src[n * K + k]);
      }
    });
    streamed.push_back(span_of(packed_));
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const int64_t M = x.rows;
    ThreadPool& pool = ctx.threads();
    const bool tiles = amx_ && M >= kAmxMinRows;
    thread_local AlignedVector<uint16_t> rows_bf16;
    rows_bf16.resize(static_cast<size_t>((tiles ? (M + 2 * kPanel - 1) / (2 * kPanel) * 2 * kPanel : M) * Kp_));
    uint16_t* xb = rows_bf16.data();  // worker threads must not name the thread_local
    parallel_for(pool, M, 1, [&](int64_t r0, int64_t r1) {
      thread_local AlignedVector<float> scratch;  // a computed row (fused producer)
      scratch.resize(static_cast<size_t>(K));
      for (int64_t m = r0; m < r1; ++m) round_row(x, m, scratch.data(), xb + m * Kp_, Kp_);
    });
    const Bf16Ctx c{xb, M, N, Kp_, packed_.data(), bias.defined() ? bias.data<float>() : nullptr, y, epilogue};
    const int64_t tiles64 = (N + kTileN - 1) / kTileN;
    if (tiles) {  // row chunks x strips of 32 channels (the packed N is a multiple of 64: whole strips)
      const int64_t strips = tiles64 * 2, mc = std::min<int64_t>(M, 128), mchunks = (M + mc - 1) / mc;
      const int64_t panels = (N + kPanel - 1) / kPanel;
      pool.run(mchunks * strips, [&](int64_t t) {
        const int64_t m0 = (t / strips) * mc, strip = t % strips;
        if (2 * strip < panels) amx_task(c, m0, std::min(M, m0 + mc), strip, 2 * strip + 1 < panels ? 2 : 1);
      });
      return;
    }
    const int64_t mc = M <= 24 ? M : 96, mchunks = (M + mc - 1) / mc;
    pool.run(mchunks * tiles64, [&](int64_t t) {
      const int64_t m0 = (t / tiles64) * mc, m1 = std::min(M, m0 + mc), tile = t % tiles64;
      int64_t m = m0;
      for (; m + kMaxMR <= m1; m += kMaxMR) bf16_micro<kMaxMR>(c, m, tile);
      if (m < m1) pick_bf16(static_cast<int>(m1 - m))(c, m, tile);
    });
  }

 private:
  bool amx_;  // tdpbf16ps for calls of kAmxMinRows rows or more
  int64_t Kp_ = 0;
  WeightVector<uint16_t> packed_;  // the only copy of the weight in memory
};

std::unique_ptr<CpuLinear> prepare_bf16(Tensor w, ThreadPool& pool) { return std::make_unique<Bf16Linear>(w, pool); }

}  // namespace

F32GemmKernel f32_gemm_bf16_avx512() { return {CpuIsa::Avx512Vnni, prepare_bf16}; }

#else

F32GemmKernel f32_gemm_bf16_avx512() { return {CpuIsa::Avx512Vnni, nullptr}; }

#endif

}  // namespace kernels
}  // namespace finequant
