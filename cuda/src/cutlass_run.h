// Running one configured CUTLASS device GEMM (2.x or 3.x API) under the launchers' contract
// (cuda/src/kernels.h): false, with nothing launched, when the kernel cannot take the arguments.
#pragma once
#include <cuda_runtime.h>

#include <cutlass/cutlass.h>

#include <string>

#include "cuda/src/kernels.h"
#include "finequant/error.h"

namespace finequant {
namespace cuda {

template <class Gemm>
bool run_cutlass(const typename Gemm::Arguments& args, cudaStream_t stream, const char* name) {
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;
  if (Gemm::get_workspace_size(args) != 0) return false;
  Gemm gemm;
  // Fails before any launch, e.g. when the device lacks the shared memory the tile needs.
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    cudaGetLastError();
    return false;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess)
    fail(ErrorKind::Runtime, std::string("CUDA error in ") + name + ": the kernel launch failed");
  check_launch(name);
  return true;
}

}  // namespace cuda
}  // namespace finequant
