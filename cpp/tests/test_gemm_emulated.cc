// The AVX-VNNI and AMX integer GEMMs with their few ISA instructions emulated
// (gemm_emulated_kernels.cc) against the reference (quantize_rows + gemm_int_quantized_ref), bit for
// bit, on any CPU: their layouts, packing, INT4 widening, K-block handling, operand shifts,
// corrections, threading and epilogues. The real instructions are tested by test_gemm_kernels on
// CPUs that have them. The case matrix is int_gemm_cases.h, shared with test_gemm_kernels, plus
// fused norm rows.
#include "int_gemm_cases.h"

namespace finequant {
namespace kernels {
IntGemmKernel int_gemm_avxvnni_emulated();
IntGemmKernel int_gemm_amx_emulated();
}  // namespace kernels
}  // namespace finequant

struct Emulated {
  const char* name;
  kernels::IntGemmKernel kernel;
  bool runs_here;  // the emulation's own needs: AVX2 for the AVX-VNNI one
};

static const std::vector<Emulated>& emulated_kernels() {
  static const std::vector<Emulated> list = [] {
    const kernels::IntGemmKernel vnni = kernels::int_gemm_avxvnni_emulated(), amx = kernels::int_gemm_amx_emulated();
    return std::vector<Emulated>{
        {"avxvnni (emulated)", vnni, vnni.prepare && kernels::cpu_supports(kernels::CpuIsa::Avx2)},
        {"amx (emulated)", amx, amx.prepare != nullptr}};
  }();
  return list;
}

const std::vector<KernelUnderTest>& kernels_under_test() {
  static const std::vector<KernelUnderTest> list = [] {
    std::vector<KernelUnderTest> out;
    for (const Emulated& k : emulated_kernels())
      if (k.runs_here) out.push_back({k.name, k.kernel});
    return out;
  }();
  return list;
}

TEST(emulation_runs_here) {
  CHECK(emulated_kernels()[1].runs_here);  // the AMX emulation is portable
#if defined(__x86_64__)
  if (kernels::cpu_supports(kernels::CpuIsa::Avx2)) CHECK(emulated_kernels()[0].runs_here);
#endif
}

// A fused producer (LayerNorm rows) against the reference on its stored output.
TEST(fused_norm_rows_match_reference) {
  std::mt19937 rng(11);
  const int64_t M = 13, N = 70, K = 96;
  const Tensor x = random_tensor({M, K}, rng, 0.5f), w = random_tensor({N, K}, rng, 0.f);
  const Tensor gain = random_tensor({1, K}, rng, 1.f), shift = random_tensor({1, K}, rng, 0.f);
  const kernels::NormParams norm{kernels::NormParams::Kind::LayerNorm, gain.data<float>(), shift.data<float>(), 1e-5f, K};
  for (bool asym : {false, true})
    CHECK_EQ(compare(kernels::RowInput{x.data<float>(), M, K, &norm}, quantize(w, QuantSpec{8, true}, Tile{1, K}),
                     QuantSpec{8, !asym}, nullptr, Epilogue::None),
             0);
}

int main() { return RUN_ALL_TESTS(); }
