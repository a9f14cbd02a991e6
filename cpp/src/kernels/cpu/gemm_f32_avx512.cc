// AVX-512 FP32 GEMM: y = x W^T (+ bias) (+ activation), the weight packed at load into tiles of 64
// output channels: packed[(tile * K + k) * 64 + j] = W[tile * 64 + j, k], N padded with zero channels. A micro-kernel holds MR rows x 64 channels in 24
// zmm accumulators; per k it loads 4 weight vectors and broadcasts MR activations (FMA). Decode
// (M = 1) streams each weight tile once; the threads split the tiles.
#include <algorithm>

#include "kernels/cpu/act_math_avx512.h"
#include "kernels/cpu/gemm.h"

namespace finequant {
namespace kernels {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

namespace {

constexpr int64_t kTileN = 64;
constexpr int kMaxMR = 6;

struct F32Ctx {
  const float* x;
  int64_t M, N, K;
  const float* packed;
  const float* bias;
  float* y;
  Epilogue epilogue;
};

template <int MR>
FQ_VNNI void f32_micro(const F32Ctx& c, int64_t m0, int64_t tile) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* wt = c.packed + tile * c.K * kTileN;
  const float* xr = c.x + m0 * c.K;
  for (int64_t k = 0; k < c.K; ++k) {
    __m512 w[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) w[j] = _mm512_loadu_ps(wt + k * kTileN + j * 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(xr[i * c.K + k]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xb, w[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t n0 = tile * kTileN + j * 16;
      if (n0 >= c.N) continue;  // padding channels
      store_activated(c.y + (m0 + i) * c.N + n0, c.bias ? c.bias + n0 : nullptr, c.N - n0, acc[i][j], c.epilogue);
    }
  }
}

using F32MicroFn = void (*)(const F32Ctx&, int64_t, int64_t);

F32MicroFn pick_f32(int mr) {
  switch (mr) {
    case 1: return f32_micro<1>;
    case 2: return f32_micro<2>;
    case 3: return f32_micro<3>;
    case 4: return f32_micro<4>;
    case 5: return f32_micro<5>;
    default: return f32_micro<6>;
  }
}

class Avx512F32Linear final : public CpuLinear {
 public:
  explicit Avx512F32Linear(const Tensor& w) {
    N = w.dim(0);
    K = w.dim(1);
    const int64_t tiles = (N + kTileN - 1) / kTileN;
    packed_.assign(static_cast<size_t>(tiles * kTileN * K), 0.f);
    const float* src = w.data<float>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        packed_[static_cast<size_t>(((n / kTileN) * K + k) * kTileN + n % kTileN)] = src[n * K + k];
    streamed.push_back(span_of(packed_));
  }

  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const Tensor rows = x.materialize(ctx.threads());
    const int64_t M = x.rows;
    const F32Ctx c{rows.data<float>(), M, N, K, packed_.data(), bias.defined() ? bias.data<float>() : nullptr, y,
                   epilogue};
    const int64_t tiles = (N + kTileN - 1) / kTileN;
    const int64_t mc = M <= 24 ? M : 96, mchunks = (M + mc - 1) / mc, tasks = mchunks * tiles;
    ctx.threads().run(tasks, [&](int64_t t) {
      const int64_t m0 = (t / tiles) * mc, m1 = std::min(M, m0 + mc), tile = t % tiles;
      int64_t m = m0;
      for (; m + kMaxMR <= m1; m += kMaxMR) f32_micro<kMaxMR>(c, m, tile);
      if (m < m1) pick_f32(static_cast<int>(m1 - m))(c, m, tile);
    });
  }

 private:
  WeightVector<float> packed_;  // the only copy of the weight in memory
};

std::unique_ptr<CpuLinear> prepare_avx512(Tensor w, ThreadPool&) { return std::make_unique<Avx512F32Linear>(w); }

}  // namespace

F32GemmKernel f32_gemm_avx512() { return {CpuIsa::Avx512Vnni, prepare_avx512}; }

#else

F32GemmKernel f32_gemm_avx512() { return {CpuIsa::Avx512Vnni, nullptr}; }

#endif

}  // namespace kernels
}  // namespace finequant
