// CUDA device memory (docs/DESIGN.md section 5.1): a stream-ordered caching allocator. Each thread
// works on its own stream per device (current_stream); blocks come from the device's default memory
// pool with cudaMallocAsync on that stream and go back with cudaFreeAsync, and the pool keeps freed
// memory for reuse instead of returning it to the driver (release threshold: unlimited), so the
// same activation shapes on every forward cost no cudaMalloc.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "core/allocator.h"
#include "finequant/error.h"
#include "cuda/src/backend_cuda.h"
#include "cuda/src/kernels.h"

namespace finequant {
namespace cuda {

cudaStream_t current_stream(int device) {
  thread_local std::vector<cudaStream_t> streams;  // never destroyed: the driver frees them at exit
  if (static_cast<int>(streams.size()) <= device) streams.resize(static_cast<size_t>(device) + 1, nullptr);
  if (!streams[device]) {
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking), "cudaStreamCreate");
  }
  return streams[device];
}

namespace {

void keep_pool_memory(int device) {
  static std::once_flag flags[64];
  std::call_once(flags[device % 64], [device] {
    cudaMemPool_t pool;
    check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
    uint64_t threshold = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold), "cudaMemPoolSetAttribute");
  });
}

class CudaAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes, int device) override {
    keep_pool_memory(device);
    check(cudaSetDevice(device), "cudaSetDevice");
    void* p = nullptr;
    const cudaError_t status = cudaMallocAsync(&p, bytes, current_stream(device));
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      fail(ErrorKind::Runtime, "CUDA device " + std::to_string(device) + " is out of memory (asked for " +
                                   std::to_string(bytes) + " bytes)");
    }
    check(status, "cudaMallocAsync");
    return p;
  }

  void deallocate(void* p, size_t, int device) override {
    // Ordered after the work already queued on this thread's stream. Errors are dropped: this runs in
    // destructors, and a failed free leaves the block in the pool.
    if (cudaSetDevice(device) == cudaSuccess && cudaFreeAsync(p, current_stream(device)) == cudaSuccess) return;
    cudaGetLastError();
  }

  void fill_zero(void* p, size_t bytes, int device) override {
    check(cudaMemsetAsync(p, 0, bytes, current_stream(device)), "cudaMemsetAsync");
  }

  void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) override {
    if (!bytes) return;
    const int device = dst_device.is_cuda() ? dst_device.index : src_device.index;
    check(cudaSetDevice(device), "cudaSetDevice");
    const cudaStream_t stream = current_stream(device);
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
    // A host buffer may change or be freed as soon as this returns (or be read by the caller);
    // device-to-device copies (a clone per pre-LN block) stay asynchronous on the stream.
    if (dst_device.is_cpu() || src_device.is_cpu()) check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
};

}  // namespace
}  // namespace cuda

Allocator* cuda_allocator() {
  static Allocator* const allocator = new cuda::CudaAllocator;  // never destroyed
  return allocator;
}

}  // namespace finequant
