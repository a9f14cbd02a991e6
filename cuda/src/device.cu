// CUDA runtime queries. Linked against cudart_static, so the library loads on machines without
// libcuda; every CUDA error (no driver, no device) means "no device" here.
#include <cuda_runtime.h>

#include <cutlass/cutlass.h>  // proves the CUTLASS headers are usable by this build

#include "finequant/runtime.h"

namespace finequant {

bool cuda_backend_built() { return true; }

int cuda_device_count() {
  int count = 0;  // cudaGetDeviceCount leaves it untouched on error (e.g. insufficient driver)
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return count;
}

}  // namespace finequant
