// The reference FP32 GEMM: a vectorized dot product per output, threads over output channels.
// Compiled with -ffp-contract=off (outputs must not depend on the target clone's FMA).
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/multiversion.h"

namespace finequant {
namespace kernels {

namespace {

// Output channels [n0, n1) of every row.
FQ_MULTIVERSION void gemm_f32_channels(const float* x, int64_t M, const float* w, int64_t N, int64_t K,
                                       const float* bias, float* y, Epilogue epilogue, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
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
    const Tensor rows = x.materialize(ctx.threads());
    parallel_for(ctx.threads(), N, 16, [&](int64_t n0, int64_t n1) {
      gemm_f32_channels(rows.data<float>(), x.rows, w_.data<float>(), N, K,
                        bias.defined() ? bias.data<float>() : nullptr, y, epilogue, n0, n1);
    });
  }

 private:
  Tensor w_;  // [N, K]
};

std::unique_ptr<CpuLinear> prepare_ref(Tensor w, ThreadPool&) { return std::make_unique<RefF32Linear>(std::move(w)); }

}  // namespace

F32GemmKernel f32_gemm_ref() { return {CpuIsa::Ref, prepare_ref}; }

}  // namespace kernels
}  // namespace finequant
