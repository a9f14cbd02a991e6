// AVX2 integer GEMM for CPUs without AVX512-VNNI; bit-identical to gemm_int_ref. This file's
// widening path takes asymmetric INT8 weights, and symmetric ones holding -128 against asymmetric
// activations; the rest goes to gemm_int_avx2_maddubs.cc, where vpmaddubsw is exact (avx2_maddubs_exact).
//
// vpmaddubsw would saturate on u8 x s8 pairs, so both operands are widened to int16 and multiplied
// with vpmaddwd: each int32 lane gets q[n, k] x[k] + q[n, k+1] x[k+1], the exact products of the
// stored values. Weights stay one byte each in the packed layout (Avx2IntLinear below) and are
// widened in registers. The activation rows are quantized by quantize_rows_into_avx2 (below; the
// reference's values) and widened once per call. The integer sums are vectorized, and so is each
// K-block's correction and fp32 accumulation (correct_block, accumulate_block of epilogue.h:
// wrap-around int32 like the VNNI kernels, then the reference's fp32 operations in its order; this
// file is compiled with -ffp-contract=off), so the outputs match it bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/gemm.h"


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FQ_AVX2_BUILD 1
#include <immintrin.h>
#define FQ_AVX2 __attribute__((target("avx2,fma")))
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
// even lengths, Kp = padded total K); with i = (channel % 16) * 2 + k%2, the position in the 32
// values of a k pair:
//   packed[(tile * Kp + k - k%2) * 16 + i]
// Per-column tables [(tile * nb + block) * 16 + channel % 16] (zeros for padding channels): the
// scale, zw and colsum - kb zw of the channel's block (correct_block's operands). Tile-major, so a
// tile reads its blocks' values as one stream: block-major tables of a wide layer cost a TLB miss
// per block and table (the 50257 x 768 LM head GEMM at K-blocks of 32, M = 1: 8.5 ms instead of 2.1).
struct Avx2Layout {
  int64_t Kp = 0, block_padded = 0, Npad = 0;
  WeightVector<uint8_t> packed;
  WeightVector<float> scale;
  WeightVector<int32_t> zw, colsum_minus;
};

struct Ctx {
  int64_t M, N, K, nb, bk, bkp, Kp;
  const int16_t* xw;       // [M, Kp] widened activation values, zero padded per block
  const int32_t* rowsum;   // [M, nb]
  const float* sx;         // [M]
  const int32_t* zx;       // [M] (asymmetric activations; else null)
  const Avx2Layout* layout;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

template <int MR, bool WSIGNED>
FQ_AVX2 void micro_kernel(const Ctx& c, int64_t m0, int64_t tile) {
  const Avx2Layout& v = *c.layout;
  const float* sx = c.sx;
  const int32_t* zx = c.zx;
  __m256 out[MR][2];  // the fp32 sums over blocks, as the reference: 0, then an FMA per block
  for (int i = 0; i < MR; ++i) out[i][0] = out[i][1] = _mm256_setzero_ps();
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
    // The block's correction_block and accumulate_block, 8 channels a vector:
    //   corrected = acc - zx (colsum - kb zw) - zw rowsum;  sum = fma(sw, float(corrected), sum)
    const int64_t col = (tile * c.nb + b) * kTile;
    for (int j = 0; j < 2; ++j) {
      const __m256 sw = _mm256_loadu_ps(v.scale.data() + col + 8 * j);
      const __m256i cm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.colsum_minus.data() + col + 8 * j));
      const __m256i zw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.zw.data() + col + 8 * j));
      for (int i = 0; i < MR; ++i) {
        const int64_t m = m0 + i;
        const __m256i corrected =
            _mm256_sub_epi32(_mm256_sub_epi32(acc[i][j], _mm256_mullo_epi32(_mm256_set1_epi32(zx ? zx[m] : 0), cm)),
                             _mm256_mullo_epi32(zw, _mm256_set1_epi32(c.rowsum[m * c.nb + b])));
        out[i][j] = _mm256_fmadd_ps(sw, _mm256_cvtepi32_ps(corrected), out[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float sums[kTile];
    _mm256_store_ps(sums, out[i][0]);
    _mm256_store_ps(sums + 8, out[i][1]);
    for (int64_t j = 0; j < kTile; ++j) {
      const int64_t n = tile * kTile + j;
      if (n >= c.N) break;
      c.y[(m0 + i) * c.N + n] =
          finish_output(dequantize_sum(sx[m0 + i], sums[j]), c.bias != nullptr, c.bias ? c.bias[n] : 0.f, c.epilogue);
    }
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

MicroFn pick(int mr, bool wsigned) { return wsigned ? pick_rows<true>(mr) : pick_rows<false>(mr); }

// Widens rows [m0, m1) of the quantized rows (bytes as stored: I8 or U8) into [M, Kp] int16; padding stays zero.
template <class TX>
FQ_AVX2 void widen_rows(const uint8_t* xp, int64_t m0, int64_t m1, int64_t Kp, int16_t* xw) {
  const TX* q = reinterpret_cast<const TX*>(xp);
  for (int64_t i = m0 * Kp; i < m1 * Kp; ++i) xw[i] = static_cast<int16_t>(q[i]);
}

Avx2Layout pack(const IntWeight& w, ThreadPool& pool) {
  Avx2Layout v;
  const int64_t N = w.N, K = w.K, nb = w.num_blocks, bk = w.tile_cols;
  v.block_padded = round_up(bk, 2);
  v.Kp = (nb - 1) * v.block_padded + round_up(K - (nb - 1) * bk, 2);
  const int64_t tiles = (N + kTile - 1) / kTile;
  v.Npad = tiles * kTile;
  v.packed.assign(static_cast<size_t>(v.Npad * v.Kp), 0);
  v.scale.assign(static_cast<size_t>(nb * v.Npad), 0.f);
  v.zw.assign(static_cast<size_t>(nb * v.Npad), 0);
  v.colsum_minus.assign(static_cast<size_t>(nb * v.Npad), 0);
  const float* sw = w.scale.data<float>();
  const uint8_t* zw = w.zero_point.defined() ? w.zero_point.data<uint8_t>() : nullptr;
  const uint8_t* q = static_cast<const uint8_t*>(w.q.raw());  // I8 or U8: the bytes as stored
  parallel_for(pool, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t n = t0 * kTile; n < std::min(N, t1 * kTile); ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bk, kb = std::min(K, k0 + bk) - k0;
        for (int64_t k = 0; k < kb; ++k) {
          const int64_t kk = b * v.block_padded + k;  // position in the padded K
          v.packed[static_cast<size_t>(((n / kTile) * v.Kp + kk - kk % 2) * kTile + (n % kTile) * 2 + kk % 2)] =
              q[n * K + k0 + k];
        }
        const size_t col = static_cast<size_t>(((n / kTile) * nb + b) * kTile + n % kTile);
        const int64_t g = n / w.tile_rows;
        const int32_t z = zw ? zw[g * nb + b] : 0;
        v.scale[col] = sw[g * nb + b];
        v.zw[col] = z;
        v.colsum_minus[col] = w.colsum[n * nb + b] - static_cast<int32_t>(kb) * z;
      }
  });
  return v;
}

class Avx2IntLinear final : public CpuLinear {
 public:
  Avx2IntLinear(const IntWeight& w, ThreadPool& pool)
      : layout_(pack(w, pool)), act_(w.act), nb_(w.num_blocks), bk_(w.tile_cols), wsigned_(w.q.dtype() == DType::I8) {
    N = w.N;
    K = w.K;
    for (const MemorySpan& s :
         {span_of(layout_.packed), span_of(layout_.scale), span_of(layout_.zw), span_of(layout_.colsum_minus)})
      if (s.bytes) streamed.push_back(s);
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const int64_t M = x.rows;
    ThreadPool& pool = ctx.threads();
    const RowLayout rows{K, nb_, bk_, layout_.block_padded, layout_.Kp};
    thread_local RowScratch scratch;
    thread_local AlignedVector<int16_t> widened;
    const QuantizedRows q = scratch.resize(M, rows);
    quantize_rows_into_avx2(x, rows, act_, q, pool);
    widened.resize(static_cast<size_t>(M * layout_.Kp));
    int16_t* xw = widened.data();  // (the workers take the pointer, not their own thread_local)
    parallel_for(pool, M, 16, [&](int64_t m0, int64_t m1) {
      if (act_.symmetric) widen_rows<int8_t>(q.xp, m0, m1, layout_.Kp, xw);
      else widen_rows<uint8_t>(q.xp, m0, m1, layout_.Kp, xw);
    });
    const Ctx c{M, N, K, nb_, bk_, layout_.block_padded, layout_.Kp, xw, q.rowsum, q.sx,
                act_.symmetric ? nullptr : q.zx, &layout_, bias.defined() ? bias.data<float>() : nullptr, y, epilogue};
    const bool wsigned = wsigned_;
    const MicroFn full = pick(kMaxMR, wsigned);
    // Row chunks x runs of channel tiles (guided_runs when the rows are one chunk).
    const int64_t tiles = layout_.Npad / kTile, mc = M <= 32 ? M : 64, mchunks = (M + mc - 1) / mc;
    const WorkRuns runs = mchunks == 1 ? guided_runs(tiles, pool.size()) : uniform_runs(tiles, 1);
    pool.run(mchunks * runs.count, [&](int64_t t) {
      const int64_t m0 = (t / runs.count) * mc, m1 = std::min(M, m0 + mc), r = t % runs.count;
      for (int64_t tile = runs.begin(r); tile < runs.end(r); ++tile) {
        int64_t m = m0;
        for (; m + kMaxMR <= m1; m += kMaxMR) full(c, m, tile);
        if (m < m1) pick(static_cast<int>(m1 - m), wsigned)(c, m, tile);
      }
    });
  }

 private:
  Avx2Layout layout_;  // the only copy of the weight in memory
  QuantSpec act_;
  int64_t nb_, bk_;
  bool wsigned_;
};

// ---- token-wise quantization of plain rows (quantize_rows_into_avx2) -----------------------------
FQ_AVX2 float reduce_min(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_movehdup_ps(m)));
}
FQ_AVX2 float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// Lanes [0, n) of 8 set (n <= 8).
FQ_AVX2 __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// One row of quantize() (Tile{1, K}): the same range, scale, zero point and nearbyint(x / s) (+ z),
// clamped, into dst (the row's Kp bytes, zero padded per block) with each block's sum. Returns false
// for a row holding NaN / Inf (or, asymmetric, a range that overflows fp32).
FQ_AVX2 bool quantize_row(const float* x, const RowLayout& l, bool symmetric, float qmax, uint8_t* dst,
                          int32_t* rowsum, float* scale, int32_t* zero_point) {
  const int64_t K = l.K;
  __m256 mn[2], mx[2];  // two chains: min / max are order-free, and one chain waits on its latency
  for (int i = 0; i < 2; ++i) mn[i] = mx[i] = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();  // NaN lanes (min / max may drop NaN)
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int i = 0; i < 2; ++i) {
      const __m256 v = _mm256_loadu_ps(x + k + 8 * i);
      mn[i] = _mm256_min_ps(mn[i], v);
      mx[i] = _mm256_max_ps(mx[i], v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  for (; k < K; k += 8) {
    const __m256 v = _mm256_maskload_ps(x + k, first_lanes(K - k));  // masked lanes read 0
    mn[0] = _mm256_min_ps(mn[0], v);
    mx[0] = _mm256_max_ps(mx[0], v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  const float lo = reduce_min(_mm256_min_ps(mn[0], mn[1])), hi = reduce_max(_mm256_max_ps(mx[0], mx[1]));
  if (_mm256_movemask_ps(bad) != 0 || !std::isfinite(lo) || !std::isfinite(hi)) return false;
  float s, z;
  if (!row_scale_and_zero(lo, hi, symmetric, qmax, s, z)) return false;
  *scale = s;
  if (zero_point) *zero_point = static_cast<int32_t>(z);
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m256 qlo = _mm256_set1_ps(symmetric ? -qmax : 0.0f), qhi = _mm256_set1_ps(qmax);
  std::memset(dst, 0, static_cast<size_t>(l.Kp));
  for (int64_t b = 0; b < l.nb; ++b) {
    const int64_t k0 = b * l.bk, kb = std::min(K, k0 + l.bk) - k0;
    uint8_t* out = dst + b * l.block_padded;
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < kb; i += 8) {
      const int64_t n = std::min<int64_t>(8, kb - i);
      const __m256i lanes = first_lanes(n);
      const __m256 v = _mm256_maskload_ps(x + k0 + i, lanes);
      // (round to nearest even = nearbyint in the default rounding mode; the division is the reference's)
      __m256 q = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (!symmetric) q = _mm256_add_ps(q, vz);
      const __m256i qi = _mm256_and_si256(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, qlo), qhi)), lanes);
      sum = _mm256_add_epi32(sum, qi);
      // int32 -> int16 -> 8 bits: the values fit ([-127, 127] or [0, 255]), so the saturating packs are exact.
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      const __m128i b8 = symmetric ? _mm_packs_epi16(w16, w16) : _mm_packus_epi16(w16, w16);
      if (n == 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), b8);
      } else {
        alignas(16) uint8_t tail[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tail), b8);
        std::memcpy(out + i, tail, static_cast<size_t>(n));
      }
    }
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    rowsum[b] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1))));
  }
  return true;
}

}  // namespace

bool avx2_maddubs_exact(const IntWeight& w) {
  if (w.bits == 4) return true;
  if (w.q.dtype() != DType::I8) return false;
  if (w.act.symmetric) return true;
  const int8_t* q = w.q.data<int8_t>();
  return std::find(q, q + w.q.numel(), int8_t{-128}) == q + w.q.numel();
}

namespace {

std::unique_ptr<CpuLinear> prepare_avx2(IntWeight w, ThreadPool& pool) {
  if (avx2_maddubs_exact(w)) return int_gemm_avx2_maddubs().prepare(std::move(w), pool);
  return std::make_unique<Avx2IntLinear>(w, pool);
}

}  // namespace

IntGemmKernel int_gemm_avx2() { return {CpuIsa::Avx2, prepare_avx2}; }

void quantize_rows_into_avx2(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                             ThreadPool& pool) {
  FQ_CHECK(l.group_rows == 1, ErrorKind::Runtime, "quantize_rows_into_avx2 writes plain rows");
  quantize_rows_with(quantize_row, x, l, act, out, pool);
}

#else  // no x86 build: the entry is never selected (the CPU does not support the level)

IntGemmKernel int_gemm_avx2() { return {CpuIsa::Avx2, nullptr}; }
void quantize_rows_into_avx2(const RowInput& x, const RowLayout& l, QuantSpec act, const QuantizedRows& out,
                             ThreadPool& pool) {
  quantize_rows_into(x, l, act, out, pool);
}

#endif

}  // namespace kernels
}  // namespace finequant
