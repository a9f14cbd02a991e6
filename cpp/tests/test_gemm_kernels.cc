// Every registered CPU GEMM kernel this CPU supports (kernels/cpu/registry.cc) against the reference
// (quantize_rows + gemm_int_quantized_ref): the same quantized rows, identical int32 sums and the same
// fp32 epilogue order, so every output must be bit-identical, over the case matrix of
// int_gemm_cases.h, plus fused norm rows; the FP32 and attention kernels against their reference
// forms; the level selection of cpu_isa.
#include <array>
#include <cstdlib>

#include "core/convert.h"
#include "int_gemm_cases.h"
#include "kernels/cpu/attention.h"

// The registered integer kernels this CPU runs (off-by-default levels included: forcing one runs it).
const std::vector<KernelUnderTest>& kernels_under_test() {
  static const std::vector<KernelUnderTest> list = [] {
    std::vector<KernelUnderTest> out;
    for (const kernels::IntGemmKernel& k : kernels::int_gemm_kernels())
      if (kernels::cpu_supports(k.level)) out.push_back({kernels::isa_name(k.level), k});
    return out;
  }();
  return list;
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

// The AVX-512 row quantization (VNNI and AMX kernels) against the portable one, byte for byte over the
// whole buffer (padding included), in both layouts: rows one after another (VNNI) and rows grouped by
// 16 in 64-byte chunks (AMX; block_padded 64 or 16-aligned, so that blocks start inside a chunk too).
// Here because the AMX layout is only reached on AMX hardware otherwise (the emulated AMX kernel
// quantizes with the portable code).
TEST(avx512_row_quantization_matches_portable) {
  if (!kernels::cpu_supports(kernels::CpuIsa::Avx512Vnni)) return;
  std::mt19937 rng(23);
  uint32_t cases = 0;
  for (int64_t group_rows : {1, 16})
    for (int64_t bk : {0, 16, 32, 64, 96, 200})  // 0: one block (bk = K)
      for (int64_t K : {1, 63, 64, 130, 768, 1031}) {
        const int64_t b = bk ? bk : K, nb = (K + b - 1) / b;
        const int64_t unit = group_rows > 1 ? (b % 64 ? 16 : 64) : 8;
        const int64_t padded = (b + unit - 1) / unit * unit, last = K - (nb - 1) * b;
        int64_t Kp = (nb - 1) * padded + (last + unit - 1) / unit * unit;
        if (group_rows > 1) Kp = (Kp + 63) / 64 * 64;
        const kernels::RowLayout l{K, nb, b, padded, Kp, group_rows};
        for (int bits : {8, 4})
          for (bool sym : {true, false}) {
            const int64_t M = 21, rows = (M + 15) / 16 * 16;
            Tensor x = random_tensor({M, K}, rng, 0.1f);
            x.data<float>()[3 * K + K / 2] = 0.f;          // a row whose scale is set by one value
            for (int64_t k = 0; k < K; ++k) x.data<float>()[5 * K + k] = 0.f;  // an all-zero row
            // A row of subnormals whose scale is subnormal too (max |x| = 940 x 2^-149: s = 7 x 2^-149, its
            // reciprocal overflows, so every lane divides, and 940 / 7 rounds past qmax before the clamp).
            for (int64_t k = 0; k < K; ++k)
              x.data<float>()[7 * K + k] = std::ldexp(static_cast<float>(static_cast<int>(k % 1881) - 940), -149);
            kernels::RowScratch a, c;
            const kernels::QuantizedRows qa = a.resize(rows, l), qc = c.resize(rows, l);
            std::memset(qa.xp, 0xa5, static_cast<size_t>(rows * Kp));
            std::memset(qc.xp, 0xa5, static_cast<size_t>(rows * Kp));
            const kernels::RowInput in{x.data<float>(), M, K, nullptr};
            kernels::quantize_rows_into_avx512(in, l, QuantSpec{bits, sym}, qa, pool());
            kernels::quantize_rows_into(in, l, QuantSpec{bits, sym}, qc, pool());
            CHECK(std::memcmp(qa.xp, qc.xp, static_cast<size_t>(rows * Kp)) == 0);
            CHECK(std::memcmp(qa.rowsum, qc.rowsum, static_cast<size_t>(M * nb) * 4) == 0);
            CHECK(std::memcmp(qa.sx, qc.sx, static_cast<size_t>(M) * 4) == 0);
            if (!sym) CHECK(std::memcmp(qa.zx, qc.zx, static_cast<size_t>(M) * 4) == 0);
            ++cases;
          }
      }
  CHECK_EQ(cases, 2u * 6 * 6 * 4);
}

// The VNNI layouts' word packing against the byte-at-a-time definition: every operand shift the kernels use,
// one they do not (5: the byte path), block lengths that end mid-word.
TEST(vnni_word_packing_matches_bytewise) {
  std::mt19937 rng(5);
  for (int bits : {8, 4})
    for (int32_t wc : {0, 128, -128, 8, 5}) {
      if (bits == 4 && (wc == 128 || wc == -128)) continue;
      for (int64_t kb : {1, 3, 4, 7, 8, 9, 32, 37}) {
        std::vector<uint8_t> codes(static_cast<size_t>(kb));
        for (uint8_t& c : codes) {
          const int v = static_cast<int>(rng() % 16);  // 4-bit: [-8, 7] signed or [0, 15] unsigned
          c = static_cast<uint8_t>(bits == 8 ? static_cast<int>(rng() % 256) : wc == 8 ? v - 8 : v);
        }
        const int64_t stride = 12, per_word = bits == 4 ? 8 : 4, words = (kb + per_word - 1) / per_word;
        std::vector<uint8_t> got(static_cast<size_t>(words * stride), 0), want(got.size(), 0);
        kernels::pack_vnni_words(codes.data(), kb, bits, wc, got.data(), stride);
        for (int64_t k = 0; k < kb; ++k) {
          const uint8_t stored = static_cast<uint8_t>(codes[static_cast<size_t>(k)] + wc);
          uint8_t& at = want[static_cast<size_t>(k / per_word * stride + k % 4)];
          if (bits == 4) at |= static_cast<uint8_t>((stored & 0x0f) << (k % 8 < 4 ? 0 : 4));
          else at = stored;
        }
        CHECK(got == want);
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

// The bf16 kernel (FloatPrecision::BF16) against the double-precision product of the bf16-rounded
// operands: bf16 products are exact in fp32, so only the fp32 summation order differs.
TEST(bf16_kernel_matches_rounded_reference) {
  if (!kernels::cpu_has_avx512_bf16()) {
    std::printf("  (no AVX512-BF16: bf16 kernel not run)\n");
    return;
  }
  CHECK(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)) == 1.0f);  // a tie: to even
  CHECK(bf16_to_float(float_to_bf16(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256);
  // M >= 16 takes AMX-BF16 tiles where the CPU has them: partial A tiles (17, 33), a lone last panel (N = 200, 45).
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 61}, {13, 100, 257}, {1, 1, 3},  {130, 200, 96},
                               {6, 64, 32}, {17, 45, 70}, {33, 16, 32}, {64, 130, 1000}};
  const ExecContext ctx = cpu_context();
  uint32_t seed = 500;
  for (auto& s : shapes)
    for (Epilogue e : {Epilogue::None, Epilogue::GeluErf}) {
      std::mt19937 rng(seed++);
      const int64_t M = s[0], N = s[1], K = s[2];
      const Tensor x = random_tensor({M, K}, rng, 0.1f), w = random_tensor({N, K}, rng, 0.f);
      Tensor bias = Tensor::empty(DType::F32, {N});
      for (int64_t n = 0; n < N; ++n) bias.data<float>()[n] = 0.05f * static_cast<float>(n % 7) - 0.1f;
      auto p = kernels::f32_gemm_bf16_avx512().prepare(w, pool());
      p->bias = bias;
      p->epilogue = e;
      Tensor y = Tensor::empty(DType::F32, {M, N});
      p->run(ctx, kernels::RowInput{x.data<float>(), M, K, nullptr}, y.data<float>());
      double worst = 0, worst_f32 = 0;
      auto r = [](float v) { return double(bf16_to_float(float_to_bf16(v))); };
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double acc = bias.data<float>()[n], exact = acc, mag = 1.0;
          for (int64_t k = 0; k < K; ++k) {
            acc += r(x.data<float>()[m * K + k]) * r(w.data<float>()[n * K + k]);
            exact += double(x.data<float>()[m * K + k]) * w.data<float>()[n * K + k];
            mag += std::fabs(double(x.data<float>()[m * K + k]) * w.data<float>()[n * K + k]);
          }
          const double got = y.data<float>()[m * N + n];
          worst = std::fmax(worst, std::fabs(got - kernels::apply_epilogue(e, static_cast<float>(acc))) / mag);
          worst_f32 = std::fmax(worst_f32, std::fabs(got - kernels::apply_epilogue(e, static_cast<float>(exact))) / mag);
        }
      if (worst >= 2e-6) std::printf("  bf16 M=%lld N=%lld K=%lld: worst %.3g\n", (long long)M, (long long)N, (long long)K, worst);
      CHECK(worst < 2e-6);
      CHECK(worst_f32 < 1e-2);  // bf16 keeps 8 mantissa bits: the documented cost of the choice
    }
}

// Every registered attention kernel against a plain softmax(q k^T * scale) v per query.
TEST(attention_kernels_match_reference) {
  const ExecContext ctx = cpu_context();
  std::mt19937 rng(21);
  // {queries, keys, head size}: decode (a dot product per cached key, blocks of 16 keys and a tail; D a
  // multiple of 16 or not) and prefill (K^T tiles).
  for (const auto& [Tq, Tk, D] : std::vector<std::array<int64_t, 3>>{{1, 13, 24}, {1, 37, 64}, {2, 21, 40}, {3, 3, 24}, {9, 9, 24}}) {
    const int64_t B = 2, H = 4, KVH = 2;
    const int64_t causal = Tk - Tq;  // the queries are the last Tq positions
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

// K^T is pure data movement: every kernel's transpose is exact, including partial 16 x 16 blocks, and
// leaves the padding of kt alone.
TEST(attention_transpose_is_exact) {
  std::mt19937 rng(23);
  for (int64_t n : {1, 9, 16, 17, 45})
    for (int64_t D : {1, 7, 16, 24, 64, 80}) {
      const int64_t stride = D + 3, ld = n + 5;
      const Tensor k = random_tensor({n, stride}, rng, 0.f);
      for (const kernels::AttentionKernel& kern : kernels::attention_kernels()) {
        if (!kernels::cpu_supports(kern.level)) continue;
        std::vector<float> kt(static_cast<size_t>(D * ld), -7.f);
        kern.transpose(k.data<float>(), stride, n, D, kt.data(), ld);
        bool exact = true;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < ld; ++j)
            exact &= kt[d * ld + j] == (j < n ? k.data<float>()[j * stride + d] : -7.f);
        if (!exact) std::printf("  %s n=%lld D=%lld\n", kernels::isa_name(kern.level), (long long)n, (long long)D);
        CHECK(exact);
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
