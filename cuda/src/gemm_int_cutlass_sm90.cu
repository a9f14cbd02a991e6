// CUTLASS 3.x W8A8 GEMM for Hopper (sm_90a only: TMA loads, warp-specialized wgmma IGMMA), one
// K-block, the epilogue of evt_functors.h fused as an Sm90 epilogue visitor tree. Operand layout:
// docs/DESIGN.md section 5 (kernels.h): activations [M, Kp] row-major (A), weights [N, Kp] row-major
// (a column-major B). Built with -fmad=false for the CPU reference's fp32 rounding.
#include <cuda_runtime.h>

// clang-format off
#include <cutlass/cutlass.h>
#include <cutlass/arch/config.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/util/packed_stride.hpp>
// clang-format on

#include <atomic>
#include <cstdint>

#include "cuda/src/evt_functors.h"
#include "cuda/src/cutlass_run.h"
#include "cuda/src/kernels.h"
#include "finequant/error.h"

// Built for sm_90a alone (cmake/cuda.cmake): plain sm_90 would silently compile the kernels to stubs.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gemm_int_cutlass_sm90.cu must be compiled for sm_90a only (-gencode=arch=compute_90a,code=sm_90a)"
#endif

namespace finequant {
namespace cuda {

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Sm90 EVT compute node applying Fn to its children's fragments as they are, with no conversion to
// one compute type (Sm90Compute converts all inputs); Fn itself is the node's arguments.
template <class Fn>
struct Sm90Fn {
  struct SharedStorage {};
  using Arguments = Fn;
  using Params = Fn;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE Sm90Fn() : params() {}
  CUTLASS_HOST_DEVICE Sm90Fn(Params const& p, SharedStorage const&) : params(p) {}

  Params const params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::ProducerLoadArgs<Args...> const&) {
    return fusion::EmptyProducerLoadCallbacks{};
  }

  struct ConsumerStoreCallbacks : fusion::EmptyConsumerStoreCallbacks {
    Fn fn;
    CUTLASS_DEVICE explicit ConsumerStoreCallbacks(Fn const& f) : fn(f) {}

    template <class ElementAccumulator, class... ElementInputs, int FragmentSize>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int, int, int,
                              cutlass::Array<ElementInputs, FragmentSize> const&... inputs) {
      return fn(inputs...);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::ConsumerStoreArgs<Args...> const&) {
    return ConsumerStoreCallbacks(params);
  }
};

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct Sm90IntGemm {
  static constexpr int kAlignAB = 16;  // int8, 16 bytes (TMA)
  static constexpr int kAlignD = 4;    // float, 16 bytes: N % 4 == 0, ldy % 4 == 0

  using Acc = fusion::Sm90AccFetch;
  // Per-row (m) and per-column (n) tables, read elementwise (alignment 1): any M, any table offset.
  template <class T, bool Null>
  using ColLoad = fusion::Sm90ColBroadcast<0, TileShape, T, T, Stride<_1, _0, int64_t>, 1, Null>;
  template <class T, bool Null>
  using RowLoad = fusion::Sm90RowBroadcast<0, TileShape, T, T, Stride<_0, _1, int64_t>, 1, Null>;

  using Zx = ColLoad<int32_t, true>;
  using Cm = RowLoad<int32_t, false>;
  using Zw = RowLoad<int32_t, true>;
  using Rs = ColLoad<int32_t, false>;
  using Sx = ColLoad<float, false>;
  using Sw = RowLoad<float, false>;
  using Bias = RowLoad<float, true>;
  using Correct = fusion::Sm90EVT<Sm90Fn<evt::CorrectBlock>, Acc, Zx, Cm, Zw, Rs>;
  using Scale = fusion::Sm90EVT<Sm90Fn<evt::ScaleBlock>, Sx, Sw, Correct>;
  using Tree = fusion::Sm90EVT<Sm90Fn<evt::FinishOutput>, Scale, Bias>;

  using StrideD = Stride<int64_t, _1, int64_t>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,  //
      void, StrideD, kAlignD,                                           // no C
      float, StrideD, kAlignD, EpilogueSchedule, Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,  //
      int8_t, cutlass::layout::RowMajor, kAlignAB,          //
      int8_t, cutlass::layout::ColumnMajor, kAlignAB,       //
      int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Children first, then the node (each Sm90EVT level); typed so a wrong nesting fails to compile.
  static typename Tree::Arguments tree_arguments(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out) {
    typename Correct::Arguments correct{typename Acc::Arguments{},
                                        typename Zx::Arguments{x.zx, 0, {}},
                                        typename Cm::Arguments{w.cm, 0, {}},
                                        typename Zw::Arguments{w.zw, 0, {}},
                                        typename Rs::Arguments{x.rs, 0, {}},
                                        evt::CorrectBlock{}};
    typename Scale::Arguments scale{typename Sx::Arguments{x.sx, 0.f, {}}, typename Sw::Arguments{w.sw, 0.f, {}},
                                    correct, evt::ScaleBlock{}};
    return typename Tree::Arguments{scale, typename Bias::Arguments{out.bias, 0.f, {}},
                                    evt::FinishOutput{out.epilogue, out.bias != nullptr}};
  }
};

using namespace cutlass::gemm;
// M <= 64 (decode to small batches): 64x64x256 tiles, one consumer warp group.
using W8A8_S = Sm90IntGemm<Shape<_64, _64, _256>, Shape<_1, _1, _1>, KernelTmaWarpSpecialized,
                           cutlass::epilogue::TmaWarpSpecialized>;
// Larger M: 128x128x128 tiles, ping-pong consumer warp groups, clusters of 2 along M (B multicast).
using W8A8_L = Sm90IntGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, KernelTmaWarpSpecializedPingpong,
                           cutlass::epilogue::TmaWarpSpecialized>;

struct DeviceInfo {
  int cc = 0;        // major * 10 + minor; 0: not queried or unavailable
  int sm_count = 0;
};

// The current device's compute capability and SM count, queried once per device.
DeviceInfo device_info(int* device) {
  static std::atomic<int> cc_cache[64], sms_cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return {};
  }
  *device = dev;
  DeviceInfo info{cc_cache[dev].load(std::memory_order_relaxed), sms_cache[dev].load(std::memory_order_relaxed)};
  if (info.cc == 0) {
    int major = 0, minor = 0, sms = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return {};
    }
    info = {major * 10 + minor, sms};
    sms_cache[dev].store(sms, std::memory_order_relaxed);
    cc_cache[dev].store(info.cc, std::memory_order_relaxed);
  }
  return info;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class G>
typename G::Gemm::Arguments gemm_arguments(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out,
                                           int device, int sm_count) {
  using Kernel = typename G::Kernel;
  const int M = static_cast<int>(x.M), N = static_cast<int>(w.N), K = static_cast<int>(w.Kp);
  auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
  typename G::StrideD stride_d{out.ldy, _1{}, int64_t(0)};
  cutlass::KernelHardwareInfo hw{device, sm_count};
  return typename G::Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const int8_t*>(x.xq), stride_a, static_cast<const int8_t*>(w.w), stride_b},
      {G::tree_arguments(x, w, out), nullptr, stride_d, out.y, stride_d},
      hw};
}

template <class G>
bool launch(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, int device, int sm_count,
            cudaStream_t stream) {
  return run_cutlass<typename G::Gemm>(gemm_arguments<G>(x, w, out, device, sm_count), stream, "gemm_int_cutlass_sm90");
}

}  // namespace
#endif  // CUTLASS_ARCH_MMA_SM90_SUPPORTED

bool gemm_int_cutlass_sm90(const IntActsDev& x, const IntWeightDev& w, const GemmOutDev& out, cudaStream_t stream) {
#if !defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
  (void)x, (void)w, (void)out, (void)stream;
  return false;
#else
  // int8 x int8 only (4-bit values stored as int8 are int8 data).
  if (w.bits != 8 || x.packed4 || (x.bits != 8 && x.bits != 4)) return false;
  if (w.nb != 1 || w.Kp <= 0 || w.Kp % 32 != 0 || x.M < 0 || w.N < 0) return false;
  // Exact while no partial sum of |x' w'| <= 128 * 128 can overflow int32 (the reference wraps).
  if (w.Kp * 128 * 128 >= (int64_t(1) << 31)) return false;
  if (x.M >= (int64_t(1) << 31) || w.N >= (int64_t(1) << 31)) return false;
  if (w.N % 4 != 0 || out.ldy % 4 != 0 || out.ldy < w.N) return false;
  if (!aligned16(x.xq) || !aligned16(w.w) || !aligned16(out.y)) return false;
  if (!x.sx || !x.rs || !w.sw || !w.cm || !x.xq || !w.w || !out.y) return false;
  int device = 0;
  const DeviceInfo info = device_info(&device);
  if (info.cc != 90) return false;  // sm_90a code runs on compute capability 9.0 only
  if (x.M == 0 || w.N == 0) return true;
  if (x.M <= 64) return launch<W8A8_S>(x, w, out, device, info.sm_count, stream);
  return launch<W8A8_L>(x, w, out, device, info.sm_count, stream);
#endif
}

}  // namespace cuda
}  // namespace finequant
