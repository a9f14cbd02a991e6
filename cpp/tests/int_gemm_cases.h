// The integer GEMM case matrix shared by test_gemm_kernels (the registered kernels this CPU runs) and
// test_gemm_emulated (the AVX-VNNI and AMX kernels with their instructions emulated): every kernel
// under test against the reference (quantize_rows + gemm_int_quantized_ref), bit for bit, over
// sym/asym on both sides, 8/4-bit weights and activations, K-blocks (32, 48, 64, 128, odd lengths, a
// short last block), K not a multiple of 4/8/64, odd N, grouped rows, bias, both GeLUs, M = 1, M
// across row tiles and chunks, raw extreme integer weights, NaN input. The including file defines
// kernels_under_test() and main().
#pragma once
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "finequant/quant.h"
#include "kernels/cpu/gemm.h"

using namespace finequant;
using fqtest::random_tensor;
using kernels::Epilogue;

struct KernelUnderTest {
  std::string name;
  kernels::IntGemmKernel kernel;
};
const std::vector<KernelUnderTest>& kernels_under_test();

static ThreadPool& pool() { return ThreadPool::shared(2); }
static ExecContext cpu_context() { return kernels::backend_for(Device::cpu()).context(pool()); }

static std::unique_ptr<kernels::CpuLinear> prepare_with(const kernels::IntGemmKernel& k, const QuantizedTensor& wq,
                                                        QuantSpec act, const float* bias, Epilogue e) {
  std::unique_ptr<kernels::CpuLinear> p = k.prepare(kernels::make_int_weight(wq, act, pool()), pool());
  p->epilogue = e;
  if (bias) {
    p->bias = Tensor::empty(DType::F32, {p->N});
    std::memcpy(p->bias.data<float>(), bias, static_cast<size_t>(p->N) * 4);
  }
  return p;
}

// Outputs of every kernel under test that differ bit-wise from the reference.
static int64_t compare(const kernels::RowInput& rows, const QuantizedTensor& wq, QuantSpec act, const float* bias,
                       Epilogue e) {
  const int64_t M = rows.rows, N = wq.q.dim(0);
  Tensor y_ref = Tensor::empty(DType::F32, {M, N}), y = Tensor::empty(DType::F32, {M, N});
  kernels::gemm_int_quantized_ref(quantize_rows(rows.materialize(pool()), act), kernels::make_int_weight(wq, act, pool()),
                                  bias, y_ref.data<float>(), e, pool());
  const ExecContext ctx = cpu_context();
  int64_t bad = 0;
  for (const KernelUnderTest& k : kernels_under_test()) {
    std::memset(y.data<float>(), 0xff, static_cast<size_t>(M * N) * 4);  // NaN: every output must be written
    prepare_with(k.kernel, wq, act, bias, e)->run(ctx, rows, y.data<float>());
    for (int64_t i = 0; i < M * N; ++i)
      if (std::memcmp(&y_ref.data<float>()[i], &y.data<float>()[i], 4) != 0) {
        if (bad < 3)
          std::printf("  %s mismatch at %lld: ref %.9g got %.9g\n", k.name.c_str(), static_cast<long long>(i),
                      y_ref.data<float>()[i], y.data<float>()[i]);
        ++bad;
      }
  }
  return bad;
}

static int64_t run_case(int64_t M, int64_t N, int64_t K, int wbits, bool wsym, int abits, bool asym_act, Tile tile,
                        bool with_bias, Epilogue e, uint32_t seed, bool half_scales = false) {
  std::mt19937 rng(seed);
  const Tensor x = random_tensor({M, K}, rng, 0.3f), w = random_tensor({N, K}, rng, -0.2f);
  const QuantizedTensor wq = quantize(w, QuantSpec{wbits, wsym}, tile, half_scales);
  std::vector<float> bias(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) bias[n] = 0.1f * static_cast<float>(n) - 0.7f;
  const int64_t bad = compare(kernels::RowInput{x.data<float>(), M, K, nullptr}, wq, QuantSpec{abits, !asym_act},
                              with_bias ? bias.data() : nullptr, e);
  if (bad)
    std::printf("  case M=%lld N=%lld K=%lld w%d%s a%d%s tile %lldx%lld: %lld mismatches\n", (long long)M,
                (long long)N, (long long)K, wbits, wsym ? "sym" : "asym", abits, asym_act ? "asym" : "sym",
                (long long)tile.rows, (long long)tile.cols, (long long)bad);
  return bad;
}

TEST(all_type_combinations_per_channel) {
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 61}, {5, 16, 4}, {9, 48, 128}, {1, 1, 3}, {13, 100, 257}, {17, 17, 130}};
  uint32_t seed = 1;
  for (auto& s : shapes)
    for (int wb : {8, 4})
      for (int ab : {8, 4})
        for (bool wsym : {true, false})
          for (bool aasym : {false, true}) {
            int64_t K = s[2];
            if (wb == 4 && K % 2) ++K;  // INT4 weights come with even K (pack_int4)
            CHECK_EQ(run_case(s[0], s[1], K, wb, wsym, ab, aasym, Tile{1, K}, true, Epilogue::None, seed++), 0);
          }
}

TEST(k_blocks_with_partial_last_block) {
  uint32_t seed = 100;
  // 96: the AMX kernel's half tiles (32-k steps) for blocks that a 64-k step would pad by more than 32.
  for (int64_t G : {32, 48, 64, 96, 128})
    for (int64_t K : {G * 3 + 10, G * 2, G + 2, G * 5 + G / 2 + 6})
      for (bool wsym : {true, false})
        for (bool aasym : {false, true}) {
          CHECK_EQ(run_case(7, 45, K, 4, wsym, 8, aasym, Tile{1, G}, true, Epilogue::None, seed++), 0);
          CHECK_EQ(run_case(37, 70, K, 8, wsym, 8, aasym, Tile{1, G}, true, Epilogue::GeluTanh, seed++), 0);
          CHECK_EQ(run_case(1, 67, K, 4, wsym, 8, aasym, Tile{1, G}, false, Epilogue::GeluErf, seed++), 0);
          CHECK_EQ(run_case(3, 19, K, 8, wsym, 4, aasym, Tile{1, G}, true, Epilogue::GeluTanh, seed++), 0);
          // Decode-sized calls (M <= 2): the VNNI kernel sums blocked weight columns in the kernel.
          CHECK_EQ(run_case(2, 83, K, 4, wsym, 8, aasym, Tile{1, G}, true, Epilogue::None, seed++), 0);
          CHECK_EQ(run_case(1, 29, K, 8, wsym, 8, aasym, Tile{1, G}, true, Epilogue::GeluTanh, seed++), 0);
          CHECK_EQ(run_case(2, 64, K, 8, wsym, 8, aasym, Tile{1, G}, false, Epilogue::None, seed++), 0);
        }
  // scale_dtype fp16: kernels may keep exact-half scales in half the bytes (the VNNI kernel does).
  for (int64_t G : {32, 64})
    for (bool wsym : {true, false})
      for (bool aasym : {false, true})
        for (int64_t M : {1, 2, 7, 11}) {
          CHECK_EQ(run_case(M, 77, G * 4 + 6, 4, wsym, 8, aasym, Tile{1, G}, true, Epilogue::GeluTanh, seed++, true), 0);
          CHECK_EQ(run_case(M, 64, G * 3, 8, wsym, 8, aasym, Tile{1, G}, false, Epilogue::None, seed++, true), 0);
        }
  // Decode-sized calls over many channel tiles: each pool task is a run of tiles (guided_runs: long
  // runs first, single tiles last), N odd.
  for (int64_t M : {1, 2, 4})
    for (bool aasym : {false, true}) {
      CHECK_EQ(run_case(M, 1001, 130, 4, true, 8, aasym, Tile{1, 32}, true, Epilogue::None, seed++, true), 0);
      CHECK_EQ(run_case(M, 1001, 130, 8, true, 8, aasym, Tile{1, 130}, false, Epilogue::GeluErf, seed++), 0);
    }
  // One row chunk of several row groups over runs of tiles (BERT at batch 1, decode at batch 8): later
  // groups prefetch the run's next tile; a remainder group last.
  for (int64_t M : {8, 32, 50})
    for (bool aasym : {false, true}) {
      CHECK_EQ(run_case(M, 1001, 130, 4, true, 8, aasym, Tile{1, 32}, true, Epilogue::None, seed++, true), 0);
      CHECK_EQ(run_case(M, 1001, 130, 8, !aasym, 8, aasym, Tile{1, 130}, false, Epilogue::GeluErf, seed++), 0);
    }
  // Block lengths that are not a multiple of 4 (every block padded separately).
  CHECK_EQ(run_case(6, 20, 50, 8, true, 8, false, Tile{1, 18}, true, Epilogue::None, 7), 0);
  CHECK_EQ(run_case(6, 20, 50, 8, false, 8, true, Tile{1, 15}, true, Epilogue::None, 8), 0);
  CHECK_EQ(run_case(5, 21, 70, 4, true, 4, true, Tile{1, 22}, true, Epilogue::None, 9), 0);
}

TEST(grouped_rows_bias_and_gelu) {
  uint32_t seed = 200;
  for (Epilogue e : {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh})
    for (bool bias : {false, true}) {
      CHECK_EQ(run_case(11, 48, 96, 8, true, 8, true, Tile{3, 96}, bias, e, seed++), 0);
      CHECK_EQ(run_case(4, 40, 96, 8, false, 8, false, Tile{8, 96}, bias, e, seed++), 0);
      CHECK_EQ(run_case(3, 42, 96, 4, false, 8, true, Tile{2, 32}, bias, e, seed++), 0);
      CHECK_EQ(run_case(1, 50, 100, 8, false, 8, true, Tile{50, 100}, bias, e, seed++), 0);  // per-tensor
    }
}

// Several row tiles, row chunks and channel tiles / strips per call (the AMX kernel: 32-row
// blocks, a 1-row last block, 128-row chunks, a last strip of one panel).
TEST(larger_shapes_many_tasks) {
  CHECK_EQ(run_case(130, 200, 576, 8, true, 8, true, Tile{1, 576}, true, Epilogue::GeluTanh, 300), 0);
  CHECK_EQ(run_case(67, 129, 320, 4, false, 8, false, Tile{1, 64}, true, Epilogue::None, 301), 0);
  CHECK_EQ(run_case(33, 16, 192, 4, true, 8, false, Tile{1, 64}, false, Epilogue::GeluErf, 302), 0);
  CHECK_EQ(run_case(258, 40, 100, 8, false, 4, true, Tile{1, 100}, true, Epilogue::None, 303), 0);
}

// Activations whose quotient x / s lies on or next to a half-integer (the rounding boundary), where a
// kernel that multiplies by 1 / s instead of dividing could round to another integer.
TEST(activation_quotients_at_half_integers) {
  std::mt19937 rng(11);
  const int64_t M = 9, N = 24, K = 256;
  const Tensor w = random_tensor({N, K}, rng, 0.f);
  const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, K});
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::uniform_int_distribution<int> side(0, 2);
  for (bool asym : {false, true})
    for (int bits : {8, 4}) {
      Tensor x = Tensor::empty(DType::F32, {M, K});
      for (int64_t m = 0; m < M; ++m) {
        float* r = x.data<float>() + m * K;
        // The row's range fixes s as quantize computes it: [-A, A] (symmetric) or [-A, 2A].
        const float A = 0.37f * static_cast<float>(m + 1), qmax = static_cast<float>((1 << (bits - (asym ? 0 : 1))) - 1);
        r[0] = -A;
        r[1] = asym ? 2 * A : A;
        const float s = asym ? (r[1] - r[0]) / qmax : A / qmax;
        const float first = std::ceil(r[0] / s), span = std::floor(r[1] / s) - first;  // integer quotients inside
        for (int64_t k = 2; k < K; ++k) {
          const float h = first + std::floor(u(rng) * (span - 1)) + 0.5f;  // a half-integer quotient
          const float v = h * s;
          const int d = side(rng);  // that value, or a neighbouring float
          r[k] = d == 0 ? v : std::nextafter(v, d == 1 ? -INFINITY : INFINITY);
        }
      }
      CHECK_EQ(compare(kernels::RowInput{x.data<float>(), M, K, nullptr}, wq, QuantSpec{bits, !asym}, nullptr,
                       Epilogue::None), 0);
    }
}

// Raw weight integers over the full storage ranges (including -128, which quantize() never
// produces), activation rows that quantize to the extremes, and large K: the operand shifts and
// the int32 corrections must stay exact.
TEST(extreme_integer_values) {
  std::mt19937 rng(5);
  const int64_t M = 7, N = 35, K = 4099;
  std::uniform_int_distribution<int> byte(0, 255), pick(0, 3);
  auto zero_point = [&]() {  // weight zero points: mostly the extremes too
    const int p = pick(rng);
    return p == 0 ? 0 : p == 1 ? 255 : byte(rng);
  };
  auto val = [&]() {  // mostly the extremes
    const int p = pick(rng);
    return p == 0 ? 0 : p == 1 ? 255 : p == 2 ? 128 : byte(rng);
  };
  Tensor x = Tensor::empty(DType::F32, {M, K});
  for (int64_t i = 0; i < M * K; ++i) {
    const int p = pick(rng);
    x.data<float>()[i] = p == 0 ? -3.f : p == 1 ? 3.f : p == 2 ? 0.f : 0.01f * static_cast<float>(byte(rng) - 128);
  }
  // Row 0 quantizes to all 255 (asymmetric) or 127: the largest row sums.
  for (int64_t k = 0; k < K; ++k) x.data<float>()[k] = 3.f;
  // K-blocks of 2052 (int32 corrections), of 128, the longest whose corrections take the AVX-512 kernel's
  // int16 pairs (row sums and weight column sums up to 255 x 128), and of 129, just past it.
  for (int64_t bk : {2052, 128, 129})
    for (bool ws : {true, false})
      for (bool xs : {true, false}) {
        const int64_t nb = (K + bk - 1) / bk;
        Tensor wq = Tensor::empty(ws ? DType::I8 : DType::U8, {N, K});
        Tensor sw = Tensor::empty(DType::F32, {N, nb}), zw;
        if (!ws) zw = Tensor::empty(DType::U8, {N, nb});
        for (int64_t i = 0; i < N * K; ++i) static_cast<uint8_t*>(wq.raw())[i] = static_cast<uint8_t>(val());
        for (int64_t i = 0; i < N * nb; ++i) {
          sw.data<float>()[i] = 1e-4f * (1 + i % 7);
          if (!ws) zw.data<uint8_t>()[i] = static_cast<uint8_t>(zero_point());
        }
        // The largest column sums: channel 0 all 127 (symmetric) or 255 with zero point 0, channel N - 1 all
        // -128 or 0 with zero point 255.
        for (int64_t k = 0; k < K; ++k) {
          static_cast<uint8_t*>(wq.raw())[k] = ws ? 127 : 255;
          static_cast<uint8_t*>(wq.raw())[(N - 1) * K + k] = ws ? 0x80 : 0;
        }
        if (!ws)
          for (int64_t b = 0; b < nb; ++b) {
            zw.data<uint8_t>()[b] = 0;
            zw.data<uint8_t>()[(N - 1) * nb + b] = 255;
          }
        QuantizedTensor qt;
        qt.q = wq;
        qt.scale = sw;
        qt.zero_point = zw;
        qt.spec = QuantSpec{8, ws};
        qt.tile = Tile{1, bk};
        CHECK_EQ(compare(kernels::RowInput{x.data<float>(), M, K, nullptr}, qt, QuantSpec{8, xs}, nullptr, Epilogue::None), 0);
      }
}

TEST(nan_input_is_an_error) {
  std::mt19937 rng(3);
  const Tensor w = random_tensor({20, 40}, rng, 0.f);
  const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, 40});
  const ExecContext ctx = cpu_context();
  for (const KernelUnderTest& k : kernels_under_test()) {
    for (bool asym : {false, true})
      for (float bad : {NAN, INFINITY, -INFINITY}) {
        const auto p = prepare_with(k.kernel, wq, QuantSpec{8, !asym}, nullptr, Epilogue::None);
        Tensor x = random_tensor({3, 40}, rng, 0.f);
        x.data<float>()[1 * 40 + 17] = bad;
        Tensor y = Tensor::empty(DType::F32, {3, 20});
        CHECK_THROWS_KIND(p->run(ctx, kernels::RowInput{x.data<float>(), 3, 40, nullptr}, y.data<float>()),
                          ErrorKind::InvalidArgument);
      }
  }
}
