// The CPU kernel registry: one line per implementation, lowest level first. The CPU backend picks
// from these with select_kernel (cpu_isa.h); tests run every entry the CPU supports against Ref.
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gemm.h"

namespace finequant {
namespace kernels {

const std::vector<IntGemmKernel>& int_gemm_kernels() {
  static const std::vector<IntGemmKernel> kernels = {int_gemm_ref(), int_gemm_avx2(), int_gemm_avxvnni(),
                                                      int_gemm_avx512vnni(), int_gemm_amx()};
  return kernels;
}

const std::vector<F32GemmKernel>& f32_gemm_kernels() {
  static const std::vector<F32GemmKernel> kernels = {f32_gemm_ref(), f32_gemm_avx512()};
  return kernels;
}

const std::vector<AttentionKernel>& attention_kernels() {
  static const std::vector<AttentionKernel> kernels = {attention_ref(), attention_avx512()};
  return kernels;
}

}  // namespace kernels
}  // namespace finequant
