// LayerNorm / RMSNorm of one row (the fused producer of the GEMMs and the stand-alone norm).
#include <algorithm>
#include <cmath>

#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

FQ_MULTIVERSION void normalize_row(const NormParams& norm, const float* xr, float* yr) {
  const int64_t C = norm.C;
  const float* w = norm.weight;
  const float* b = norm.bias;
  // Statistics in double: cheap here, and keeps us within fp32 rounding of PyTorch.
  double mean = 0.0;
  if (norm.kind == NormParams::Kind::LayerNorm) {
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<double>(C);
  }
  double var = 0.0;
#pragma omp simd reduction(+ : var)
  for (int64_t c = 0; c < C; ++c) {
    const double d = xr[c] - mean;
    var += d * d;
  }
  var /= static_cast<double>(C);
  const float inv = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(norm.eps)));
  const float mu = static_cast<float>(mean);
  for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * inv * w[c] + (b ? b[c] : 0.f);
}

void normalize_rows(const NormParams& norm, const float* x, int64_t M, float* y, ThreadPool& pool) {
  const int64_t C = norm.C;
  parallel_for(pool, M, parallel_rows_grain(C), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) normalize_row(norm, x + m * C, y + m * C);
  });
}

}  // namespace kernels
}  // namespace finequant
