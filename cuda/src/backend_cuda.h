// The CUDA backend's entry points shared by its files (the record itself is in backend_cuda.cc).
#pragma once
#include <cuda_runtime.h>

namespace finequant {
namespace cuda {

// The calling thread's stream on `device` (created on first use, one per thread and device).
cudaStream_t current_stream(int device);

}  // namespace cuda
}  // namespace finequant
