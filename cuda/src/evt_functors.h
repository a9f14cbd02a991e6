// Elementwise functors of the integer GEMM epilogue (docs/DESIGN.md sections 2 and 5), used as the
// compute nodes of the CUTLASS epilogue visitor trees (EVT) of gemm_int_cutlass_sm80.cu and
// gemm_int_cutlass_sm90.cu. Each applies the scalar helpers of kernels/epilogue.h to every element
// of cutlass::Array fragments, so the GPU epilogue is the CPU reference's, operation for operation.
// Host and device code (the host test cpp/tests/test_cuda_epilogue.cc evaluates them on the CPU).
//
// The tree, per output (m, n) of a single K-block:
//   corrected = CorrectBlock(acc, zx[m], cm[n], zw[n], rs[m])          int32
//   out       = ScaleBlock(sx[m], sw[n], corrected)                    sx fma(sw, float(corrected), 0.f)
//   y         = FinishOutput{epilogue, has_bias}(out, bias[n])         act(out + bias)
// A node hands these functors its children's fragments as they are (int32 or float, no conversion)
// and passes FinishOutput's runtime fields as the node's arguments.
#pragma once
#include <cutlass/array.h>
#include <cutlass/cutlass.h>

#include <cstdint>

#include "kernels/epilogue.h"

namespace finequant {
namespace cuda {
namespace evt {

// kernels::correct_block elementwise: acc - zx cm - zw rs in wrap-around int32.
struct CorrectBlock {
  template <int N>
  CUTLASS_HOST_DEVICE cutlass::Array<int32_t, N> operator()(
      cutlass::Array<int32_t, N> const& acc, cutlass::Array<int32_t, N> const& zx, cutlass::Array<int32_t, N> const& cm,
      cutlass::Array<int32_t, N> const& zw, cutlass::Array<int32_t, N> const& rs) const {
    cutlass::Array<int32_t, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = kernels::correct_block(acc[i], zx[i], cm[i], zw[i], rs[i]);
    return r;
  }
};

// dequantize_sum(sx, accumulate_block(0.f, sw, corrected)) elementwise: the one block's contribution
// to a sum starting at +0.f, as the reference does, times the row's scale.
struct ScaleBlock {
  template <int N>
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& sx,
                                                          cutlass::Array<float, N> const& sw,
                                                          cutlass::Array<int32_t, N> const& corrected) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = kernels::dequantize_sum(sx[i], kernels::accumulate_block(0.f, sw[i], corrected[i]));
    return r;
  }
};

// The activations out of line in the mma.sync kernels: CUTLASS unrolls the epilogue's visits, and one
// inlined GELU per element multiplies ptxas's time (same operations, so the same results). Inlined in
// sm_90a code: a call in a wgmma kernel makes ptxas serialize its wgmma pipeline.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FINEQUANT_EVT_OUTLINE_ACTIVATION 1
static __device__ __noinline__ float finish_output_outlined(float out, bool has_bias, float bias,
                                                            kernels::Epilogue e) {
  return kernels::finish_output(out, has_bias, bias, e);
}
#endif

// kernels::finish_output elementwise; its fields are runtime values (the EVT node's arguments).
struct FinishOutput {
  kernels::Epilogue epilogue = kernels::Epilogue::None;
  bool has_bias = false;

  template <int N>
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& out,
                                                          cutlass::Array<float, N> const& bias) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
#if defined(FINEQUANT_EVT_OUTLINE_ACTIVATION)
      r[i] = epilogue == kernels::Epilogue::None
                 ? kernels::finish_output(out[i], has_bias, bias[i], kernels::Epilogue::None)
                 : finish_output_outlined(out[i], has_bias, bias[i], epilogue);
#else
      r[i] = kernels::finish_output(out[i], has_bias, bias[i], epilogue);
#endif
    }
    return r;
  }
};

}  // namespace evt
}  // namespace cuda
}  // namespace finequant
