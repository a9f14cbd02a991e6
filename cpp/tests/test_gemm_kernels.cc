// The fast integer GEMMs (AVX512-VNNI, AVX2: each one the CPU has) against the reference
// (quantize_rows + gemm_int_quantized_ref): the same quantized rows, identical int32 sums and the same
// fp32 epilogue order, so every output must be bit-identical. Covers sym/asym on both sides, 8/4-bit ranges, K-blocks with a short last
// block, K not a multiple of 4/8/16, odd N, grouped rows, bias, both GeLUs, M = 1 and M not a
// multiple of the row block, raw extreme integer weights, and NaN input.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <tuple>

#include "check.h"
#include "finequant/quant.h"
#include "kernels/cpu/gemm.h"
#include "layers/ops.h"

using namespace finequant;
using kernels::Epilogue;

static Tensor random_tensor(int64_t r, int64_t c, std::mt19937& rng, float shift) {
  Tensor t = Tensor::empty(DType::F32, {r, c});
  std::normal_distribution<float> nd(shift, 1.f);
  for (int64_t i = 0; i < r * c; ++i) t.data<float>()[i] = nd(rng);
  return t;
}

// Runs the reference and every fast kernel this CPU has on the same F32 rows; returns the number of
// outputs that differ bit-wise from the reference.
static int64_t compare(const Tensor& x, const kernels::IntWeight& iw, const float* bias, Epilogue e) {
  const int64_t M = x.dim(0), N = iw.N;
  Tensor y_ref = Tensor::empty(DType::F32, {M, N}), y = Tensor::empty(DType::F32, {M, N});
  const kernels::StoredRows rows(x.data<float>(), M, x.dim(1));
  kernels::gemm_int_ref(rows, iw, bias, y_ref.data<float>(), e);
  int64_t bad = 0;
  for (auto [name, kernel, has] : {std::make_tuple("vnni", &kernels::gemm_int_avx512vnni, kernels::cpu_has_avx512vnni()),
                                   std::make_tuple("avx2", &kernels::gemm_int_avx2, kernels::cpu_has_avx2())}) {
    if (!has) continue;
    kernel(rows, iw, bias, y.data<float>(), e);
    for (int64_t i = 0; i < M * N; ++i)
      if (std::memcmp(&y_ref.data<float>()[i], &y.data<float>()[i], 4) != 0) {
        if (bad < 3)
          std::printf("  %s mismatch at %lld: ref %.9g got %.9g\n", name, static_cast<long long>(i),
                      y_ref.data<float>()[i], y.data<float>()[i]);
        ++bad;
      }
  }
  return bad;
}

// Both fast layouts (each one the CPU supports).
static void prepare_fast(kernels::IntWeight& iw) {
  kernels::prepare_int_weight_avx512vnni(iw);
  kernels::prepare_int_weight_avx2(iw);
  CHECK(iw.vnni.ready == kernels::cpu_has_avx512vnni());
  CHECK(iw.avx2.ready == kernels::cpu_has_avx2());
}

static kernels::IntWeight prepare(const QuantizedTensor& wq, int wbits, Tile tile, QuantSpec act) {
  kernels::IntWeight iw = kernels::prepare_int_weight(wq.q, wq.scale, wq.zero_point, tile.rows, tile.cols, wbits, act);
  prepare_fast(iw);
  return iw;
}

static int64_t run_case(int64_t M, int64_t N, int64_t K, int wbits, bool wsym, int abits, bool asym_act, Tile tile,
                        bool with_bias, Epilogue e, uint32_t seed) {
  std::mt19937 rng(seed);
  const Tensor x = random_tensor(M, K, rng, 0.3f), w = random_tensor(N, K, rng, -0.2f);
  const QuantizedTensor wq = quantize(w, QuantSpec{wbits, wsym}, tile);
  const kernels::IntWeight iw = prepare(wq, wbits, tile, QuantSpec{abits, !asym_act});
  std::vector<float> bias(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) bias[n] = 0.1f * static_cast<float>(n) - 0.7f;
  const int64_t bad = compare(x, iw, with_bias ? bias.data() : nullptr, e);
  if (bad)
    std::printf("  case M=%lld N=%lld K=%lld w%d%s a%d%s tile %lldx%lld: %lld mismatches\n", (long long)M,
                (long long)N, (long long)K, wbits, wsym ? "sym" : "asym", abits, asym_act ? "asym" : "sym",
                (long long)tile.rows, (long long)tile.cols, (long long)bad);
  return bad;
}

static bool have_fast() {
  if (kernels::cpu_has_avx512vnni() || kernels::cpu_has_avx2()) return true;
  std::printf("  skipped: CPU lacks AVX2 and AVX512-VNNI\n");
  return false;
}

static bool have_vnni() {
  if (kernels::cpu_has_avx512vnni()) return true;
  std::printf("  skipped: CPU lacks AVX512-VNNI\n");
  return false;
}

TEST(all_type_combinations_per_channel) {
  if (!have_fast()) return;
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 61}, {5, 16, 4}, {9, 48, 128}, {1, 1, 3}, {13, 100, 257}};
  uint32_t seed = 1;
  for (auto& s : shapes)
    for (int wb : {8, 4})
      for (int ab : {8, 4})
        for (bool wsym : {true, false})
          for (bool aasym : {false, true}) {
            int64_t K = s[2];
            if (wb == 4 && K % 2) ++K;  // INT4 packing wants even K (the kernels would not care)
            CHECK_EQ(run_case(s[0], s[1], K, wb, wsym, ab, aasym, Tile{1, K}, true, Epilogue::None, seed++), 0);
          }
}

TEST(k_blocks_with_partial_last_block) {
  if (!have_fast()) return;
  uint32_t seed = 100;
  for (int64_t G : {32, 64, 128})
    for (int64_t K : {G * 3 + 10, G * 2, G + 2, G * 5 + G / 2 + 6})
      for (bool wsym : {true, false})
        for (bool aasym : {false, true}) {
          CHECK_EQ(run_case(7, 45, K, 4, wsym, 8, aasym, Tile{1, G}, true, Epilogue::None, seed++), 0);
          CHECK_EQ(run_case(1, 67, K, 4, wsym, 8, aasym, Tile{1, G}, false, Epilogue::GeluErf, seed++), 0);
        }
  // Block lengths that are not a multiple of 4 (every block padded separately).
  CHECK_EQ(run_case(6, 20, 50, 8, true, 8, false, Tile{1, 18}, true, Epilogue::None, 7), 0);
  CHECK_EQ(run_case(6, 20, 50, 8, false, 8, true, Tile{1, 15}, true, Epilogue::None, 8), 0);
}

TEST(grouped_rows_bias_and_gelu) {
  if (!have_fast()) return;
  uint32_t seed = 200;
  for (Epilogue e : {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh})
    for (bool bias : {false, true}) {
      CHECK_EQ(run_case(11, 48, 96, 8, true, 8, true, Tile{3, 96}, bias, e, seed++), 0);
      CHECK_EQ(run_case(4, 40, 96, 8, false, 8, false, Tile{8, 96}, bias, e, seed++), 0);
      CHECK_EQ(run_case(3, 42, 96, 4, false, 8, true, Tile{2, 32}, bias, e, seed++), 0);
      CHECK_EQ(run_case(1, 50, 100, 8, false, 8, true, Tile{50, 100}, bias, e, seed++), 0);  // per-tensor
    }
}

TEST(larger_shapes_many_tasks) {
  if (!have_fast()) return;
  CHECK_EQ(run_case(130, 200, 576, 8, true, 8, true, Tile{1, 576}, true, Epilogue::GeluTanh, 300), 0);
  CHECK_EQ(run_case(67, 129, 320, 4, false, 8, false, Tile{1, 64}, true, Epilogue::None, 301), 0);
}

// Raw weight integers over the full storage ranges (including -128, which quantize() never
// produces), activation rows that quantize to the extremes, and large K: the int32 operand shifts
// and corrections must stay exact.
TEST(extreme_integer_values) {
  if (!have_fast()) return;
  std::mt19937 rng(5);
  const int64_t M = 7, N = 35, K = 4099;
  std::uniform_int_distribution<int> byte(0, 255), pick(0, 3);
  auto val = [&]() {  // mostly the extremes
    const int p = pick(rng);
    return p == 0 ? 0 : p == 1 ? 255 : p == 2 ? 128 : byte(rng);
  };
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t i = 0; i < M * K; ++i) {
    const int p = pick(rng);
    x.data<float>()[i] = p == 0 ? -3.f : p == 1 ? 3.f : p == 2 ? 0.f : 0.01f * static_cast<float>(byte(rng) - 128);
  }
  for (bool ws : {true, false})
    for (bool xs : {true, false}) {
      Tensor wq = Tensor::empty(ws ? DType::I8 : DType::U8, {N, K});
      Tensor sw = Tensor::empty(DType::F32, {N, 2}), zw;
      if (!ws) zw = Tensor::empty(DType::U8, {N, 2});
      for (int64_t i = 0; i < N * K; ++i) static_cast<uint8_t*>(wq.raw())[i] = static_cast<uint8_t>(val());
      for (int64_t i = 0; i < N * 2; ++i) {
        sw.data<float>()[i] = 1e-4f * (1 + i % 7);
        if (!ws) zw.data<uint8_t>()[i] = static_cast<uint8_t>(byte(rng));
      }
      kernels::IntWeight iw = kernels::prepare_int_weight(wq, sw, zw, 1, 2052, 8, QuantSpec{8, xs});
      prepare_fast(iw);
      CHECK_EQ(compare(x, iw, nullptr, Epilogue::None), 0);
    }
}

TEST(nan_input_is_an_error) {
  if (!have_vnni()) return;
  std::mt19937 rng(3);
  const Tensor w = random_tensor(20, 40, rng, 0.f);
  const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, 40});
  for (bool asym : {false, true}) {
    const kernels::IntWeight iw = prepare(wq, 8, Tile{1, 40}, QuantSpec{8, !asym});
    Tensor x = random_tensor(3, 40, rng, 0.f);
    x.data<float>()[1 * 40 + 17] = asym ? INFINITY : NAN;
    Tensor y = Tensor::empty(DType::F32, {3, 20});
    CHECK_THROWS_KIND(kernels::gemm_int_avx512vnni(kernels::StoredRows(x.data<float>(), 3, 40), iw, nullptr,
                                                   y.data<float>(), Epilogue::None),
                      ErrorKind::InvalidArgument);
  }
}

// A fused producer (LayerNorm rows made inside the GEMM's quantization) against its stored output.
TEST(fused_norm_rows_match_stored_rows) {
  std::mt19937 rng(11);
  const int64_t M = 13, N = 70, K = 96;
  const Tensor x = random_tensor(M, K, rng, 0.5f), w = random_tensor(N, K, rng, 0.f);
  Norm norm;
  norm.weight = random_tensor(1, K, rng, 1.f).reshape({K});
  norm.bias = random_tensor(1, K, rng, 0.f).reshape({K});
  const Tensor normed = norm.forward(x);
  for (bool asym : {false, true}) {
    const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, K});
    const kernels::IntWeight iw = prepare(wq, 8, Tile{1, K}, QuantSpec{8, !asym});
    Tensor a = Tensor::empty(DType::F32, {M, N}), b = Tensor::empty(DType::F32, {M, N});
    for (kernels::GemmIntFn kernel : {&kernels::gemm_int_ref, &kernels::gemm_int_avx2, &kernels::gemm_int_avx512vnni}) {
      kernel(norm.rows(x), iw, nullptr, a.data<float>(), Epilogue::None);
      kernel(kernels::StoredRows(normed.data<float>(), M, K), iw, nullptr, b.data<float>(), Epilogue::None);
      CHECK(std::memcmp(a.data<float>(), b.data<float>(), static_cast<size_t>(M * N) * 4) == 0);
    }
  }
}

TEST(peak_measure_runs) {
  if (!have_vnni()) return;
  CHECK(kernels::int8_peak_gops(1, 0.02) > 1.0);
}

// The AVX-512 FP32 kernel against the reference loops (different summation order: a tolerance).
TEST(f32_kernel_matches_reference) {
  if (!have_vnni()) return;
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 61}, {13, 100, 257}, {1, 1, 3}, {130, 200, 96}, {6, 64, 16}};
  uint32_t seed = 400;
  for (auto& s : shapes)
    for (Epilogue e : {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh}) {
      std::mt19937 rng(seed++);
      const int64_t M = s[0], N = s[1], K = s[2];
      const Tensor x = random_tensor(M, K, rng, 0.1f), w = random_tensor(N, K, rng, 0.f);
      std::vector<float> bias(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) bias[n] = 0.05f * static_cast<float>(n % 7) - 0.1f;
      kernels::F32Weight ref;
      ref.w = w;
      ref.N = N;
      ref.K = K;
      const kernels::F32Weight packed = kernels::prepare_f32_weight(w);
      CHECK(!packed.packed.empty());
      Tensor y_ref = Tensor::empty(DType::F32, {M, N}), y = Tensor::empty(DType::F32, {M, N});
      kernels::gemm_f32_ref(x.data<float>(), M, ref, bias.data(), y_ref.data<float>(), e);
      kernels::gemm_f32_avx512(x.data<float>(), M, packed, bias.data(), y.data<float>(), e);
      double worst = 0;
      for (int64_t i = 0; i < M * N; ++i)
        worst = std::fmax(worst, std::fabs(y.data<float>()[i] - y_ref.data<float>()[i]) /
                                     (1.0 + std::fabs(y_ref.data<float>()[i])));
      CHECK(worst < 1e-5);
    }
}

TEST(dispatch_and_forced_reference) {
  kernels::force_isa(kernels::Isa::Ref);
  CHECK(kernels::active_isa() == kernels::Isa::Ref);
  CHECK(kernels::select_gemm_int() == &kernels::gemm_int_ref);
  {
    std::mt19937 rng(9);
    const Tensor w = random_tensor(8, 16, rng, 0.f);
    const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, 16});
    const kernels::IntWeight iw = kernels::prepare_int_weight(wq.q, wq.scale, wq.zero_point, 1, 16, 8, QuantSpec{});
    CHECK(!iw.vnni.ready);  // no packing when the reference is forced
    CHECK(kernels::prepare_f32_weight(w).packed.empty());
    CHECK(kernels::select_gemm_f32() == &kernels::gemm_f32_ref);
  }
  kernels::force_isa(kernels::Isa::Avx512Vnni);
  if (kernels::cpu_has_avx512vnni()) {
    CHECK(kernels::active_isa() == kernels::Isa::Avx512Vnni);
    CHECK(kernels::select_gemm_int() == &kernels::gemm_int_avx512vnni);
  } else {
    // A missing ISA falls back to the next lower one.
    CHECK(kernels::active_isa() == (kernels::cpu_has_avx2() ? kernels::Isa::Avx2 : kernels::Isa::Ref));
  }
  kernels::force_isa(kernels::Isa::Avx2);
  if (kernels::cpu_has_avx2()) {
    CHECK(kernels::active_isa() == kernels::Isa::Avx2);
    CHECK(kernels::select_gemm_int() == &kernels::gemm_int_avx2);
    CHECK(kernels::select_gemm_f32() == &kernels::gemm_f32_ref);
  }
  kernels::force_isa(kernels::Isa::Auto);
}

int main() { return RUN_ALL_TESTS(); }
