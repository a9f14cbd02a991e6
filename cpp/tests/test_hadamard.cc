// The block-Hadamard rotation (kernels/backend.h `hadamard`, docs/DESIGN.md section 2): the CPU op
// against a scalar loop doing the defined operations in the defined order (bit for bit) and against
// the explicit Hadamard matrix product in double precision; a rotated Linear against rotate-then-GEMM,
// with and without a fused norm, without touching its input.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "finequant/runtime.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_isa.h"
#include "layers/linear.h"

using namespace finequant;
using fqtest::random_tensor;

namespace {

const kernels::Backend& cpu() { return kernels::backend_for(Device::cpu()); }

// The definition, one block at a time: stages h = 1, 2, ..., b/2 over pairs (i, i + h), bit h of i
// clear, as (a + c, a - c); then each value times float(1 / sqrt(b)).
Tensor scalar_reference(const Tensor& x, int64_t b) {
  Tensor y = x.clone();
  const int64_t M = x.dim(0), K = x.dim(1);
  const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(b)));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < K; blk += b) {
      volatile float* v = y.data<float>() + m * K + blk;  // volatile: no reordering, no contraction
      for (int64_t h = 1; h < b; h *= 2)
        for (int64_t i = 0; i < b; ++i)
          if (!(i & h)) {
            const float a = v[i], c = v[i + h];
            v[i] = a + c;
            v[i + h] = a - c;
          }
      for (int64_t i = 0; i < b; ++i) v[i] = v[i] * s;
    }
  return y;
}

// x H with H_b[i][j] = (-1)^popcount(i & j) / sqrt(b), in double.
std::vector<double> matrix_reference(const Tensor& x, int64_t b) {
  const int64_t M = x.dim(0), K = x.dim(1);
  std::vector<double> y(static_cast<size_t>(M * K), 0.0);
  const double s = 1.0 / std::sqrt(static_cast<double>(b));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t blk = 0; blk < K; blk += b)
      for (int64_t j = 0; j < b; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < b; ++i)
          acc += (__builtin_popcountll(static_cast<unsigned long long>(i & j)) & 1 ? -1.0 : 1.0) *
                 x.data<float>()[m * K + blk + i];
        y[m * K + blk + j] = acc * s;
      }
  return y;
}

int64_t bit_differences(const Tensor& a, const Tensor& b) {
  int64_t bad = 0;
  for (int64_t i = 0; i < a.numel(); ++i) bad += std::memcmp(&a.data<float>()[i], &b.data<float>()[i], 4) != 0;
  return bad;
}

Tensor rotate(const Tensor& x, int64_t b, int threads) {
  const ExecContext ctx = cpu().context(ThreadPool::shared(threads));
  Tensor y = Tensor::empty(DType::F32, x.shape());
  cpu().hadamard(ctx, x, y, b);
  return y;
}

}  // namespace

TEST(hadamard_matches_the_definition_bit_for_bit) {
  for (const kernels::IsaInfo& level : kernels::isa_table()) {  // every kernel this CPU can run
    if (!kernels::cpu_supports(level.level)) continue;
    kernels::force_isa(level.name);
    std::mt19937 rng(1);
    for (int64_t b = 2; b <= 512; b *= 2)
      for (int64_t blocks : {1, 3, 5, 8})  // 8: K a multiple of 16 for the small blocks too
        for (int64_t M : {1, 3, 7, 130}) {
          const int64_t K = b * blocks;
          const Tensor x = random_tensor({M, K}, rng, 0.1f, 2.f);
          const Tensor ref = scalar_reference(x, b);
          for (int threads : {1, 2}) {
            const Tensor y = rotate(x, b, threads);
            const int64_t bad = bit_differences(y, ref);
            if (bad)
              std::printf("  %s b=%lld K=%lld M=%lld threads=%d: %lld differ\n", level.name, (long long)b,
                          (long long)K, (long long)M, threads, (long long)bad);
            CHECK_EQ(bad, 0);
          }
          // In place: the same values.
          Tensor inplace = x.clone();
          const ExecContext ctx = cpu().context(ThreadPool::shared(2));
          cpu().hadamard(ctx, inplace, inplace, b);
          CHECK_EQ(bit_differences(inplace, ref), 0);
        }
    // The largest block the format allows.
    const Tensor x = random_tensor({3, 8192}, rng);
    CHECK_EQ(bit_differences(rotate(x, 4096, 2), scalar_reference(x, 4096)), 0);
  }
  kernels::force_isa("auto");
}

TEST(hadamard_is_the_matrix_product) {
  std::mt19937 rng(2);
  for (int64_t b = 2; b <= 512; b *= 2)
    for (int64_t blocks : {1, 3})
      for (int64_t M : {1, 5}) {
        const Tensor x = random_tensor({M, b * blocks}, rng, 0.3f);
        const Tensor y = rotate(x, b, 2);
        const std::vector<double> ref = matrix_reference(x, b);
        double worst = 0, scale = 0;
        for (double v : ref) scale = std::fmax(scale, std::fabs(v));
        for (int64_t i = 0; i < y.numel(); ++i) worst = std::fmax(worst, std::fabs(y.data<float>()[i] - ref[i]));
        if (!(worst <= 1e-5 * scale))
          std::printf("  b=%lld M=%lld: max error %.3g of %.3g\n", (long long)b, (long long)M, worst, scale);
        CHECK(worst <= 1e-5 * scale);
      }
  // Orthogonal: a second rotation gives the input back (to rounding).
  const Tensor x = random_tensor({4, 256}, rng);
  const Tensor back = rotate(rotate(x, 64, 1), 64, 1);
  for (int64_t i = 0; i < x.numel(); ++i) CHECK(std::fabs(back.data<float>()[i] - x.data<float>()[i]) < 1e-5f);
}

// A rotated Linear is rotate-then-GEMM: bit-identical to the op followed by the same Linear without a
// rotation, for integer (W8A8, W4A4 asym) and weight-only / FP weights, with a fused RMSNorm, with
// every kernel this CPU can run (they rotate each row as they read it), and the caller's rows are
// left untouched.
TEST(rotated_linear_is_rotate_then_gemm) {
  std::mt19937 rng(3);
  ThreadPool& pool = ThreadPool::shared(2);
  const ExecContext ctx = cpu().context(pool);
  struct Scheme {
    int wbits;
    bool wsym;
    int abits;
    bool asym;
  };
  struct Shape {
    int64_t M, N, K, b;
  };
  for (const kernels::IsaInfo& level : kernels::isa_table()) {
    if (!kernels::cpu_supports(level.level)) continue;
    kernels::force_isa(level.name);
    // K = 40: rows not a multiple of 16 values (the portable row kernel); M = 130: AMX-sized.
    for (const Shape sh : {Shape{7, 24, 96, 32}, Shape{1, 24, 96, 32}, Shape{130, 40, 96, 16}, Shape{3, 9, 40, 8}}) {
      const int64_t M = sh.M, N = sh.N, K = sh.K, b = sh.b;
      const Tensor g = random_tensor({K}, rng, 1.f, 0.2f);
      const kernels::NormParams norm{kernels::NormParams::Kind::RMSNorm, g.data<float>(), nullptr, 1e-6f, K};
      for (const Scheme s : {Scheme{8, true, 8, true}, Scheme{4, true, 4, false}, Scheme{4, false, 0, true},
                             Scheme{0, true, 0, true}}) {
        kernels::LinearWeights w;
        const Tensor wf = random_tensor({N, K}, rng, 0.f, 0.1f);
        if (s.wbits) {
          w.weight = quantize(wf, QuantSpec{s.wbits, s.wsym}, Tile{1, K % 32 ? K : 32});
          w.act = QuantSpec{s.abits, s.asym};
        } else {
          w.weight_f32 = wf;
        }
        w.bias = random_tensor({N}, rng);
        const Linear plain = Linear::create(cpu(), w, pool);
        w.rotation = b;
        const Linear rotated = Linear::create(cpu(), w, pool);
        CHECK_EQ(rotated.rotation(), b);

        const Tensor x = random_tensor({M, K}, rng, 0.2f);
        const Tensor x_before = x.clone();
        const Tensor got = rotated.forward(ctx, x);
        CHECK_EQ(bit_differences(x, x_before), 0);  // the input is not rotated in place
        const int64_t bad = bit_differences(got, plain.forward(ctx, rotate(x, b, 2)));
        if (bad)
          std::printf("  %s (%s) M=%lld K=%lld b=%lld: %lld differ\n", level.name, rotated.kernel().c_str(),
                      (long long)M, (long long)K, (long long)b, (long long)bad);
        CHECK_EQ(bad, 0);

        Tensor normed = Tensor::empty(DType::F32, x.shape());
        cpu().norm(ctx, x, norm, normed);
        const Tensor got_norm = rotated.forward(ctx, kernels::GemmInput{x, &norm});
        CHECK_EQ(bit_differences(x, x_before), 0);
        CHECK_EQ(bit_differences(got_norm, plain.forward(ctx, rotate(normed, b, 2))), 0);

        // Several Linears of one input (unmerged q/k/v): the same results.
        const std::vector<Linear> both{rotated, rotated};
        const std::vector<Tensor> each = Linear::forward_each(ctx, both, kernels::GemmInput{x, &norm});
        CHECK_EQ(bit_differences(each[0], got_norm), 0);
        CHECK_EQ(bit_differences(each[1], got_norm), 0);
        const std::vector<Linear> mixed{rotated, plain};
        const std::vector<Tensor> mixed_out = Linear::forward_each(ctx, mixed, kernels::GemmInput{x, &norm});
        CHECK_EQ(bit_differences(mixed_out[0], got_norm), 0);
        CHECK_EQ(bit_differences(mixed_out[1], plain.forward(ctx, kernels::GemmInput{x, &norm})), 0);
        CHECK_EQ(bit_differences(x, x_before), 0);
      }
    }
  }
  kernels::force_isa("auto");
}

TEST(linear_rejects_a_bad_rotation) {
  std::mt19937 rng(4);
  kernels::LinearWeights w;
  w.weight_f32 = random_tensor({8, 48}, rng);
  for (int64_t r : {1, 3, 32, -2, 96}) {
    w.rotation = r;
    CHECK_THROWS_KIND_MSG(Linear::create(cpu(), w, ThreadPool::shared(1)), ErrorKind::InvalidArgument,
                          "rotation " + std::to_string(r));
  }
  w.rotation = 16;
  CHECK(Linear::create(cpu(), w, ThreadPool::shared(1)).rotation() == 16);
}

int main() { return RUN_ALL_TESTS(); }
