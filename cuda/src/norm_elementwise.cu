// Norms and elementwise ops (kernels.h) with the CPU kernels' math: norm statistics in double,
// silu through actmath::exp, rope with float angles and accurate sinf / cosf. Products and sums
// are written with _rn intrinsics where the CPU form has no FMA (nvcc would contract them).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "finequant/error.h"
#include "kernels.h"
#include "row_norm.cuh"

namespace finequant {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxGridY = 65535;
constexpr int64_t kMaxHadamardBlock = 4096;

unsigned blocks_for(int64_t n, int64_t per_block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, cap)));
}

__global__ void __launch_bounds__(kThreads) norm_rows_kernel(const float* x, int64_t C, NormDev norm, float* y) {
  __shared__ double scratch[32];
  const int64_t m = blockIdx.x;
  const float* row = x + m * C;
  const rownorm::Stats s = rownorm::stats(row, C, norm, scratch);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) y[m * C + c] = rownorm::apply(row[c], s, norm, c);
}

__global__ void add_inplace_kernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __fadd_rn(x[i], y[i]);
}

// Rows over blockIdx.y (grid-stride), columns over x.
template <bool GELU_TANH>
__global__ void gated_mul_kernel(const float* gate, int64_t gs, const float* up, int64_t us, float* out, int64_t M,
                                 int64_t I) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < I;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float g = gate[m * gs + i];
      if (GELU_TANH) {
        out[m * I + i] = __fmul_rn(kernels::actmath::gelu_tanh(g), up[m * us + i]);
      } else {
        const float e = kernels::actmath::exp(-g);
        out[m * I + i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.f, e)), up[m * us + i]);
      }
    }
}

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = __fmul_rn(tanhf(__fdiv_rn(x[i], cap)), cap);
}

// One thread per (row, i < half): the angle once, then every head.
__global__ void rope_kernel(float* x, int64_t row_stride, int64_t M, int64_t heads, int64_t head_dim,
                            const float* inv_freq, const int64_t* positions) {
  const int64_t half = head_dim / 2;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < half;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float angle = __fmul_rn(static_cast<float>(positions[m]), inv_freq[i]);
      float sn, cs;
      sincosf(angle, &sn, &cs);
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + m * row_stride + h * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
        v[i + half] = __fadd_rn(__fmul_rn(b, cs), __fmul_rn(a, sn));
      }
    }
}

// Block-Hadamard rotation (kernels.h hadamard): a CTA takes `span` values of a row (whole blocks) into
// shared memory, runs the butterfly stages h = 1, 2, ..., b/2 over them (pair p of a stage: index
// (p / h) 2h + p % h and that + h; the pairs stay inside their block since 2h divides b), then writes
// each value times `scale`: the CPU's operations in the CPU's order, with _rn intrinsics so nothing is
// contracted. Rows over blockIdx.y (grid-stride). In place is safe: a CTA reads its span before it
// writes it, and spans do not overlap.
__global__ void __launch_bounds__(kThreads) hadamard_kernel(const float* x, float* y, int64_t M, int64_t K, int block,
                                                            int span, float scale) {
  extern __shared__ float s[];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * span;
  const int n = static_cast<int>(K - c0 < span ? K - c0 : span);
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float* xr = x + m * K + c0;
    float* yr = y + m * K + c0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = xr[i];
    __syncthreads();
    for (int h = 1; h < block; h *= 2) {
      for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
        const int i = (p / h) * 2 * h + p % h;
        const float a = s[i], c = s[i + h];
        s[i] = __fadd_rn(a, c);
        s[i + h] = __fsub_rn(a, c);
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __fmul_rn(s[i], scale);
    __syncthreads();  // the next row reuses s
  }
}

__global__ void gather_rows_kernel(const float* table, int64_t C, const int64_t* ids, int64_t n, float* out,
                                   bool add) {
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const float* src = table + ids[r] * C;
    float* dst = out + r * C;
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
      dst[c] = add ? __fadd_rn(dst[c], src[c]) : src[c];
  }
}

}  // namespace

void norm_rows(const float* x, int64_t M, int64_t C, const NormDev& norm, float* y, cudaStream_t stream) {
  if (M == 0 || C == 0) return;
  FQ_CHECK_ARG(M <= 0x7fffffff, "norm_rows: too many rows");
  norm_rows_kernel<<<static_cast<unsigned>(M), kThreads, 0, stream>>>(x, C, norm, y);
  check_launch("norm_rows");
}

void add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_inplace_kernel<<<blocks_for(n, kThreads, 8192), kThreads, 0, stream>>>(x, y, n);
  check_launch("add_inplace");
}

void gated_mul(bool gelu_tanh, const float* gate, int64_t gs, const float* up, int64_t us, float* out, int64_t M,
               int64_t I, cudaStream_t stream) {
  if (M == 0 || I == 0) return;
  const dim3 grid(blocks_for(I, kThreads, 1024), blocks_for(M, 1, kMaxGridY));
  if (gelu_tanh) gated_mul_kernel<true><<<grid, kThreads, 0, stream>>>(gate, gs, up, us, out, M, I);
  else gated_mul_kernel<false><<<grid, kThreads, 0, stream>>>(gate, gs, up, us, out, M, I);
  check_launch("gated_mul");
}

void softcap(float* x, int64_t n, float cap, cudaStream_t stream) {
  if (n == 0) return;
  softcap_kernel<<<blocks_for(n, kThreads, 8192), kThreads, 0, stream>>>(x, n, cap);
  check_launch("softcap");
}

void rope(float* x, int64_t row_stride, int64_t M, int64_t heads, int64_t head_dim, const float* inv_freq,
          const int64_t* positions, cudaStream_t stream) {
  const int64_t half = head_dim / 2;
  if (M == 0 || heads == 0 || half == 0) return;
  constexpr int kRopeThreads = 64;
  const dim3 grid(blocks_for(half, kRopeThreads, 1024), blocks_for(M, 1, kMaxGridY));
  rope_kernel<<<grid, kRopeThreads, 0, stream>>>(x, row_stride, M, heads, head_dim, inv_freq, positions);
  check_launch("rope");
}

void hadamard(const float* x, float* y, int64_t M, int64_t K, int64_t block, cudaStream_t stream) {
  if (M == 0 || K == 0) return;
  FQ_CHECK_ARG(block >= 2 && block <= kMaxHadamardBlock && (block & (block - 1)) == 0 && K % block == 0,
               "hadamard: block " + std::to_string(block) + " is not a power of two in [2, 4096] dividing K = " +
                   std::to_string(K));
  // Whole blocks per CTA, up to 2048 values (one block of 4096): at most 16 KiB of shared memory.
  const int64_t span = std::max<int64_t>(block, std::min<int64_t>(K, 2048));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));  // as the CPU
  const dim3 grid(static_cast<unsigned>((K + span - 1) / span), blocks_for(M, 1, kMaxGridY));
  hadamard_kernel<<<grid, kThreads, static_cast<size_t>(span) * sizeof(float), stream>>>(
      x, y, M, K, static_cast<int>(block), static_cast<int>(span), scale);
  check_launch("hadamard");
}

void gather_rows(const float* table, int64_t C, const int64_t* ids, int64_t n, float* out, bool add,
                 cudaStream_t stream) {
  if (n == 0 || C == 0) return;
  const dim3 grid(blocks_for(C, kThreads, 1024), blocks_for(n, 1, kMaxGridY));
  gather_rows_kernel<<<grid, kThreads, 0, stream>>>(table, C, ids, n, out, add);
  check_launch("gather_rows");
}

}  // namespace cuda
}  // namespace finequant
