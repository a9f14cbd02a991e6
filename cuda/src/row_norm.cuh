// LayerNorm / RMSNorm of one row per CTA, shared by quantize_rows (fused) and norm_rows: the CPU's
// math (kernels/cpu normalize_row): mean and variance in double, then (x - mu) * inv * w + b in
// float with mu and inv rounded to float, written with _rn intrinsics so nothing is contracted.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace finequant {
namespace cuda {
namespace rownorm {

// Sum over the CTA (blockDim.x a multiple of 32); every thread gets the result. `scratch`: 32
// doubles of shared memory, free for reuse when this returns.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

struct Stats {
  float mu = 0.f, inv = 1.f;
};

// Statistics of row[0, C) (all threads of the CTA call it).
__device__ __forceinline__ Stats stats(const float* row, int64_t C, const NormDev& norm, double* scratch) {
  double mean = 0.0;
  if (norm.kind == 0) {
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += static_cast<double>(row[c]);
    mean = block_sum(s, scratch) / static_cast<double>(C);
  }
  double v = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double d = static_cast<double>(row[c]) - mean;
    v += d * d;
  }
  const double var = block_sum(v, scratch) / static_cast<double>(C);
  Stats s;
  s.inv = static_cast<float>(1.0 / sqrt(var + static_cast<double>(norm.eps)));
  s.mu = static_cast<float>(mean);
  return s;
}

// (x - mu) * inv * w[c] + (b ? b[c] : 0)
__device__ __forceinline__ float apply(float x, const Stats& s, const NormDev& norm, int64_t c) {
  const float y = __fmul_rn(__fmul_rn(__fsub_rn(x, s.mu), s.inv), norm.weight[c]);
  return __fadd_rn(y, norm.bias != nullptr ? norm.bias[c] : 0.f);
}

}  // namespace rownorm
}  // namespace cuda
}  // namespace finequant
