// CUTLASS 2.x tensor-core GEMMs for integer weights with one K-block, the epilogue fused as an
// epilogue visitor tree (evt_functors.h). Operand layout: docs/DESIGN.md section 5 (kernels.h):
// activations [M, Kp] row-major (A), weights [N, Kp] row-major, i.e. a column-major B.
//   W8A8  int8 x int8          mma m16n8k32
//   W4A8  int8 x int4 (packed) mma m16n8k32 s8, the int4 weights widened in registers
//   W4A4  int4 x int4 (packed) mma m16n8k64
// Built with -fmad=false: the fp32 epilogue rounds as the CPU reference does.
#include <cuda_runtime.h>

// clang-format off: the EVT headers need the GEMM headers first
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
// clang-format on

#include <atomic>
#include <cstdint>
#include <string>

#include "cuda/src/evt_functors.h"
#include "cuda/src/cutlass_run.h"
#include "cuda/src/kernels.h"
#include "finequant/error.h"

namespace finequant {
namespace cuda {
namespace {

using namespace cute;
namespace tb = cutlass::epilogue::threadblock;

// EVT compute node (CUTLASS 2.x visitor) applying Fn to its children's fragments as they are, with
// no conversion to one compute type (CUTLASS's VisitorCompute converts all inputs and has no
// runtime arguments); Fn itself is the node's arguments.
template <class Fn>
struct VisitorFn {
  using Arguments = Fn;
  using Params = Fn;
  struct SharedStorage {};

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }

  CUTLASS_HOST_DEVICE VisitorFn() {}
  CUTLASS_HOST_DEVICE VisitorFn(Params const& params, SharedStorage const&) : params_ptr(&params) {}

  Params const* params_ptr = nullptr;

  struct Callbacks : tb::EmptyCallbacks {
    Fn fn;
    CUTLASS_DEVICE explicit Callbacks(Fn const& f) : fn(f) {}

    template <class ElementAccumulator, class... ElementInputs, int FragmentSize>
    CUTLASS_DEVICE auto visit(int, int, int, int, cutlass::Array<ElementAccumulator, FragmentSize> const&,
                              cutlass::Array<ElementInputs, FragmentSize> const&... inputs) {
      return fn(inputs...);
    }
  };

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord, int, ProblemShape) {
    return Callbacks(*params_ptr);
  }
};

// One kernel: operand types, tile shapes, stages and the EVT of evt_functors.h.
template <class ElementA, class ElementB, class TbShape, class WarpShape, class InstShape, int Stages, class Operator>
struct IntGemm {
  static constexpr int kAlignA = 128 / cutlass::sizeof_bits<ElementA>::value;
  static constexpr int kAlignB = 128 / cutlass::sizeof_bits<ElementB>::value;
  static constexpr int kAlignOut = 4;  // float4 stores and row-table loads: N % 4 == 0

  using ThreadMap = tb::OutputTileThreadLayout<TbShape, WarpShape, float, kAlignOut, 1>;
  using Acc = tb::VisitorAccFetch;
  template <class T>
  using ColLoad = tb::VisitorColBroadcast<ThreadMap, T, Stride<_1, _0, _0>>;  // per row m
  template <class T>
  using RowLoad = tb::VisitorRowBroadcast<ThreadMap, T, Stride<_0, _1, _0>>;  // per column n

  using Zx = ColLoad<int32_t>;
  using Cm = RowLoad<int32_t>;
  using Zw = RowLoad<int32_t>;
  using Rs = ColLoad<int32_t>;
  using Sx = ColLoad<float>;
  using Sw = RowLoad<float>;
  using Bias = RowLoad<float>;
  using Correct = tb::Sm80EVT<VisitorFn<evt::CorrectBlock>, Acc, Zx, Cm, Zw, Rs>;
  using Scale = tb::Sm80EVT<VisitorFn<evt::ScaleBlock>, Sx, Sw, Correct>;
  using Finish = tb::Sm80EVT<VisitorFn<evt::FinishOutput>, Scale, Bias>;
  using Store = tb::VisitorAuxStore<ThreadMap, float, cutlass::FloatRoundStyle::round_to_nearest,
                                    Stride<int64_t, _1, int64_t>>;
  using Tree = tb::Sm80EVT<Store, Finish>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignA,  //
      ElementB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignB,  //
      float, cutlass::layout::RowMajor, kAlignOut,                                       //
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,               //
      TbShape, WarpShape, InstShape, Tree, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, Stages,
      Operator, 1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Children first, then the node (each Sm80EVT level); typed so a wrong nesting fails to compile.
  static typename Tree::Arguments arguments(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out) {
    typename Correct::Arguments correct{typename Acc::Arguments{},
                                        typename Zx::Arguments{x.zx, 0, {}},
                                        typename Cm::Arguments{w.cm, 0, {}},
                                        typename Zw::Arguments{w.zw, 0, {}},
                                        typename Rs::Arguments{x.rs, 0, {}},
                                        evt::CorrectBlock{}};
    typename Scale::Arguments scale{typename Sx::Arguments{x.sx, 0.f, {}}, typename Sw::Arguments{w.sw, 0.f, {}},
                                    correct, evt::ScaleBlock{}};
    typename Finish::Arguments finish{scale, typename Bias::Arguments{out.bias, 0.f, {}},
                                      evt::FinishOutput{out.epilogue, out.bias != nullptr}};
    typename Store::Arguments store{out.y, {out.ldy, _1{}, 0}};
    return typename Tree::Arguments{finish, store};
  }
};

using cutlass::gemm::GemmShape;
// CUTLASS has only the saturating int mma.sync; exact as long as no sum overflows (the Kp bound below).
using Sat = cutlass::arch::OpMultiplyAddSaturate;
using Mixed = cutlass::arch::OpMultiplyAddMixedInputUpcast;
using i4 = cutlass::int4b_t;

// Seven kernels. W8A8 by M: decode (<= 16), medium (<= 128), prefill.
using W8A8_S = IntGemm<int8_t, int8_t, GemmShape<16, 64, 128>, GemmShape<16, 64, 64>, GemmShape<16, 8, 32>, 5, Sat>;
using W8A8_M = IntGemm<int8_t, int8_t, GemmShape<64, 128, 64>, GemmShape<32, 64, 64>, GemmShape<16, 8, 32>, 6, Sat>;
using W8A8_L = IntGemm<int8_t, int8_t, GemmShape<128, 128, 64>, GemmShape<64, 64, 64>, GemmShape<16, 8, 32>, 5, Sat>;
// W4A8 and W4A4 by M: <= 64, larger.
using W4A8_S = IntGemm<int8_t, i4, GemmShape<64, 128, 64>, GemmShape<32, 64, 64>, GemmShape<16, 8, 32>, 6, Mixed>;
using W4A8_L = IntGemm<int8_t, i4, GemmShape<128, 128, 64>, GemmShape<64, 64, 64>, GemmShape<16, 8, 32>, 5, Mixed>;
using W4A4_S = IntGemm<i4, i4, GemmShape<64, 128, 128>, GemmShape<32, 64, 128>, GemmShape<16, 8, 64>, 6, Sat>;
using W4A4_L = IntGemm<i4, i4, GemmShape<128, 128, 128>, GemmShape<64, 64, 128>, GemmShape<16, 8, 64>, 5, Sat>;

// Compute capability (major * 10 + minor) of the current device, queried once per device.
int device_cc() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return 0;
  }
  int cc = cache[dev].load(std::memory_order_relaxed);
  if (cc == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    cc = major * 10 + minor;
    cache[dev].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class G>
typename G::Gemm::Arguments gemm_arguments(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out) {
  const int M = static_cast<int>(x.M), N = static_cast<int>(w.N), K = static_cast<int>(w.Kp);
  return typename G::Gemm::Arguments(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, 1, G::arguments(x, w, out),
                                     x.xq, w.w, nullptr, nullptr, 0, 0, 0, 0, K, K, 0, 0);
}

template <class G>
bool launch(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream) {
  return run_cutlass<typename G::Gemm>(gemm_arguments<G>(x, w, out), stream, "gemm_int_cutlass_sm80");
}

}  // namespace

bool gemm_int_cutlass_sm80(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream) {
  enum { kW8A8, kW4A8, kW4A4 } kind;
  int64_t max_abs_product;  // |x' w'| bound of the stored operands
  if (w.bits == 8 && !x.packed4 && (x.bits == 8 || x.bits == 4)) {
    kind = kW8A8;  // 4-bit values stored as int8 are int8 data
    max_abs_product = 128 * 128;
  } else if (w.bits == 4 && !x.packed4 && (x.bits == 8 || x.bits == 4)) {
    kind = kW4A8;
    max_abs_product = 128 * 8;
  } else if (w.bits == 4 && x.packed4 && x.bits == 4) {
    kind = kW4A4;
    max_abs_product = 8 * 8;
  } else {
    return false;
  }
  if (w.nb != 1 || w.Kp <= 0 || w.Kp % 32 != 0 || x.M < 0 || w.N < 0) return false;
  // mma.sync saturates where the reference wraps: exact only while no partial sum can overflow.
  if (w.Kp * max_abs_product >= (int64_t(1) << 31)) return false;
  if (x.M >= (int64_t(1) << 31) || w.N >= (int64_t(1) << 31)) return false;
  if (w.N % 4 != 0 || out.ldy % 4 != 0 || out.ldy < w.N) return false;
  if (!aligned16(x.xq) || !aligned16(w.w) || !aligned16(out.y) || !aligned16(w.sw) || !aligned16(w.cm) ||
      !aligned16(w.zw) || !aligned16(out.bias))
    return false;
  if (!x.sx || !x.rs || !w.sw || !w.cm || !x.xq || !w.w || !out.y) return false;
  if (device_cc() < 80) return false;
  if (x.M == 0 || w.N == 0) return true;

  const int64_t M = x.M;
  switch (kind) {
    case kW8A8:
      if (M <= 16) return launch<W8A8_S>(x, w, out, stream);
      if (M <= 128) return launch<W8A8_M>(x, w, out, stream);
      return launch<W8A8_L>(x, w, out, stream);
    case kW4A8:
      if (M <= 64) return launch<W4A8_S>(x, w, out, stream);
      return launch<W4A8_L>(x, w, out, stream);
    case kW4A4:
      if (M <= 64) return launch<W4A4_S>(x, w, out, stream);
      return launch<W4A4_L>(x, w, out, stream);
  }
  return false;
}

}  // namespace cuda
}  // namespace finequant
