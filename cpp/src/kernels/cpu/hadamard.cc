// The CPU block-Hadamard rotation y = x H (kernels/backend.h `hadamard`, docs/DESIGN.md section 2):
// the butterfly stages run over the whole row at once (each stage's pairs stay inside their block,
// since 2h divides b), in the defined order, then one multiply by float(1 / sqrt(b)). Only adds,
// subtracts and one multiply per value: nothing an FMA could contract, and the file is built with
// -ffp-contract=off all the same (CMakeLists.txt), so every ISA clone is bit-identical.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

namespace {

// One stage with a compile-time h (1, 2, 4): pairs (i, i + h) for i with bit h clear.
template <int H>
inline void stage_small(float* y, int64_t K) {
  for (int64_t base = 0; base < K; base += 2 * H)
    for (int i = 0; i < H; ++i) {
      const float a = y[base + i], c = y[base + H + i];
      y[base + i] = a + c;
      y[base + H + i] = a - c;
    }
}

FQ_MULTIVERSION void hadamard_row(const float* x, float* y, int64_t K, int64_t b, float scale) {
  if (x != y) std::memcpy(y, x, static_cast<size_t>(K) * sizeof(float));
  if (b >= 2) stage_small<1>(y, K);
  if (b >= 4) stage_small<2>(y, K);
  if (b >= 8) stage_small<4>(y, K);
  for (int64_t h = 8; h < b; h *= 2)  // contiguous runs of h: vector adds and subtracts
    for (int64_t base = 0; base < K; base += 2 * h) {
      float* p = y + base;
      float* q = p + h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) {
        const float a = p[i], c = q[i];
        p[i] = a + c;
        q[i] = a - c;
      }
    }
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) y[i] = y[i] * scale;
}

}  // namespace

float hadamard_scale(int64_t block) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))); }

void hadamard_rows(const float* x, float* y, int64_t rows, int64_t K, int64_t block, ThreadPool& pool) {
  if (rows <= 0 || K <= 0) return;
  const float scale = hadamard_scale(block);
  int64_t stages = 1;  // passes over a row: log2(b) butterflies + the scaling
  for (int64_t h = 1; h < block; h *= 2) ++stages;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K * stages, 1));
  parallel_for(pool, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) hadamard_row(x + r * K, y + r * K, K, block, scale);
  });
}

}  // namespace kernels
}  // namespace finequant
