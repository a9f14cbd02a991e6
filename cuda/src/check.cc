// CUDA error checks shared by the backend and its launchers (cuda/src/kernels.h).
#include <cuda_runtime.h>

#include <string>

#include "cuda/src/kernels.h"
#include "finequant/error.h"

namespace finequant {
namespace cuda {

void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky launch error so the next call starts clean
  fail(ErrorKind::Runtime, std::string("CUDA error in ") + what + ": " + cudaGetErrorName(status) + " (" +
                               cudaGetErrorString(status) + ")");
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

}  // namespace cuda
}  // namespace finequant
