// gemm_int_blocked (kernels.h): integer GEMM for any K-blocked weight on mma.sync m16n8k32 s8
// (docs/DESIGN.md section 5). Each K-block's int32 sums are corrected and accumulated into the fp32
// sum in block order (one explicit FMA each), exactly as the CPU reference; built with -fmad=false
// so that no other float operation of the epilogue is contracted.
//
// Operands go from global memory straight to registers (no shared-memory staging): lane t of a
// quad loads a contiguous chunk of each of its rows per step (mma_layout.h), INT4 weights stay
// packed and are widened to int8 in registers. Two kernels:
//   * small M (<= 64): CTA = 8 warps on one 16 x 16 output tile, split along K. A round is a few
//     whole K-blocks; each warp reduces a contiguous range of the round's steps into int32 and adds
//     its per-block partial sums into shared memory (integer atomics: exact in any order); then
//     each thread owns one output element and applies the round's blocks in order.
//   * large M: CTA = 2 x 2 warps, warp tile 32 x 32, whole K per warp, block by block.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "finequant/error.h"
#include "kernels.h"
#include "mma_layout.h"

namespace finequant {
namespace cuda {
namespace {

struct BlockedParams {
  const int8_t* x = nullptr;  // [M, Kp]
  const float* sx = nullptr;
  const int32_t* zx = nullptr;
  const int32_t* rs = nullptr;  // [M, nb]
  const uint8_t* w = nullptr;   // [N, w_ld] bytes
  const float* sw = nullptr;    // [nb, N]
  const int32_t* zw = nullptr;
  const int32_t* cm = nullptr;
  float* y = nullptr;
  const float* bias = nullptr;
  int64_t Kp = 0, w_ld = 0, ldy = 0;
  int M = 0, N = 0, nb = 0, spb = 0;  // spb: steps per K-block
  int round_blocks = 1;               // small-M kernel
  Epilogue epilogue = Epilogue::None;
  bool x_sym = true, w_sym = true;  // zx == 0 / zw == 0: their tables are not read
};

// D = A B + D, m16n8k32, s8 x s8 -> s32 (fragments: mma_layout.h).
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// NW consecutive 32-bit words from p (aligned to 4 NW bytes), or zeros when p is null (masked row).
template <int NW>
__device__ __forceinline__ void load_words(uint32_t (&w)[NW], const void* p) {
  static_assert(NW == 1 || NW == 2 || NW == 4, "1, 2 or 4 words");
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = 0u;
    return;
  }
  if constexpr (NW == 4) {
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (NW == 2) {
    const uint2 v = __ldg(static_cast<const uint2*>(p));
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = __ldg(static_cast<const unsigned int*>(p));
  }
}

// Step geometry: KSTEP k per step; per lane and row, WORDS int8 words of A (and of an INT8 weight),
// BW raw words of the weight (INT4: half as many, widened later).
template <int KSTEP, bool W4>
struct StepShape {
  static constexpr int kWords = mma::lane_words(KSTEP);      // 4 or 2
  static constexpr int kMmas = mma::mmas_per_step(KSTEP);    // 2 or 1
  static constexpr int kBWords = W4 ? kWords / 2 : kWords;   // raw weight words per lane
  static constexpr int kWStepBytes = W4 ? KSTEP / 2 : KSTEP;  // weight bytes per row and step
  static constexpr int kWLaneBytes = 4 * kBWords;             // weight bytes per lane and step
};

// B registers of MMA j from the lane's raw weight words of one step.
template <int KSTEP, bool W4>
__device__ __forceinline__ void b_regs(const uint32_t (&raw)[StepShape<KSTEP, W4>::kBWords], int j, uint32_t& b0,
                                       uint32_t& b1) {
  if constexpr (W4) {
    mma::widen_int4(raw[j], b0, b1);  // raw word j = int8 words 2j, 2j + 1
  } else {
    b0 = raw[mma::b_word(j, 0)];
    b1 = raw[mma::b_word(j, 1)];
  }
}

// ---- small M: split-K over 8 warps -----------------------------------------------------------
constexpr int kSmallWarps = 8;
constexpr int kSmallThreads = kSmallWarps * 32;
constexpr int kSmallNT = 2;                       // n8 tiles per warp
constexpr int kSmallRows = 16, kSmallCols = 8 * kSmallNT;
constexpr int kSmallTile = kSmallRows * kSmallCols;
constexpr int kSmallKBytes = 256;                 // k per warp iteration (loads in flight)
constexpr int kMaxRoundBlocks = 32;               // shared int32 partial sums: 32 KiB
constexpr int kTabPerThread = kMaxRoundBlocks * kSmallCols / kSmallThreads;
static_assert(kSmallTile == kSmallThreads, "one output element per thread");
static_assert(kSmallRows == kSmallCols, "table staging indexes rows and columns alike");
static_assert(kTabPerThread * kSmallThreads == kMaxRoundBlocks * kSmallCols, "table staging");

template <int KSTEP, bool W4>
__global__ void __launch_bounds__(kSmallThreads) gemm_blocked_small_m(const BlockedParams p) {
  using S = StepShape<KSTEP, W4>;
  constexpr int U = kSmallKBytes / KSTEP;  // steps per iteration
  constexpr int NT = kSmallNT;
  __shared__ int32_t acc_s[kMaxRoundBlocks][kSmallTile];  // [block of round][row * 16 + col]
  __shared__ int32_t cm_s[kMaxRoundBlocks][kSmallCols], zw_s[kMaxRoundBlocks][kSmallCols];
  __shared__ float sw_s[kMaxRoundBlocks][kSmallCols];
  __shared__ int32_t rs_s[kMaxRoundBlocks][kSmallRows];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = mma::group_of(lane), t = mma::thread_in_group(lane);
  const int m0 = blockIdx.y * kSmallRows, n0 = blockIdx.x * kSmallCols;
  for (int i = tid; i < kMaxRoundBlocks * kSmallTile; i += kSmallThreads) (&acc_s[0][0])[i] = 0;

  // This lane's operand rows (null: masked, loaded as zeros), at its chunk of a step.
  const int8_t* a_lo = m0 + g < p.M ? p.x + (m0 + g) * p.Kp + t * mma::lane_bytes(KSTEP) : nullptr;
  const int8_t* a_hi = m0 + g + 8 < p.M ? p.x + (m0 + g + 8) * p.Kp + t * mma::lane_bytes(KSTEP) : nullptr;
  const uint8_t* b_row[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = n0 + 8 * j + g;
    b_row[j] = n < p.N ? p.w + n * p.w_ld + t * S::kWLaneBytes : nullptr;
  }

  // The output element this thread owns in the epilogue.
  const int er = tid / kSmallCols, ec = tid % kSmallCols, em = m0 + er, en = n0 + ec;
  const bool e_ok = em < p.M && en < p.N;
  const float sxm = e_ok ? p.sx[em] : 0.f;
  const int32_t zxm = e_ok && !p.x_sym ? p.zx[em] : 0;
  float out = 0.f;
  __syncthreads();

  for (int b0 = 0; b0 < p.nb; b0 += p.round_blocks) {
    const int nbr = min(p.round_blocks, p.nb - b0);
    // The round's per-block tables: loaded now, stored to shared memory after the MMAs.
    int32_t t_cm[kTabPerThread], t_zw[kTabPerThread], t_rs[kTabPerThread];
    float t_sw[kTabPerThread];
#pragma unroll
    for (int u = 0; u < kTabPerThread; ++u) {
      const int i = tid + u * kSmallThreads, bb = i / kSmallCols, c = i % kSmallCols;
      t_cm[u] = 0, t_zw[u] = 0, t_rs[u] = 0, t_sw[u] = 0.f;
      if (bb < nbr) {
        const int64_t b = b0 + bb;
        const int n = n0 + c, m = m0 + c;
        if (n < p.N) {
          t_sw[u] = __ldg(p.sw + b * p.N + n);
          if (!p.x_sym) t_cm[u] = __ldg(p.cm + b * p.N + n);
          if (!p.w_sym) t_zw[u] = __ldg(p.zw + b * p.N + n);
        }
        if (m < p.M && !p.w_sym) t_rs[u] = __ldg(p.rs + static_cast<int64_t>(m) * p.nb + b);
      }
    }

    // This warp's steps of the round.
    const int64_t first = static_cast<int64_t>(b0) * p.spb, count = static_cast<int64_t>(nbr) * p.spb;
    const int sa = static_cast<int>(mma::warp_range_begin(first, count, kSmallWarps, warp));
    const int sb = static_cast<int>(mma::warp_range_begin(first, count, kSmallWarps, warp + 1));
    if (sa < sb) {  // warp-uniform
      int cur = sa / p.spb;           // K-block being summed
      int next = (cur + 1) * p.spb;   // its end (a step index)
      int32_t acc[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;
      auto flush = [&](int slot) {  // this warp's partial sums of block b0 + slot
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = mma::c_row(lane, e);
            if (m0 + r < p.M) atomicAdd(&acc_s[slot][r * kSmallCols + 8 * j + mma::c_col(lane, e)], acc[j][e]);
            acc[j][e] = 0;
          }
      };
      for (int s = sa; s < sb; s += U) {
        uint32_t af[U][2][S::kWords], bf[U][NT][S::kBWords];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const bool live = s + u < sb;
          const int64_t step = s + u;
          load_words(af[u][0], live && a_lo ? a_lo + step * KSTEP : nullptr);
          load_words(af[u][1], live && a_hi ? a_hi + step * KSTEP : nullptr);
#pragma unroll
          for (int j = 0; j < NT; ++j)
            load_words(bf[u][j], live && b_row[j] ? b_row[j] + step * S::kWStepBytes : nullptr);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (s + u < sb) {  // warp-uniform
            if (s + u >= next) {
              flush(cur - b0);
              ++cur;
              next += p.spb;
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int q = 0; q < S::kMmas; ++q) {
                uint32_t b0r, b1r;
                b_regs<KSTEP, W4>(bf[u][j], q, b0r, b1r);
                mma_s8(acc[j], af[u][0][mma::a_word(q, 0)], af[u][1][mma::a_word(q, 1)],
                       af[u][0][mma::a_word(q, 2)], af[u][1][mma::a_word(q, 3)], b0r, b1r);
              }
          }
        }
      }
      flush(cur - b0);
    }
#pragma unroll
    for (int u = 0; u < kTabPerThread; ++u) {
      const int i = tid + u * kSmallThreads, bb = i / kSmallCols, c = i % kSmallCols;
      if (bb < nbr) {
        cm_s[bb][c] = t_cm[u];
        zw_s[bb][c] = t_zw[u];
        sw_s[bb][c] = t_sw[u];
        rs_s[bb][c] = t_rs[u];
      }
    }
    __syncthreads();
    // The round's blocks, in order, into this thread's output element.
    for (int bb = 0; bb < nbr; ++bb) {
      const int32_t a = acc_s[bb][tid];
      acc_s[bb][tid] = 0;
      if (e_ok) {
        const int32_t corrected = kernels::correct_block(a, zxm, cm_s[bb][ec], zw_s[bb][ec], rs_s[bb][er]);
        out = kernels::accumulate_block(out, sw_s[bb][ec], corrected);
      }
    }
    __syncthreads();
  }
  if (e_ok)
    p.y[em * p.ldy + en] =
        kernels::finish_output(kernels::dequantize_sum(sxm, out), p.bias != nullptr, p.bias != nullptr ? p.bias[en] : 0.f,
                               p.epilogue);
}

// ---- large M: 64 x 64 CTA tile, 32 x 32 per warp ---------------------------------------------
constexpr int kLargeMT = 2, kLargeNT = 4;  // m16 / n8 tiles per warp
constexpr int kLargeRows = 2 * 16 * kLargeMT, kLargeCols = 2 * 8 * kLargeNT;
constexpr int kLargeKBytes = 64;  // k per iteration

template <int KSTEP, bool W4>
__global__ void __launch_bounds__(128) gemm_blocked_large_m(const BlockedParams p) {
  using S = StepShape<KSTEP, W4>;
  constexpr int U = kLargeKBytes / KSTEP;
  constexpr int MT = kLargeMT, NT = kLargeNT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = mma::group_of(lane), t = mma::thread_in_group(lane);
  const int m_base = blockIdx.y * kLargeRows + (warp >> 1) * 16 * MT;
  const int n_base = blockIdx.x * kLargeCols + (warp & 1) * 8 * NT;

  const int8_t* a_row[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m_base + 16 * i + g + 8 * h;
      a_row[i][h] = m < p.M ? p.x + m * p.Kp + t * mma::lane_bytes(KSTEP) : nullptr;
    }
  const uint8_t* b_row[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = n_base + 8 * j + g;
    b_row[j] = n < p.N ? p.w + n * p.w_ld + t * S::kWLaneBytes : nullptr;
  }

  // Output rows (i, h) and columns (j, q) of this lane's accumulators (mma_layout.h, C).
  float sxr[MT][2];
  int32_t zxr[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m_base + 16 * i + mma::c_row(lane, 2 * h);
      sxr[i][h] = m < p.M ? p.sx[m] : 0.f;
      zxr[i][h] = m < p.M && !p.x_sym ? p.zx[m] : 0;
    }
  float out[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) out[i][j][0] = out[i][j][1] = out[i][j][2] = out[i][j][3] = 0.f;

  for (int b = 0; b < p.nb; ++b) {
    // This block's tables (in flight during the MMAs).
    float swr[NT][2];
    int32_t cmr[NT][2], zwr[NT][2], rsr[MT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n = n_base + 8 * j + mma::c_col(lane, q);
        const int64_t at = static_cast<int64_t>(b) * p.N + n;
        const bool ok = n < p.N;
        swr[j][q] = ok ? __ldg(p.sw + at) : 0.f;
        cmr[j][q] = ok && !p.x_sym ? __ldg(p.cm + at) : 0;
        zwr[j][q] = ok && !p.w_sym ? __ldg(p.zw + at) : 0;
      }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m_base + 16 * i + mma::c_row(lane, 2 * h);
        rsr[i][h] = m < p.M && !p.w_sym ? __ldg(p.rs + static_cast<int64_t>(m) * p.nb + b) : 0;
      }

    int32_t acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;
    const int s_end = (b + 1) * p.spb;
    for (int s = b * p.spb; s < s_end; s += U) {
      uint32_t af[U][MT][2][S::kWords], bf[U][NT][S::kBWords];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool live = s + u < s_end;
        const int64_t step = s + u;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            load_words(af[u][i][h], live && a_row[i][h] ? a_row[i][h] + step * KSTEP : nullptr);
#pragma unroll
        for (int j = 0; j < NT; ++j)
          load_words(bf[u][j], live && b_row[j] ? b_row[j] + step * S::kWStepBytes : nullptr);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s + u < s_end) {  // warp-uniform
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < S::kMmas; ++q) {
              uint32_t b0r, b1r;
              b_regs<KSTEP, W4>(bf[u][j], q, b0r, b1r);
#pragma unroll
              for (int i = 0; i < MT; ++i)
                mma_s8(acc[i][j], af[u][i][0][mma::a_word(q, 0)], af[u][i][1][mma::a_word(q, 1)],
                       af[u][i][0][mma::a_word(q, 2)], af[u][i][1][mma::a_word(q, 3)], b0r, b1r);
            }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, q = e & 1;
          const int32_t corrected = kernels::correct_block(acc[i][j][e], zxr[i][h], cmr[j][q], zwr[j][q], rsr[i][h]);
          out[i][j][e] = kernels::accumulate_block(out[i][j][e], swr[j][q], corrected);
        }
  }

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m_base + 16 * i + mma::c_row(lane, e), n = n_base + 8 * j + mma::c_col(lane, e);
        if (m < p.M && n < p.N)
          p.y[m * p.ldy + n] = kernels::finish_output(kernels::dequantize_sum(sxr[i][e >> 1], out[i][j][e]),
                                                      p.bias != nullptr, p.bias != nullptr ? p.bias[n] : 0.f, p.epilogue);
      }
}

template <int KSTEP, bool W4>
void launch_blocked(const BlockedParams& p, bool small_m, cudaStream_t stream) {
  if (small_m) {
    const dim3 grid(static_cast<unsigned>((p.N + kSmallCols - 1) / kSmallCols),
                    static_cast<unsigned>((p.M + kSmallRows - 1) / kSmallRows));
    gemm_blocked_small_m<KSTEP, W4><<<grid, kSmallThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>((p.N + kLargeCols - 1) / kLargeCols),
                    static_cast<unsigned>((p.M + kLargeRows - 1) / kLargeRows));
    gemm_blocked_large_m<KSTEP, W4><<<grid, 128, 0, stream>>>(p);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

void gemm_int_blocked(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream) {
  if (x.M == 0 || w.N == 0) return;
  FQ_CHECK_ARG(!x.packed4, "gemm_int_blocked: activations must be stored as int8 (packed4 is not supported)");
  FQ_CHECK_ARG(w.bits == 8 || w.bits == 4, "gemm_int_blocked: weight bits must be 4 or 8");
  FQ_CHECK_ARG(w.nb >= 1 && w.Gp >= 32 && w.Gp % 32 == 0 && w.Kp == w.nb * w.Gp,
               "gemm_int_blocked: K-blocks must be padded to multiples of 32 (Kp = nb * Gp)");
  FQ_CHECK_ARG(aligned16(x.xq) && aligned16(w.w), "gemm_int_blocked: operands must be 16-byte aligned");
  FQ_CHECK_ARG(x.M <= 0x7fffffff && w.N <= 0x7fffffff && w.Kp <= 0x7fffffff,
               "gemm_int_blocked: dimensions exceed the kernel's 32-bit indices");
  const bool small_m = x.M <= 4 * kSmallRows;
  FQ_CHECK_ARG(small_m || (x.M + kLargeRows - 1) / kLargeRows <= 65535, "gemm_int_blocked: too many rows");

  BlockedParams p;
  p.x = static_cast<const int8_t*>(x.xq);
  p.sx = x.sx;
  p.zx = x.zx;
  p.rs = x.rs;
  p.w = static_cast<const uint8_t*>(w.w);
  p.sw = w.sw;
  p.zw = w.zw;
  p.cm = w.cm;
  p.y = out.y;
  p.bias = out.bias;
  p.Kp = w.Kp;
  p.w_ld = w.bits == 4 ? w.Kp / 2 : w.Kp;
  p.ldy = out.ldy;
  p.M = static_cast<int>(x.M);
  p.N = static_cast<int>(w.N);
  p.nb = static_cast<int>(w.nb);
  p.epilogue = out.epilogue;
  p.x_sym = x.symmetric;
  p.w_sym = w.symmetric;
  // 64-k steps when no K-block boundary falls inside one (Gp % 64 == 0), else 32.
  const int kstep = w.Gp % 64 == 0 ? 64 : 32;
  p.spb = static_cast<int>(w.Gp / kstep);
  p.round_blocks = static_cast<int>(
      mma::round_blocks(p.spb, p.nb, kSmallWarps, kSmallKBytes / kstep, kMaxRoundBlocks));

  const bool w4 = w.bits == 4;
  if (kstep == 64) {
    if (w4) launch_blocked<64, true>(p, small_m, stream);
    else launch_blocked<64, false>(p, small_m, stream);
  } else {
    if (w4) launch_blocked<32, true>(p, small_m, stream);
    else launch_blocked<32, false>(p, small_m, stream);
  }
  check_launch("gemm_int_blocked");
}

}  // namespace cuda
}  // namespace finequant
