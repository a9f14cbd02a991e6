// The reference integer GEMM (fused dequantization epilogue) against "dequantize, then float
// GEMM" on the same quantized operands: they must agree to fp32 rounding for every combination of
// symmetric/asymmetric sides, 8/4 bits, grouped rows and K-blocks (with a short last block).
#include <cmath>
#include <cstdio>
#include <random>

#include <cstring>

#include "check.h"
#include "kernels/act_math.h"
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

// actmath::erf clamps |x| at kErfSaturate and gelu_tanh its tanh argument at kTanhSaturate (no
// overflowing powers, no denormal intermediates): every |x| beyond erf's clamp must give exactly 1.0f,
// the formula must stay within 5e-7 of erf below it (and within 1e-6 relative near 0, above the
// denormals x * P makes), and gelu_tanh's clamp must not move any value.
static float gelu_tanh_unclamped(float v) {
  using namespace kernels::actmath;
  const float u = kSqrt2OverPi * (v + kGeluTanhC * (v * v * v));
  const float th = 1.0f - 2.0f / (kernels::actmath::exp(2.0f * u) + 1.0f);
  return 0.5f * v * (1.0f + th);
}

static void check_erf_saturation() {
  int bad = 0;
  int64_t n = 0;
  // Every 61st float from 3.0 to FLT_MAX, both signs, and every float in [3.999, 4.001] (gelu_tanh
  // clamps u = 10 at |v| ~ 7.3, inside the first range).
  const auto scan = [&](uint32_t from, uint32_t to, uint32_t step) {
    for (uint32_t bits = from; bits <= to && bits >= from; bits += step) {
      float x;
      std::memcpy(&x, &bits, 4);
      for (float v : {x, -x}) {
        ++n;
        const float got = kernels::actmath::erf(v);
        const double want = std::erf(static_cast<double>(v));
        if (std::fabs(got - want) > 5e-7 || (std::fabs(v) >= kernels::actmath::kErfSaturate && std::fabs(got) != 1.0f) ||
            std::copysign(1.0f, got) != std::copysign(1.0f, v)) {
          if (bad++ < 5) std::printf("erf(%.9g): %.9g, erf %.9g\n", v, got, want);
        }
        const float g = kernels::actmath::gelu_tanh(v), g_want = gelu_tanh_unclamped(v);
        if (std::memcmp(&g, &g_want, 4) != 0 && !(std::isnan(g) && std::isnan(g_want))) {
          if (bad++ < 5) std::printf("gelu_tanh(%.9g): %.9g, unclamped %.9g\n", v, g, g_want);
        }
      }
    }
  };
  uint32_t b3, bmax = 0x7f7fffffu, lo, hi;
  const float three = 3.0f, l = 3.999f, h = 4.001f;
  std::memcpy(&b3, &three, 4);
  std::memcpy(&lo, &l, 4);
  std::memcpy(&hi, &h, 4);
  scan(b3, bmax, 61);
  scan(lo, hi, 1);
  // Below the clamp: every 97th float of (0, 3), against double erf (relative error near 0).
  for (uint32_t bits = 1; bits < b3; bits += 97) {
    float x;
    std::memcpy(&x, &bits, 4);
    ++n;
    const float got = kernels::actmath::erf(x);
    const double want = std::erf(static_cast<double>(x));
    if (std::fabs(got - want) > 5e-7 || (x > 1e-35f && x < 1e-3f && std::fabs(got - want) > 1e-6 * want)) {
      if (bad++ < 5) std::printf("erf(%.9g): %.9g, erf %.9g\n", x, got, want);
    }
  }
  const float nan = kernels::actmath::erf(std::nanf(""));
  if (!std::isnan(nan)) ++bad;
  std::printf("%-40s %lld values  %s\n", "erf accuracy / erf, tanh clamps", (long long)n, bad ? "FAIL" : "ok");
  if (bad) ++failures;
}

int main() {
  check_erf_saturation();
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
