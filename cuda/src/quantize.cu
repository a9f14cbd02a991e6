// quantize_rows (kernels.h): token-wise quantization of F32 rows, optionally LayerNorm/RMSNorm-ed
// first, into the integer GEMM layout (docs/DESIGN.md section 5): the reference's scale, zero point
// and values (quantize_rows of the math contract), stored shifted, K-blocks padded with zeros, per
// block sums of the stored values. One CTA per row; every value is recomputed from x when needed
// (the row stays in L1/L2), so any K works without shared-memory staging.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "finequant/error.h"
#include "cuda/src/host/layout.h"
#include "kernels.h"
#include "row_norm.cuh"

namespace finequant {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 12000;  // shared per-block sums, 47 KiB

struct QuantParams {
  const float* x = nullptr;
  int64_t ldx = 0, K = 0, G = 0, Gp = 0;
  int nb = 1;
  bool has_norm = false;
  NormDev norm;
  void* xq = nullptr;
  float* sx = nullptr;
  int32_t* zx = nullptr;
  int32_t* rs = nullptr;
  int bits = 8;
  bool symmetric = true, packed4 = false;
  int32_t* bad_row = nullptr;
};

// std::clamp(v, lo, hi) as the reference evaluates it.
__device__ __forceinline__ float clampf(float v, float lo, float hi) { return v < lo ? lo : (hi < v ? hi : v); }

__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const QuantParams p) {
  extern __shared__ int32_t block_sums[];  // [nb]
  __shared__ double dscratch[32];
  __shared__ float fscratch[3][kWarps];
  __shared__ int iscratch[kWarps];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t m = blockIdx.x;
  const float* row = p.x + m * p.ldx;
  for (int b = tid; b < p.nb; b += kThreads) block_sums[b] = 0;

  rownorm::Stats ns;
  if (p.has_norm) ns = rownorm::stats(row, p.K, p.norm, dscratch);
  auto value = [&](int64_t c) {
    const float v = row[c];
    return p.has_norm ? rownorm::apply(v, ns, p.norm, c) : v;
  };

  // Range of the row (the asymmetric one always includes 0); max / min are exact in any order.
  float amax = 0.f, lo = 0.f, hi = 0.f;
  int finite = 1;
  for (int64_t c = tid; c < p.K; c += kThreads) {
    const float v = value(c);
    finite &= isfinite(v) ? 1 : 0;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    amax = fmaxf(amax, fabsf(v));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    finite &= __shfl_xor_sync(0xffffffffu, finite, o);
  }
  if (lane == 0) {
    fscratch[0][warp] = amax;
    fscratch[1][warp] = lo;
    fscratch[2][warp] = hi;
    iscratch[warp] = finite;
  }
  __syncthreads();
  amax = 0.f, lo = 0.f, hi = 0.f, finite = 1;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    amax = fmaxf(amax, fscratch[0][w]);
    lo = fminf(lo, fscratch[1][w]);
    hi = fmaxf(hi, fscratch[2][w]);
    finite &= iscratch[w];
  }

  // Scale and zero point, as the reference (IEEE division, round half to even).
  const float qmax = static_cast<float>(p.symmetric ? (1 << (p.bits - 1)) - 1 : (1 << p.bits) - 1);
  bool bad = !finite;
  float s = 1.f, z = 0.f;
  if (!bad) {
    if (p.symmetric) {
      s = __fdiv_rn(amax, qmax);
    } else {
      const float range = __fsub_rn(hi, lo);
      if (isfinite(range)) s = __fdiv_rn(range, qmax);
      else bad = true;
    }
  }
  if (bad) {
    s = 1.f;  // a non-finite row is stored as a zero row; the caller reports it
    if (tid == 0) atomicMax(p.bad_row, static_cast<int32_t>(m));
  } else {
    if (s == 0.f) s = 1.f;
    if (!p.symmetric) z = clampf(kernels::actmath::round_even(__fdiv_rn(-lo, s)), 0.f, qmax);
  }
  const int shift = operand_shift(p.bits, p.symmetric);

  // Values: warps take aligned 32-k groups of the padded row (Gp % 32 == 0: one K-block each).
  const int64_t Kp = p.Gp * p.nb, groups = Kp / 32;
  for (int64_t gi = warp; gi < groups; gi += kWarps) {
    const int64_t pos0 = gi * 32, b = pos0 / p.Gp, k = pos0 - b * p.Gp + lane;
    const int64_t kb = min(p.G, p.K - b * p.G);
    int q = 0;  // stored value; padding stays 0
    if (k < kb) {
      const float v = bad ? 0.f : value(b * p.G + k);
      const float r = kernels::actmath::round_even(__fdiv_rn(v, s));
      const float qf = p.symmetric ? clampf(r, -qmax, qmax) : clampf(__fadd_rn(r, z), 0.f, qmax);
      q = static_cast<int>(qf) - shift;
    }
    if (p.packed4) {
      const int nib = q & 0xF;
      const int hi_nib = __shfl_down_sync(0xffffffffu, nib, 1);
      if ((lane & 1) == 0)
        static_cast<uint8_t*>(p.xq)[m * (Kp / 2) + pos0 / 2 + lane / 2] = static_cast<uint8_t>(nib | (hi_nib << 4));
    } else {
      static_cast<int8_t*>(p.xq)[m * Kp + pos0 + lane] = static_cast<int8_t>(q);
    }
    const int sum = __reduce_add_sync(0xffffffffu, q);
    if (lane == 0 && sum != 0) atomicAdd(&block_sums[b], sum);
  }
  __syncthreads();
  for (int b = tid; b < p.nb; b += kThreads) p.rs[m * p.nb + b] = block_sums[b];
  if (tid == 0) {
    p.sx[m] = s;
    if (p.zx != nullptr) p.zx[m] = p.symmetric ? 0 : static_cast<int32_t>(z) - shift;
  }
}

}  // namespace

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const NormDev* norm, int64_t G, int64_t Gp,
                   int64_t nb, const IntActsDev& out, int32_t* bad_row, cudaStream_t stream) {
  if (M == 0) return;
  FQ_CHECK_ARG(out.bits == 4 || out.bits == 8, "quantize_rows: bits must be 4 or 8");
  FQ_CHECK_ARG(!out.packed4 || out.bits == 4, "quantize_rows: packed storage needs 4-bit values");
  FQ_CHECK_ARG(K >= 1 && G >= 1 && Gp >= 32 && Gp % 32 == 0 && Gp >= G && nb >= 1 && nb * G >= K &&
                   (nb - 1) * G < K,
               "quantize_rows: K-blocks must cover K and be padded to multiples of 32");
  FQ_CHECK_ARG(nb <= kMaxBlocks, "quantize_rows: at most " + std::to_string(kMaxBlocks) + " K-blocks per row");
  FQ_CHECK_ARG(M <= 0x7fffffff, "quantize_rows: too many rows");
  QuantParams p;
  p.x = x;
  p.ldx = ldx;
  p.K = K;
  p.G = G;
  p.Gp = Gp;
  p.nb = static_cast<int>(nb);
  p.has_norm = norm != nullptr;
  if (norm != nullptr) p.norm = *norm;
  p.xq = out.xq;
  p.sx = out.sx;
  p.zx = out.zx;
  p.rs = out.rs;
  p.bits = out.bits;
  p.symmetric = out.symmetric;
  p.packed4 = out.packed4;
  p.bad_row = bad_row;
  quantize_rows_kernel<<<static_cast<unsigned>(M), kThreads, static_cast<size_t>(nb) * sizeof(int32_t), stream>>>(p);
  check_launch("quantize_rows");
}

}  // namespace cuda
}  // namespace finequant
