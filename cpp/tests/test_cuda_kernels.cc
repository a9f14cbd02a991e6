// The CUDA backend against the CPU backend, op by op, through the neutral kernel record
// (kernels/backend.h), on random awkward shapes. Integer GEMMs must be bit-identical to the CPU
// reference (the same quantized rows, exact int32 sums, the same fp32 epilogue order); ops whose
// fp32 arithmetic differs in order (norms, attention, FP32 GEMM, RoPE) agree to a tolerance. Needs
// a CUDA device: without one it prints why and exits 77, which ctest reports as skipped.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "check.h"
#include "finequant/runtime.h"
#include "kernels/backend.h"
#include "layers/linear.h"

using namespace finequant;
using fqtest::random_tensor;
using kernels::Epilogue;

namespace {

const kernels::Backend& cpu() { return kernels::backend_for(Device::cpu()); }
const kernels::Backend& gpu() { return kernels::backend_for(Device::cuda(0)); }

// Runs `op` on both backends with the tensors moved to each device; returns both results on the host.
template <class Op>
std::pair<Tensor, Tensor> on_both(Op op) {
  const ExecContext c = cpu().context(ThreadPool::shared(2)), g = gpu().context(ThreadPool::shared(0));
  Tensor a = op(c);
  Tensor b = op(g).to(Device::cpu());
  gpu().finish(g);
  return {a, b};
}

int64_t bit_differences(const Tensor& a, const Tensor& b) {
  int64_t bad = 0;
  for (int64_t i = 0; i < a.numel(); ++i) bad += std::memcmp(&a.data<float>()[i], &b.data<float>()[i], 4) != 0;
  return bad;
}

double max_rel_error(const Tensor& a, const Tensor& b) {
  double worst = 0, scale = 1e-6;
  for (int64_t i = 0; i < a.numel(); ++i) scale = std::fmax(scale, std::fabs(a.data<float>()[i]));
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = std::fabs(double(a.data<float>()[i]) - b.data<float>()[i]);
    if (!(d <= worst)) worst = d;  // NaN propagates
  }
  return worst / scale;
}

struct Case {
  int64_t M, N, K;
  int wbits;
  bool wsym;
  int abits;
  bool asym_act;
  int64_t tile_rows, kblock;  // kblock 0: one block
};

kernels::LinearWeights int_weights(const Case& c, std::mt19937& rng, Epilogue e) {
  kernels::LinearWeights w;
  w.weight = quantize(random_tensor({c.N, c.K}, rng, -0.1f), QuantSpec{c.wbits, c.wsym},
                      Tile{c.tile_rows, c.kblock ? c.kblock : c.K});
  w.act = QuantSpec{c.abits, !c.asym_act};
  w.bias = random_tensor({c.N}, rng);
  w.epilogue = e;
  return w;
}

Tensor linear_on(const ExecContext& ctx, const kernels::LinearWeights& w, const Tensor& x, const Tensor* norm_w) {
  const auto p = ctx.backend->prepare_linear(w, ThreadPool::shared(2));
  const Tensor xd = x.to(ctx.device);
  Tensor y = Tensor::empty(DType::F32, {x.dim(0), w.out_features()}, ctx.device);
  Tensor nw = norm_w ? norm_w->to(ctx.device) : Tensor();
  kernels::NormParams np{kernels::NormParams::Kind::RMSNorm, norm_w ? nw.data<float>() : nullptr, nullptr, 1e-6f,
                         x.dim(1)};
  ctx.backend->linear(ctx, kernels::GemmInput{xd, norm_w ? &np : nullptr}, *p, y);
  return y;
}

}  // namespace

// Every scheme and kernel path (M buckets: decode to prefill; one block -> CUTLASS, K-blocks ->
// the blocked kernel; W4A4 packed on sm80-89), bit for bit.
TEST(integer_linear_is_bit_identical_to_the_cpu) {
  std::mt19937 rng(1);
  const Case cases[] = {
      {1, 768, 768, 8, true, 8, false, 1, 0},    {7, 37, 96, 8, true, 8, false, 1, 0},
      {16, 64, 64, 8, false, 8, true, 1, 0},     {17, 130, 160, 8, true, 8, true, 2, 0},
      {65, 96, 256, 8, true, 8, false, 96, 0},   {300, 256, 512, 8, true, 8, false, 1, 0},
      {1, 3072, 768, 4, true, 8, false, 1, 32},  {5, 45, 200, 4, false, 8, true, 1, 64},
      {33, 64, 576, 4, true, 8, false, 1, 128},  {130, 72, 96, 4, true, 8, false, 1, 0},
      {9, 50, 128, 4, true, 4, false, 1, 0},     {70, 64, 256, 4, false, 4, true, 1, 0},
      {3, 40, 96, 4, true, 4, false, 1, 32},     {200, 48, 320, 8, true, 8, false, 1, 64},
      {2, 31, 61, 8, true, 8, false, 1, 0},      {4, 33, 50, 8, false, 8, true, 1, 18},
  };
  for (const Case& c : cases)
    for (Epilogue e : {Epilogue::None, Epilogue::GeluTanh}) {
      const kernels::LinearWeights w = int_weights(c, rng, e);
      const Tensor x = random_tensor({c.M, c.K}, rng, 0.2f);
      const auto [a, b] = on_both([&](const ExecContext& ctx) { return linear_on(ctx, w, x, nullptr); });
      const int64_t bad = bit_differences(a, b);
      if (bad)
        std::printf("  M=%lld N=%lld K=%lld w%d%s a%d%s rows %lld kblock %lld: %lld of %lld differ (max rel %.3g)\n",
                    (long long)c.M, (long long)c.N, (long long)c.K, c.wbits, c.wsym ? "sym" : "asym", c.abits,
                    c.asym_act ? "asym" : "sym", (long long)c.tile_rows, (long long)c.kblock, (long long)bad,
                    (long long)a.numel(), max_rel_error(a, b));
      CHECK_EQ(bad, 0);
    }
}

// A fused RMSNorm in front of the quantization: the norm's fp32 rounding may move a value across a
// quantization boundary, so a tolerance of a few levels.
TEST(integer_linear_with_fused_norm) {
  std::mt19937 rng(2);
  for (const Case& c : {Case{3, 96, 128, 8, true, 8, false, 1, 0}, Case{40, 64, 256, 4, true, 8, true, 1, 32}}) {
    const kernels::LinearWeights w = int_weights(c, rng, Epilogue::None);
    const Tensor x = random_tensor({c.M, c.K}, rng, 0.5f), g = random_tensor({c.K}, rng, 1.f, 0.1f);
    const auto [a, b] = on_both([&](const ExecContext& ctx) { return linear_on(ctx, w, x, &g); });
    CHECK(max_rel_error(a, b) < 2e-2);
  }
}

TEST(float_linear) {
  std::mt19937 rng(3);
  for (auto [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{1, 37, 70}, {64, 129, 33}, {300, 96, 256}}) {
    kernels::LinearWeights w;
    w.weight_f32 = random_tensor({N, K}, rng);
    w.bias = random_tensor({N}, rng);
    w.epilogue = Epilogue::GeluErf;
    const Tensor x = random_tensor({M, K}, rng);
    const auto [a, b] = on_both([&](const ExecContext& ctx) { return linear_on(ctx, w, x, nullptr); });
    CHECK(max_rel_error(a, b) < 1e-5);
  }
}

TEST(norms_and_elementwise_ops) {
  std::mt19937 rng(4);
  const int64_t M = 37, C = 200;
  const Tensor x = random_tensor({M, C}, rng, 0.3f), y = random_tensor({M, C}, rng), w = random_tensor({C}, rng, 1.f),
               b = random_tensor({C}, rng);
  for (auto kind : {kernels::NormParams::Kind::LayerNorm, kernels::NormParams::Kind::RMSNorm}) {
    const auto [n1, n2] = on_both([&](const ExecContext& ctx) {
      const Tensor wd = w.to(ctx.device), bd = b.to(ctx.device);
      const kernels::NormParams p{kind, wd.data<float>(), kind == kernels::NormParams::Kind::LayerNorm ? bd.data<float>() : nullptr,
                                  1e-5f, C};
      Tensor out = Tensor::empty(DType::F32, {M, C}, ctx.device);
      ctx.backend->norm(ctx, x.to(ctx.device), p, out);
      return out;
    });
    CHECK(max_rel_error(n1, n2) < 1e-5);
  }
  const auto [s1, s2] = on_both([&](const ExecContext& ctx) {
    Tensor sum = x.clone().to(ctx.device);
    ctx.backend->add(ctx, sum, y.to(ctx.device));
    Tensor out = Tensor::empty(DType::F32, {M, C / 2}, ctx.device);
    ctx.backend->gated_mul(ctx, kernels::GateActivation::Silu, sum.data<float>(), C, sum.data<float>() + C / 2, C,
                           out.data<float>(), M, C / 2);
    return out;
  });
  CHECK(max_rel_error(s1, s2) < 1e-5);
  const auto [ge1, ge2] = on_both([&](const ExecContext& ctx) {  // GeGLU and final-logit soft-capping
    Tensor sum = x.clone().to(ctx.device);
    Tensor out = Tensor::empty(DType::F32, {M, C / 2}, ctx.device);
    ctx.backend->gated_mul(ctx, kernels::GateActivation::GeluTanh, sum.data<float>(), C, sum.data<float>() + C / 2, C,
                           out.data<float>(), M, C / 2);
    ctx.backend->softcap(ctx, out, 0.5f);
    return out;
  });
  CHECK(max_rel_error(ge1, ge2) < 1e-5);
  Tensor ids = Tensor::empty(DType::I64, {5});
  for (int i = 0; i < 5; ++i) ids.data<int64_t>()[i] = (i * 7) % M;
  const auto [g1, g2] = on_both([&](const ExecContext& ctx) {
    Tensor out = Tensor::zeros(DType::F32, {5, C}, ctx.device);
    ctx.backend->gather_rows(ctx, x.to(ctx.device), ids.to(ctx.device), out, false);
    ctx.backend->gather_rows(ctx, y.to(ctx.device), ids.to(ctx.device), out, true);
    return out;
  });
  CHECK_EQ(bit_differences(g1, g2), 0);
}

// The block-Hadamard rotation: the same operations in the same order, so bit for bit; out of place
// and in place, blocks 2..4096, one row to many (grid-stride rows, several CTAs per row).
TEST(hadamard) {
  std::mt19937 rng(8);
  struct Shape3 {
    int64_t M, K, b;
  };
  for (const Shape3 c : {Shape3{1, 2, 2}, Shape3{3, 12, 4}, Shape3{7, 96, 32}, Shape3{1, 768, 64}, Shape3{33, 640, 128},
                         Shape3{130, 3072, 512}, Shape3{5, 8192, 4096}, Shape3{2, 6144, 2048},
                         Shape3{70000, 32, 16}}) {
    const Tensor x = random_tensor({c.M, c.K}, rng, 0.1f, 3.f);
    for (bool in_place : {false, true}) {
      const auto [a, b] = on_both([&](const ExecContext& ctx) {
        Tensor xd = x.to(ctx.device);
        if (in_place) {
          ctx.backend->hadamard(ctx, xd, xd, c.b);
          return xd;
        }
        Tensor y = Tensor::empty(DType::F32, {c.M, c.K}, ctx.device);
        ctx.backend->hadamard(ctx, xd, y, c.b);
        return y;
      });
      const int64_t bad = bit_differences(a, b);
      if (bad)
        std::printf("  M=%lld K=%lld b=%lld %s: %lld of %lld differ\n", (long long)c.M, (long long)c.K,
                    (long long)c.b, in_place ? "in place" : "out of place", (long long)bad, (long long)a.numel());
      CHECK_EQ(bad, 0);
    }
  }
}

// A rotated integer Linear with a fused norm (norm, rotate, quantize on each backend): the norm's
// fp32 rounding differs, so a tolerance as for integer_linear_with_fused_norm; without the norm, bits.
TEST(rotated_integer_linear) {
  std::mt19937 rng(9);
  const Case c{9, 64, 256, 4, true, 4, true, 1, 32};
  kernels::LinearWeights w = int_weights(c, rng, Epilogue::None);
  w.rotation = 64;
  const Tensor x = random_tensor({c.M, c.K}, rng, 0.5f), g = random_tensor({c.K}, rng, 1.f, 0.1f);
  const auto run = [&](const ExecContext& ctx, const Tensor* norm_w) {
    const Linear l = Linear::create(*ctx.backend, w, ThreadPool::shared(2));
    const Tensor xd = x.to(ctx.device);
    Tensor nw = norm_w ? norm_w->to(ctx.device) : Tensor();
    const kernels::NormParams np{kernels::NormParams::Kind::RMSNorm, norm_w ? nw.data<float>() : nullptr, nullptr,
                                 1e-6f, c.K};
    return l.forward(ctx, kernels::GemmInput{xd, norm_w ? &np : nullptr});
  };
  const auto [a, b] = on_both([&](const ExecContext& ctx) { return run(ctx, nullptr); });
  CHECK_EQ(bit_differences(a, b), 0);
  const auto [an, bn] = on_both([&](const ExecContext& ctx) { return run(ctx, &g); });
  CHECK(max_rel_error(an, bn) < 2e-2);
}

TEST(rope) {
  std::mt19937 rng(5);
  const int64_t M = 9, heads = 3, D = 64, stride = heads * D + 10;
  const Tensor x = random_tensor({M, stride}, rng);
  Tensor inv = Tensor::empty(DType::F32, {D / 2}), pos = Tensor::empty(DType::I64, {M});
  for (int64_t i = 0; i < D / 2; ++i) inv.data<float>()[i] = 1.f / std::pow(10000.f, 2.f * i / D);
  for (int64_t m = 0; m < M; ++m) pos.data<int64_t>()[m] = 3 * m + 100;
  const auto [a, b] = on_both([&](const ExecContext& ctx) {
    Tensor t = x.clone().to(ctx.device);
    ctx.backend->rope(ctx, t.data<float>(), stride, M, heads, inv.to(ctx.device), pos.to(ctx.device));
    return t;
  });
  CHECK(max_rel_error(a, b) < 1e-5);
}

// Prefill (many queries, padding masks, causal) and decode (one query over a cache), GQA, odd D.
TEST(attention_and_kv_cache) {
  std::mt19937 rng(6);
  // window > 0: a sliding window over positions (key j at position j) and soft-capped scores (Gemma 2).
  for (auto [Tq, D, causal, window] : {std::tuple<int64_t, int64_t, bool, int64_t>{19, 64, true, 0}, {70, 40, false, 0},
                                       {1, 128, true, 0}, {3, 33, true, 0}, {70, 40, true, 9}, {2, 64, true, 9}}) {
    const int64_t B = 2, H = 6, KVH = 2, past = Tq <= 4 ? 50 : 0, cap = past + Tq + 3;
    const Tensor q = random_tensor({B, H, Tq, D}, rng), k = random_tensor({B, KVH, Tq, D}, rng),
                 v = random_tensor({B, KVH, Tq, D}, rng), kc0 = random_tensor({B, KVH, cap, D}, rng),
                 vc0 = random_tensor({B, KVH, cap, D}, rng);
    Tensor valid = Tensor::empty(DType::U8, {B, cap});
    for (int64_t i = 0; i < B * cap; ++i) valid.data<uint8_t>()[i] = (i % 11 == 3) ? 0 : 1;
    Tensor qpos = Tensor::empty(DType::I64, {B * Tq}), kpos = Tensor::empty(DType::I64, {B, cap});
    for (int64_t i = 0; i < B * Tq; ++i) qpos.data<int64_t>()[i] = past + i % Tq;
    for (int64_t i = 0; i < B * cap; ++i) kpos.data<int64_t>()[i] = i % cap;
    const auto [a, b] = on_both([&](const ExecContext& ctx) {
      const Tensor qd = q.to(ctx.device), kd = k.to(ctx.device), vd = v.to(ctx.device), vald = valid.to(ctx.device);
      const Tensor qposd = qpos.to(ctx.device), kposd = kpos.to(ctx.device);
      Tensor kc = kc0.clone().to(ctx.device), vc = vc0.clone().to(ctx.device);
      const kernels::HeadView kv{kd.data<float>(), KVH * Tq * D, Tq * D, D}, vv{vd.data<float>(), KVH * Tq * D, Tq * D, D};
      ctx.backend->kv_append(ctx, kv, vv, kc, vc, past, Tq);
      Tensor out = Tensor::empty(DType::F32, {B * Tq, H * D}, ctx.device);
      kernels::AttentionArgs args;
      args.q = {qd.data<float>(), H * Tq * D, Tq * D, D};
      args.k = {kc.data<float>(), KVH * cap * D, cap * D, D};
      args.v = {vc.data<float>(), KVH * cap * D, cap * D, D};
      args.out = out.data<float>();
      args.B = B;
      args.H = H;
      args.KVH = KVH;
      args.Tq = Tq;
      args.Tk = past + Tq;
      args.D = D;
      args.key_valid = vald.data<uint8_t>();
      args.key_valid_stride = cap;
      args.causal_offset = causal ? past : -1;
      args.scale = 1.f / std::sqrt(float(D));
      if (window > 0) {
        args.window = window;
        args.query_positions = qposd.data<int64_t>();
        args.key_positions = kposd.data<int64_t>();
        args.softcap = 2.f;
      }
      ctx.backend->attention(ctx, args);
      return out;
    });
    const double err = max_rel_error(a, b);
    if (!(err < 1e-4)) std::printf("  Tq=%lld D=%lld: max rel error %.3g\n", (long long)Tq, (long long)D, err);
    CHECK(err < 1e-4);
  }
}

TEST(nan_input_is_reported_by_finish) {
  std::mt19937 rng(7);
  const kernels::LinearWeights w = int_weights(Case{3, 16, 32, 8, true, 8, false, 1, 0}, rng, Epilogue::None);
  Tensor x = random_tensor({3, 32}, rng);
  x.data<float>()[40] = NAN;
  const ExecContext g = gpu().context(ThreadPool::shared(0));
  linear_on(g, w, x, nullptr);
  CHECK_THROWS_KIND(gpu().finish(g), ErrorKind::InvalidArgument);
  gpu().finish(g);  // the flag was reset: the next call starts clean
}

int main() {
  if (cuda_device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  std::printf("device: %s\n", gpu().name().c_str());
  return RUN_ALL_TESTS();
}
