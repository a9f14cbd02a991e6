// Every registered CPU GEMM kernel this CPU supports (kernels/cpu/registry.cc) against the reference
// (quantize_rows + gemm_int_quantized_ref): the same quantized rows, identical int32 sums and the same
// fp32 epilogue order, so every output must be bit-identical. Covers sym/asym on both sides, 8/4-bit ranges, K-blocks with a short last
// block, K not a multiple of 4/8/16, odd N, grouped rows, bias, both GeLUs, M = 1 and M not a
// multiple of the row block, raw extreme integer weights, NaN input, fused norm rows; the FP32 and
// attention kernels against their reference forms; the level selection of cpu_isa.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "check.h"
#include "finequant/quant.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gemm.h"

using namespace finequant;
using fqtest::random_tensor;
using kernels::Epilogue;

static ThreadPool& pool() { return ThreadPool::shared(2); }
static ExecContext cpu_context() { return kernels::backend_for(Device::cpu()).context(pool()); }

// A registered integer kernel's prepared weight with bias and epilogue set.
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

// Runs the reference and every registered kernel this CPU supports on the same rows; returns the
// number of outputs that differ bit-wise from the reference.
static int64_t compare(const kernels::RowInput& rows, const QuantizedTensor& wq, QuantSpec act, const float* bias,
                       Epilogue e) {
  const int64_t M = rows.rows, N = wq.q.dim(0);
  Tensor y_ref = Tensor::empty(DType::F32, {M, N}), y = Tensor::empty(DType::F32, {M, N});
  kernels::gemm_int_quantized_ref(quantize_rows(rows.materialize(pool()), act), kernels::make_int_weight(wq, act, pool()),
                                  bias, y_ref.data<float>(), e, pool());
  const ExecContext ctx = cpu_context();
  int64_t bad = 0;
  for (const kernels::IntGemmKernel& k : kernels::int_gemm_kernels()) {
    if (!kernels::cpu_supports(k.level)) continue;
    prepare_with(k, wq, act, bias, e)->run(ctx, rows, y.data<float>());
    for (int64_t i = 0; i < M * N; ++i)
      if (std::memcmp(&y_ref.data<float>()[i], &y.data<float>()[i], 4) != 0) {
        if (bad < 3)
          std::printf("  %s mismatch at %lld: ref %.9g got %.9g\n", kernels::isa_name(k.level),
                      static_cast<long long>(i), y_ref.data<float>()[i], y.data<float>()[i]);
        ++bad;
      }
  }
  return bad;
}

static int64_t compare(const Tensor& x, const QuantizedTensor& wq, QuantSpec act, const float* bias, Epilogue e) {
  return compare(kernels::RowInput{x.data<float>(), x.dim(0), x.dim(1), nullptr}, wq, act, bias, e);
}

static int64_t run_case(int64_t M, int64_t N, int64_t K, int wbits, bool wsym, int abits, bool asym_act, Tile tile,
                        bool with_bias, Epilogue e, uint32_t seed) {
  std::mt19937 rng(seed);
  const Tensor x = random_tensor({M, K}, rng, 0.3f), w = random_tensor({N, K}, rng, -0.2f);
  const QuantizedTensor wq = quantize(w, QuantSpec{wbits, wsym}, tile);
  std::vector<float> bias(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) bias[n] = 0.1f * static_cast<float>(n) - 0.7f;
  const int64_t bad = compare(x, wq, QuantSpec{abits, !asym_act}, with_bias ? bias.data() : nullptr, e);
  if (bad)
    std::printf("  case M=%lld N=%lld K=%lld w%d%s a%d%s tile %lldx%lld: %lld mismatches\n", (long long)M,
                (long long)N, (long long)K, wbits, wsym ? "sym" : "asym", abits, asym_act ? "asym" : "sym",
                (long long)tile.rows, (long long)tile.cols, (long long)bad);
  return bad;
}

TEST(all_type_combinations_per_channel) {
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
  CHECK_EQ(run_case(130, 200, 576, 8, true, 8, true, Tile{1, 576}, true, Epilogue::GeluTanh, 300), 0);
  CHECK_EQ(run_case(67, 129, 320, 4, false, 8, false, Tile{1, 64}, true, Epilogue::None, 301), 0);
}

// Raw weight integers over the full storage ranges (including -128, which quantize() never
// produces), activation rows that quantize to the extremes, and large K: the int32 operand shifts
// and corrections must stay exact.
TEST(extreme_integer_values) {
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
      QuantizedTensor qt;
      qt.q = wq;
      qt.scale = sw;
      qt.zero_point = zw;
      qt.spec = QuantSpec{8, ws};
      qt.tile = Tile{1, 2052};
      CHECK_EQ(compare(x, qt, QuantSpec{8, xs}, nullptr, Epilogue::None), 0);
    }
}

TEST(nan_input_is_an_error) {
  std::mt19937 rng(3);
  const Tensor w = random_tensor({20, 40}, rng, 0.f);
  const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, 40});
  const ExecContext ctx = cpu_context();
  for (const kernels::IntGemmKernel& k : kernels::int_gemm_kernels()) {
    if (!kernels::cpu_supports(k.level)) continue;
    for (bool asym : {false, true}) {
      const auto p = prepare_with(k, wq, QuantSpec{8, !asym}, nullptr, Epilogue::None);
      Tensor x = random_tensor({3, 40}, rng, 0.f);
      x.data<float>()[1 * 40 + 17] = asym ? INFINITY : NAN;
      Tensor y = Tensor::empty(DType::F32, {3, 20});
      CHECK_THROWS_KIND(p->run(ctx, kernels::RowInput{x.data<float>(), 3, 40, nullptr}, y.data<float>()),
                        ErrorKind::InvalidArgument);
    }
  }
}

// A fused producer (LayerNorm rows made inside the GEMM's quantization) against its stored output.
TEST(fused_norm_rows_match_stored_rows) {
  std::mt19937 rng(11);
  const int64_t M = 13, N = 70, K = 96;
  const Tensor x = random_tensor({M, K}, rng, 0.5f), w = random_tensor({N, K}, rng, 0.f);
  const Tensor gain = random_tensor({1, K}, rng, 1.f), shift = random_tensor({1, K}, rng, 0.f);
  const kernels::NormParams norm{kernels::NormParams::Kind::LayerNorm, gain.data<float>(), shift.data<float>(), 1e-5f, K};
  const kernels::RowInput fused{x.data<float>(), M, K, &norm};
  const Tensor normed = fused.materialize(pool());
  const ExecContext ctx = cpu_context();
  for (bool asym : {false, true}) {
    const QuantizedTensor wq = quantize(w, QuantSpec{8, true}, Tile{1, K});
    Tensor a = Tensor::empty(DType::F32, {M, N}), b = Tensor::empty(DType::F32, {M, N});
    for (const kernels::IntGemmKernel& k : kernels::int_gemm_kernels()) {
      if (!kernels::cpu_supports(k.level)) continue;
      const auto p = prepare_with(k, wq, QuantSpec{8, !asym}, nullptr, Epilogue::None);
      p->run(ctx, fused, a.data<float>());
      p->run(ctx, kernels::RowInput{normed.data<float>(), M, K, nullptr}, b.data<float>());
      CHECK(std::memcmp(a.data<float>(), b.data<float>(), static_cast<size_t>(M * N) * 4) == 0);
    }
  }
}

TEST(peak_measure_runs) {
  if (!kernels::cpu_supports(kernels::CpuIsa::Avx512Vnni)) {
    CHECK(kernels::int8_peak_gops(1, 0.02) == 0.0);
    return;
  }
  CHECK(kernels::int8_peak_gops(1, 0.02) > 1.0);
}

// Every registered FP32 kernel against the reference loops (different summation order: a tolerance).
TEST(f32_kernels_match_reference) {
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 61}, {13, 100, 257}, {1, 1, 3}, {130, 200, 96}, {6, 64, 16}};
  const ExecContext ctx = cpu_context();
  uint32_t seed = 400;
  for (auto& s : shapes)
    for (Epilogue e : {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh}) {
      std::mt19937 rng(seed++);
      const int64_t M = s[0], N = s[1], K = s[2];
      const Tensor x = random_tensor({M, K}, rng, 0.1f), w = random_tensor({N, K}, rng, 0.f);
      Tensor bias = Tensor::empty(DType::F32, {N});
      for (int64_t n = 0; n < N; ++n) bias.data<float>()[n] = 0.05f * static_cast<float>(n % 7) - 0.1f;
      // The plain double-precision product as the reference of every kernel.
      std::vector<double> ref(static_cast<size_t>(M * N));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double acc = bias.data<float>()[n];
          for (int64_t k = 0; k < K; ++k) acc += double(x.data<float>()[m * K + k]) * w.data<float>()[n * K + k];
          ref[m * N + n] = kernels::apply_epilogue(e, static_cast<float>(acc));
        }
      for (const kernels::F32GemmKernel& k : kernels::f32_gemm_kernels()) {
        if (!kernels::cpu_supports(k.level)) continue;
        auto p = k.prepare(w, pool());
        p->bias = bias;
        p->epilogue = e;
        Tensor y = Tensor::empty(DType::F32, {M, N});
        p->run(ctx, kernels::RowInput{x.data<float>(), M, K, nullptr}, y.data<float>());
        double worst = 0;
        for (int64_t i = 0; i < M * N; ++i)
          worst = std::fmax(worst, std::fabs(y.data<float>()[i] - ref[i]) / (1.0 + std::fabs(ref[i])));
        if (worst >= 1e-5) std::printf("  %s: worst %.3g\n", kernels::isa_name(k.level), worst);
        CHECK(worst < 1e-5);
      }
    }
}

// Every registered attention kernel against a plain softmax(q k^T * scale) v per query.
TEST(attention_kernels_match_reference) {
  const ExecContext ctx = cpu_context();
  std::mt19937 rng(21);
  for (int64_t Tq : {1, 3, 9}) {
    const int64_t B = 2, H = 4, KVH = 2, D = 24, Tk = Tq == 1 ? 13 : Tq;
    const int64_t causal = Tq == 1 ? Tk - 1 : 0;
    const Tensor q = random_tensor({B * H * Tq, D}, rng, 0.f), k = random_tensor({B * KVH * Tk, D}, rng, 0.f),
                 v = random_tensor({B * KVH * Tk, D}, rng, 0.f);
    std::vector<uint8_t> valid(static_cast<size_t>(B * Tk), 1);
    valid[Tk + 1] = 0;  // a masked key in sequence 1
    kernels::AttentionArgs a;
    a.q = {q.data<float>(), H * Tq * D, Tq * D, D};
    a.k = {k.data<float>(), KVH * Tk * D, Tk * D, D};
    a.v = {v.data<float>(), KVH * Tk * D, Tk * D, D};
    a.B = B;
    a.H = H;
    a.KVH = KVH;
    a.Tq = Tq;
    a.Tk = Tk;
    a.D = D;
    a.key_valid = valid.data();
    a.key_valid_stride = Tk;
    a.causal_offset = causal;
    a.scale = 0.3f;
    for (const kernels::AttentionKernel& kern : kernels::attention_kernels()) {
      if (!kernels::cpu_supports(kern.level)) continue;
      Tensor out = Tensor::empty(DType::F32, {B * Tq, H * D});
      a.out = out.data<float>();
      kernels::attention(ctx, a, kern);
      double worst = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < Tq; ++t) {
            std::vector<double> p;
            double mx = -1e300, sum = 0;
            for (int64_t j = 0; j <= std::min(Tk - 1, causal + t); ++j) {
              double s = -1e300;
              if (valid[b * Tk + j]) {
                s = 0;
                for (int64_t d = 0; d < D; ++d) s += double(a.q.at(b, h, t)[d]) * a.k.at(b, h / 2, j)[d];
                s *= a.scale;
              }
              p.push_back(s);
              mx = std::max(mx, s);
            }
            for (double& s : p) sum += s = s <= -1e299 ? 0 : std::exp(s - mx);
            for (int64_t d = 0; d < D; ++d) {
              double o = 0;
              for (size_t j = 0; j < p.size(); ++j) o += p[j] / sum * a.v.at(b, h / 2, j)[d];
              worst = std::max(worst, std::fabs(o - out.data<float>()[(b * Tq + t) * H * D + h * D + d]));
            }
          }
      if (worst >= 1e-5) std::printf("  %s: worst %.3g\n", kernels::isa_name(kern.level), worst);
      CHECK(worst < 1e-5);
    }
  }
}

TEST(isa_levels_and_selection) {
  const auto& table = kernels::isa_table();
  for (size_t i = 0; i < table.size(); ++i) CHECK(static_cast<size_t>(table[i].level) == i);  // ordered, one name each
  kernels::force_isa("ref");
  CHECK(kernels::active_isa() == kernels::CpuIsa::Ref);
  CHECK(kernels::select_kernel(kernels::int_gemm_kernels(), kernels::active_isa()).level == kernels::CpuIsa::Ref);
  const kernels::Backend& cpu = kernels::backend_for(Device::cpu());
  std::mt19937 rng(9);
  kernels::LinearWeights lw;
  lw.weight = quantize(random_tensor({8, 16}, rng, 0.f), QuantSpec{8, true}, Tile{1, 16});
  lw.act = QuantSpec{8, true};
  CHECK(cpu.prepare_linear(lw, ThreadPool::shared(1))->kernel == "cpu/ref int");
  for (const kernels::IsaInfo& level : table) {
    kernels::force_isa(level.name);
    // A level the CPU lacks falls back to the highest supported level below it.
    kernels::CpuIsa expect = level.level;
    while (!kernels::cpu_supports(expect)) expect = static_cast<kernels::CpuIsa>(static_cast<int>(expect) - 1);
    CHECK(kernels::active_isa() == expect);
    // Each family takes its best entry at or below the active level: never an unsupported one.
    CHECK(kernels::select_kernel(kernels::int_gemm_kernels(), expect).level <= expect);
    CHECK(kernels::cpu_supports(kernels::select_kernel(kernels::f32_gemm_kernels(), expect).level));
    CHECK(kernels::cpu_supports(kernels::select_kernel(kernels::attention_kernels(), expect).level));
    CHECK(cpu.prepare_linear(lw, ThreadPool::shared(1))->kernel ==
          std::string("cpu/") + kernels::isa_name(kernels::select_kernel(kernels::int_gemm_kernels(), expect).level) +
              " int");
  }
  CHECK_THROWS_KIND(kernels::force_isa("sse9"), ErrorKind::InvalidArgument);
  kernels::force_isa("auto");
  CHECK(kernels::active_isa() == kernels::best_supported_isa() || std::getenv("FINEQUANT_ISA"));
}

int main() { return RUN_ALL_TESTS(); }
