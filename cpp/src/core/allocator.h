// Memory per device kind (docs/DESIGN.md section 5.1). Tensor::empty asks the allocator of its
// device's kind: the CPU's block cache, or the CUDA backend's stream-ordered caching allocator.
#pragma once
#include <cstddef>

#include "finequant/device.h"

namespace finequant {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes, int device_index) = 0;  // 64-byte aligned (or better)
  virtual void deallocate(void* p, size_t bytes, int device_index) = 0;
  virtual void fill_zero(void* p, size_t bytes, int device_index) = 0;
  // dst and src may be on this kind's devices or on the CPU. A copy from or to the host returns when
  // it is done; one within a device may stay queued on the device's stream (ordered before later work).
  virtual void copy(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) = 0;
};

// The allocator of a device kind; throws Unsupported when the build has none for it.
Allocator& allocator_for(Device::Kind kind);

#ifdef FINEQUANT_WITH_CUDA
Allocator* cuda_allocator();  // cuda/src/allocator_cuda.cc
#endif

}  // namespace finequant
