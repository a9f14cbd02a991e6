// The reference integer GEMM (fused dequantization epilogue) against "dequantize, then float
// GEMM" on the same quantized operands: they must agree to fp32 rounding for every combination of
// symmetric/asymmetric sides, 8/4 bits, grouped rows and K-blocks (with a short last block).
#include <cmath>
#include <cstdio>
#include <random>

#include "check.h"
#include "finequant/quant.h"
#include "kernels/cpu/gemm.h"

using namespace finequant;
using fqtest::random_tensor;

static int failures = 0;

static void check(int wbits, bool wsym, int abits, bool asym_act, Tile tile, const char* label) {
  std::mt19937 rng(42);
  const int64_t M = 5, N = 12, K = 40;
  const Tensor x = random_tensor({M, K}, rng, 0.3f), w = random_tensor({N, K}, rng, -0.2f);
  const QuantizedTensor wq = quantize(w, QuantSpec{wbits, wsym}, tile);
  const QuantizedTensor xq = quantize_rows(x, QuantSpec{abits, !asym_act});
  const kernels::IntWeight iw = kernels::make_int_weight(wq, QuantSpec{abits, !asym_act}, ThreadPool::shared(1));
  float bias[N];
  for (int64_t n = 0; n < N; ++n) bias[n] = 0.1f * static_cast<float>(n);
  Tensor y = Tensor::empty(DType::F32, {M, N});
  kernels::gemm_int_quantized_ref(xq, iw, bias, y.data<float>(), kernels::Epilogue::GeluErf, ThreadPool::shared(1));

  const Tensor xd = dequantize(xq), wd = dequantize(wq);
  double max_err = 0, max_ref = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias[n];
      for (int64_t k = 0; k < K; ++k) acc += double(xd.data<float>()[m * K + k]) * wd.data<float>()[n * K + k];
      const double ref = 0.5 * acc * (1 + std::erf(acc / std::sqrt(2.0)));
      max_err = std::fmax(max_err, std::fabs(ref - y.data<float>()[m * N + n]));
      max_ref = std::fmax(max_ref, std::fabs(ref));
    }
  const bool ok = max_err <= 1e-5 * std::fmax(max_ref, 1.0);
  std::printf("%-40s max_err %.3g  %s\n", label, max_err, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

int main() {
  check(8, true, 8, false, Tile{1, 40}, "w8 sym per-channel, a8 sym");
  check(8, false, 8, true, Tile{1, 40}, "w8 asym per-channel, a8 asym");
  check(8, true, 8, true, Tile{3, 40}, "w8 sym groups rows=3, a8 asym");
  check(8, false, 8, false, Tile{4, 40}, "w8 asym groups rows=4, a8 sym");
  check(4, true, 8, false, Tile{1, 16}, "w4 sym kblock 16 (short last), a8 sym");
  check(4, false, 8, true, Tile{1, 16}, "w4 asym kblock 16, a8 asym");
  check(4, true, 4, false, Tile{2, 16}, "w4 sym rows=2 kblock 16, a4 sym");
  check(4, false, 4, true, Tile{12, 40}, "w4 asym per-tensor, a4 asym");
  return failures == 0 ? 0 : 1;
}
