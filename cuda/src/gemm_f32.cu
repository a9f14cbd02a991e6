// fp32 GEMM y[M, N] = act(x[M, K] W[N, K]^T + bias) with CUTLASS 2.x SIMT kernels (exact fp32
// products, no TF32), bias and activation fused in the epilogue: the bias is read as the source
// operand C with row stride 0 (every row of C is bias[0, N)). Layout: docs/DESIGN.md section 5
// (x row-major A, W row-major = column-major B, y row-major). Any M, N, K (alignment 1).
#include <cuda_runtime.h>

#include <cutlass/cutlass.h>
#include <cutlass/array.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <string>

#include "cuda/src/kernels.h"
#include "finequant/error.h"
#include "kernels/epilogue.h"

namespace finequant {
namespace cuda {
namespace {

// Epilogue output operator: kernels::finish_output on each element, the bias coming in as the
// source fragment (read only when there is a bias).
template <int Count>
struct BiasActivation {
  using ElementOutput = float;
  using ElementSource = float;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementC = float;
  using ElementD = float;
  static int const kCount = Count;
  static bool const kIsHeavy = true;  // GELU
  using FragmentOutput = cutlass::Array<float, Count>;
  using FragmentSource = cutlass::Array<float, Count>;
  using FragmentAccumulator = cutlass::Array<float, Count>;
  using FragmentCompute = cutlass::Array<float, Count>;

  struct Params {
    kernels::Epilogue epilogue = kernels::Epilogue::None;
    bool has_bias = false;
  };

  Params params;

  CUTLASS_HOST_DEVICE explicit BiasActivation(Params const& p) : params(p) {}
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return params.has_bias; }
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc, FragmentSource const& bias) const {
    FragmentOutput y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) y[i] = kernels::finish_output(acc[i], true, bias[i], params.epilogue);
    return y;
  }
  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc) const {
    FragmentOutput y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < Count; ++i) y[i] = kernels::finish_output(acc[i], false, 0.f, params.epilogue);
    return y;
  }
};

template <class TbShape, class WarpShape, int Stages>
using SimtGemm = cutlass::gemm::device::GemmUniversal<
    float, cutlass::layout::RowMajor, float, cutlass::layout::ColumnMajor, float, cutlass::layout::RowMajor,  //
    float, cutlass::arch::OpClassSimt, cutlass::arch::Sm80, TbShape, WarpShape, cutlass::gemm::GemmShape<1, 1, 1>,
    BiasActivation<1>, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, Stages,
    /*AlignmentA=*/1, /*AlignmentB=*/1, cutlass::arch::OpMultiplyAdd>;

using cutlass::gemm::GemmShape;
using GemmSmallM = SimtGemm<GemmShape<32, 128, 8>, GemmShape<32, 64, 8>, 5>;   // M <= 32 (decode)
using GemmLarge = SimtGemm<GemmShape<128, 128, 8>, GemmShape<32, 64, 8>, 4>;

template <class Gemm>
void launch(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, Epilogue epilogue,
            float* y, cudaStream_t stream) {
  typename BiasActivation<1>::Params op{epilogue, bias != nullptr};
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {m, n, k}, 1, op, x, w, bias, y,
                                /*batch strides*/ 0, 0, 0, 0, /*lda*/ K, /*ldb*/ K, /*ldc: bias row*/ 0, /*ldd*/ N);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) {
    check(cudaGetLastError(), "gemm_f32");
    fail(ErrorKind::Runtime, std::string("gemm_f32: CUTLASS cannot run the problem: ") +
                                 cutlassGetStatusString(status));
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) fail(ErrorKind::Runtime, "CUDA error in gemm_f32: the kernel launch failed");
  check_launch("gemm_f32");
}

}  // namespace

void gemm_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, Epilogue epilogue,
              float* y, cudaStream_t stream) {
  FQ_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "gemm_f32: negative size");
  FQ_CHECK_ARG(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K < (int64_t(1) << 31),
               "gemm_f32: a dimension exceeds 2^31 - 1");
  if (M == 0 || N == 0) return;
  if (M <= 32)
    launch<GemmSmallM>(x, M, K, w, N, bias, epilogue, y, stream);
  else
    launch<GemmLarge>(x, M, K, w, N, bias, epilogue, y, stream);
}

}  // namespace cuda
}  // namespace finequant
