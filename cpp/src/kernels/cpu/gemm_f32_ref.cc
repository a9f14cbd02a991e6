// The reference FP32 GEMM: a vectorized dot product per output, OpenMP over output channels.
// Compiled with -ffp-contract=off (outputs must not depend on the target clone's FMA).
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

namespace {

FQ_MULTIVERSION void gemm_f32_loops(const float* x, int64_t M, const float* w, int64_t N, int64_t K, const float* bias,
                                    float* y, Epilogue epilogue, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    const float* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)  // lets the compiler reassociate: a vectorized dot product
      for (int64_t k = 0; k < K; ++k) acc += xm[k] * wn[k];
      if (bias) acc += bias[n];
      y[m * N + n] = apply_epilogue(epilogue, acc);
    }
  }
}

class RefF32Linear final : public CpuLinear {
 public:
  explicit RefF32Linear(Tensor w) : w_(std::move(w)) {
    N = w_.dim(0);
    K = w_.dim(1);
  }
  void run(const ExecContext& ctx, const RowInput& x, float* y) const override {
    const Tensor rows = x.materialize(ctx.threads);
    gemm_f32_loops(rows.data<float>(), x.rows, w_.data<float>(), N, K, bias.defined() ? bias.data<float>() : nullptr,
                   y, epilogue, ctx.threads);
  }

 private:
  Tensor w_;  // [N, K]
};

std::unique_ptr<CpuLinear> prepare_ref(Tensor w, int) { return std::make_unique<RefF32Linear>(std::move(w)); }

}  // namespace

F32GemmKernel f32_gemm_ref() { return {CpuIsa::Ref, prepare_ref}; }

}  // namespace kernels
}  // namespace finequant
