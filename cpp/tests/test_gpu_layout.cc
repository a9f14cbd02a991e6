// The CUDA backend's operand layout and integer epilogue (cuda/src/host/layout.h), checked on the
// host: the emulation of what its kernels compute from packed weights and quantized rows must be
// bit-identical to the CPU reference (quantize_rows + gemm_int_quantized_ref) for every scheme:
// sym/asym sides, 8/4 bits, packed INT4 activations, per-channel, row groups, per-tensor, K-blocks
// with a short last block, K and N odd, bias, both GeLUs. Runs without a GPU.
#include <cstring>
#include <random>

#include "check.h"
#include "cuda/src/host/layout.h"
#include "kernels/cpu/gemm.h"

using namespace finequant;
using fqtest::random_tensor;
using kernels::Epilogue;

static int64_t run_case(int64_t M, int64_t N, int64_t K, int wbits, bool wsym, int abits, bool asym_act, Tile tile,
                        Epilogue e, bool packed4, uint32_t seed) {
  std::mt19937 rng(seed);
  const Tensor x = random_tensor({M, K}, rng, 0.3f), w = random_tensor({N, K}, rng, -0.2f);
  const QuantizedTensor wq = quantize(w, QuantSpec{wbits, wsym}, tile);
  const QuantSpec act{abits, !asym_act};
  std::vector<float> bias(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) bias[n] = 0.1f * static_cast<float>(n % 9) - 0.4f;
  Tensor y_ref = Tensor::empty(DType::F32, {M, N});
  ThreadPool& pool = ThreadPool::shared(1);
  kernels::gemm_int_quantized_ref(quantize_rows(x, act), kernels::make_int_weight(wq, act, pool), bias.data(),
                                  y_ref.data<float>(), e, pool);
  const cuda::PackedIntWeight pw = cuda::pack_int_weight(wq);
  const cuda::QuantizedActs qa = cuda::quantize_rows_emulated(x.data<float>(), M, K, act, pw.kb.G, packed4);
  std::vector<float> y(static_cast<size_t>(M * N));
  cuda::gemm_int_emulated(qa, pw, bias.data(), e, y.data());
  int64_t bad = 0;
  for (int64_t i = 0; i < M * N; ++i) bad += std::memcmp(&y[i], &y_ref.data<float>()[i], 4) != 0;
  if (bad)
    std::printf("  M=%lld N=%lld K=%lld w%d%s a%d%s tile %lldx%lld%s: %lld mismatches\n", (long long)M, (long long)N,
                (long long)K, wbits, wsym ? "sym" : "asym", abits, asym_act ? "asym" : "sym", (long long)tile.rows,
                (long long)tile.cols, packed4 ? " packed4" : "", (long long)bad);
  return bad;
}

TEST(every_scheme_matches_the_cpu_reference) {
  uint32_t seed = 1;
  const int64_t shapes[][3] = {{1, 37, 70}, {7, 33, 62}, {17, 8, 96}, {5, 65, 258}};
  for (auto& s : shapes)
    for (int wb : {8, 4})
      for (int ab : {8, 4})
        for (bool wsym : {true, false})
          for (bool aasym : {false, true})
            for (int64_t G : {int64_t{0}, int64_t{32}}) {
              const int64_t K = s[2];
              const Tile tile{1, G ? G : K};
              for (bool packed4 : {false, true}) {
                if (packed4 && ab != 4) continue;
                CHECK_EQ(run_case(s[0], s[1], K, wb, wsym, ab, aasym, tile, Epilogue::GeluTanh, packed4, seed++), 0);
              }
            }
}

TEST(groups_blocks_and_epilogues) {
  uint32_t seed = 500;
  for (Epilogue e : {Epilogue::None, Epilogue::GeluErf, Epilogue::GeluTanh}) {
    CHECK_EQ(run_case(11, 48, 96, 8, true, 8, true, Tile{3, 96}, e, false, seed++), 0);       // row groups
    CHECK_EQ(run_case(4, 40, 96, 8, false, 8, false, Tile{40, 96}, e, false, seed++), 0);     // per-tensor
    CHECK_EQ(run_case(3, 42, 200, 4, false, 8, true, Tile{2, 64}, e, false, seed++), 0);      // groups + K-blocks
    CHECK_EQ(run_case(9, 31, 130, 4, true, 8, false, Tile{1, 128}, e, false, seed++), 0);     // short last block
    CHECK_EQ(run_case(2, 20, 50, 8, true, 8, false, Tile{1, 18}, e, false, seed++), 0);       // block not /4
  }
}

TEST(layout_shapes) {
  const cuda::KBlocks a = cuda::KBlocks::of(576, 128), b = cuda::KBlocks::of(768, 0), c = cuda::KBlocks::of(50, 18);
  CHECK(a.nb == 5 && a.Gp == 128 && a.Kp == 640 && a.length(4) == 64);
  CHECK(b.nb == 1 && b.G == 768 && b.Kp == 768);
  CHECK(c.nb == 3 && c.Gp == 32 && c.Kp == 96 && c.length(2) == 14);
  std::mt19937 rng(3);
  const QuantizedTensor wq = quantize(random_tensor({5, 40}, rng, 0.f), QuantSpec{4, false}, Tile{1, 40});
  const cuda::PackedIntWeight p = cuda::pack_int_weight(wq);
  CHECK(p.w.size() == static_cast<size_t>(5 * 64 / 2));  // K padded to 64, two nibbles a byte
  Tensor bad = Tensor::empty(DType::F32, {1, 4});
  for (int i = 0; i < 4; ++i) bad.data<float>()[i] = i == 2 ? NAN : 1.f;
  CHECK_THROWS_KIND(cuda::quantize_rows_emulated(bad.data<float>(), 1, 4, QuantSpec{8, true}, 0, false),
                    ErrorKind::InvalidArgument);
}

int main() { return RUN_ALL_TESTS(); }
