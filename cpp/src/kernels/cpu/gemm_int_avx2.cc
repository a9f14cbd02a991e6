// AVX2 integer GEMM for CPUs without AVX512-VNNI; bit-identical to gemm_int_ref.
//
// vpmaddubsw would saturate on u8 x s8 pairs, so both operands are widened to int16 and multiplied
// with vpmaddwd: each int32 lane gets q[n, k] x[k] + q[n, k+1] x[k+1], the exact products of the
// stored values (no operand shifts to undo). Weights stay one byte each in the packed layout
// (Avx2IntLinear below) and are widened in registers; the activation rows are quantized with
// quantize_rows and widened once per call. The integer sums are vectorized; the correction and
// the fp32 epilogue are the reference's own scalar expressions (this file is compiled with
// -ffp-contract=off), so the outputs match it bit for bit.
#include <algorithm>
#include <cstring>

#include "kernels/cpu/gemm.h"


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_AVX2_BUILD 1
#include <immintrin.h>
#define FQ_AVX2 __attribute__((target("avx2")))
#else
#define FQ_AVX2_BUILD 0
#endif

namespace finequant {
namespace kernels {

#if FQ_AVX2_BUILD

namespace {

constexpr int64_t kTile = 16;  // output channels per micro-kernel: 2 ymm of int32
constexpr int kMaxMR = 4;      // rows: 8 accumulators + 2 weights + 1 broadcast of 16 ymm registers

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The AVX2 layout: tiles of 16 channels, the stored bytes of q by pairs of k (K-blocks padded to
// even lengths, Kp = padded total K):
//   packed[(tile * Kp + k - k%2) * 16 + (channel % 16) * 2 + k%2]
// plus the canonical scales, zero points and column sums (IntWeight without q).
struct Avx2Layout {
  int64_t Kp = 0, block_padded = 0;
  std::vector<uint8_t> packed;
};

struct Ctx {
  int64_t M, N, K, nb, bk, bkp, Kp;
  const int16_t* xw;       // [M, Kp] widened activation values, zero padded per block
  const int32_t* rowsum;   // [M, nb]
  const QuantizedTensor* x;
  const IntWeight* w;
  const Avx2Layout* layout;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

template <int MR, bool WSIGNED>
FQ_AVX2 void micro_kernel(const Ctx& c, int64_t m0, int64_t tile) {
  const IntWeight& w = *c.w;
  const float* sx = c.x->scale.data<float>();
  const uint8_t* zx = c.x->zero_point.defined() ? c.x->zero_point.data<uint8_t>() : nullptr;
  const float* sw = w.scale.data<float>();
  const uint8_t* zw = w.zero_point.defined() ? w.zero_point.data<uint8_t>() : nullptr;
  float out[MR][kTile] = {};
  for (int64_t b = 0; b < c.nb; ++b) {
    const int64_t k0 = b * c.bk, kb = std::min(c.K, k0 + c.bk) - k0, pairs = round_up(kb, 2) / 2;
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    const uint8_t* wp = c.layout->packed.data() + (tile * c.Kp + b * c.bkp) * kTile;  // 32 bytes per k pair
    const int16_t* xr = c.xw + m0 * c.Kp + b * c.bkp;
    for (int64_t p = 0; p < pairs; ++p) {
      const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + p * 32));
      const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + p * 32 + 16));
      const __m256i w0 = WSIGNED ? _mm256_cvtepi8_epi16(lo) : _mm256_cvtepu8_epi16(lo);
      const __m256i w1 = WSIGNED ? _mm256_cvtepi8_epi16(hi) : _mm256_cvtepu8_epi16(hi);
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, xr + i * c.Kp + 2 * p, 4);
        const __m256i xb = _mm256_set1_epi32(pair);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(w0, xb));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(w1, xb));
      }
    }
    // The reference's correction and fp32 accumulation, channel by channel.
    for (int i = 0; i < MR; ++i) {
      alignas(32) int32_t sums[kTile];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), acc[i][1]);
      const int64_t m = m0 + i;
      const int32_t zxm = zx ? zx[m] : 0;
      for (int64_t j = 0; j < kTile; ++j) {
        const int64_t n = tile * kTile + j;
        if (n >= c.N) break;
        const int64_t g = n / w.tile_rows;
        const int32_t zwb = zw ? zw[g * c.nb + b] : 0;
        const int64_t corrected = int64_t{sums[j]} - int64_t{zxm} * w.colsum[n * c.nb + b] -
                                  int64_t{zwb} * c.rowsum[m * c.nb + b] + kb * int64_t{zxm} * zwb;
        out[i][j] += sx[m] * sw[g * c.nb + b] * static_cast<float>(corrected);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < kTile; ++j) {
      const int64_t n = tile * kTile + j;
      if (n >= c.N) break;
      float v = out[i][j];
      if (c.bias) v += c.bias[n];
      c.y[(m0 + i) * c.N + n] = apply_epilogue(c.epilogue, v);
    }
}

using MicroFn = void (*)(const Ctx&, int64_t, int64_t);

template <bool WSIGNED>
MicroFn pick_rows(int mr) {
  switch (mr) {
    case 1: return micro_kernel<1, WSIGNED>;
    case 2: return micro_kernel<2, WSIGNED>;
    case 3: return micro_kernel<3, WSIGNED>;
    default: return micro_kernel<4, WSIGNED>;
  }
}

// Widens the quantized rows into [M, Kp] int16 (zero padded per block) and sums each block.
template <class TX>
void widen_rows(const QuantizedTensor& x, const Ctx& c, int16_t* xw, int32_t* rowsum, ThreadPool& pool) {
  const TX* xq = static_cast<const TX*>(x.q.raw());
  parallel_for(pool, c.M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(xw + m * c.Kp, xw + (m + 1) * c.Kp, int16_t{0});
      for (int64_t b = 0; b < c.nb; ++b) {
        const int64_t k0 = b * c.bk, kb = std::min(c.K, k0 + c.bk) - k0;
        int32_t s = 0;
        for (int64_t k = 0; k < kb; ++k) {
          xw[m * c.Kp + b * c.bkp + k] = static_cast<int16_t>(xq[m * c.K + k0 + k]);
          s += xq[m * c.K + k0 + k];
        }
        rowsum[m * c.nb + b] = s;
      }
    }
  });
}

Avx2Layout pack(const IntWeight& w, ThreadPool& pool) {
  Avx2Layout v;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  v.block_padded = round_up(bk, 2);
  v.Kp = (nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, 2);
  const int64_t tiles = (N + kTile - 1) / kTile;
  v.packed.assign(static_cast<size_t>(tiles * kTile * v.Kp), 0);
  const uint8_t* q = static_cast<const uint8_t*>(w.q.raw());  // I8 or U8: the bytes as stored
  parallel_for(pool, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
        for (int64_t k = 0; k < kb; ++k) {
          const int64_t kk = b * v.block_padded + k;  // position in the padded K
          v.packed[static_cast<size_t>(((n / kTile) * v.Kp + kk - kk % 2) * kTile + (n % kTile) * 2 + kk % 2)] =
              q[n * K + k0 + k];
        }
      }
  });
  return v;
}

class Avx2IntLinear final : public CpuLinear {
 public:
  Avx2IntLinear(IntWeight w, ThreadPool& pool) : w_(std::move(w)), layout_(pack(w_, pool)) {
    N = w_.N;
    K = w_.K;
    wsigned_ = w_.q.dtype() == DType::I8;
    w_.q = Tensor();  // one copy of the weight in memory: the packed one
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const IntWeight& w = w_;
    const int64_t M = x.rows;
    ThreadPool& pool = ctx.threads();
    const QuantizedTensor xq = quantize_rows(x.materialize(pool), w.act);
    std::vector<int16_t> xw(static_cast<size_t>(M * layout_.Kp));
    std::vector<int32_t> rowsum(static_cast<size_t>(M * w.num_blocks));
    const Ctx c{M, w.N, w.K, w.num_blocks, w.tile_cols, layout_.block_padded, layout_.Kp, xw.data(), rowsum.data(),
                &xq, &w, &layout_, bias.defined() ? bias.data<float>() : nullptr, y, epilogue};
    if (xq.q.dtype() == DType::I8) widen_rows<int8_t>(xq, c, xw.data(), rowsum.data(), pool);
    else widen_rows<uint8_t>(xq, c, xw.data(), rowsum.data(), pool);
    const bool wsigned = wsigned_;
    const MicroFn full = wsigned ? pick_rows<true>(kMaxMR) : pick_rows<false>(kMaxMR);
    const int64_t tiles = (w.N + kTile - 1) / kTile, mc = M <= 32 ? M : 64, mchunks = (M + mc - 1) / mc;
    pool.run(mchunks * tiles, [&](int64_t t) {
      const int64_t m0 = (t / tiles) * mc, m1 = std::min(M, m0 + mc), tile = t % tiles;
      int64_t m = m0;
      for (; m + kMaxMR <= m1; m += kMaxMR) full(c, m, tile);
      if (m < m1)
        (wsigned ? pick_rows<true>(static_cast<int>(m1 - m)) : pick_rows<false>(static_cast<int>(m1 - m)))(c, m, tile);
    });
  }

 private:
  IntWeight w_;
  Avx2Layout layout_;
  bool wsigned_ = true;
};

std::unique_ptr<CpuLinear> prepare_avx2(IntWeight w, ThreadPool& pool) {
  return std::make_unique<Avx2IntLinear>(std::move(w), pool);
}

}  // namespace

IntGemmKernel int_gemm_avx2() { return {CpuIsa::Avx2, prepare_avx2}; }

#else  // no x86 build: the entry is never selected (the CPU does not support the level)

IntGemmKernel int_gemm_avx2() { return {CpuIsa::Avx2, nullptr}; }

#endif

}  // namespace kernels
}  // namespace finequant
