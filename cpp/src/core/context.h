// The execution context of one call (docs/DESIGN.md section 1): which backend runs the kernels,
// on which device, with which CPU threads (the pool of the Engine, section 5.5) or on which CUDA
// stream. Handed down Model -> Block -> Linear -> backend; nothing in the kernels reads
// process-wide settings instead.
#pragma once
#include "core/thread_pool.h"
#include "finequant/device.h"

namespace finequant {
namespace kernels {
class Backend;
}

struct ExecContext {
  const kernels::Backend* backend = nullptr;
  Device device;
  ThreadPool* pool = nullptr;  // CPU kernels' threads (set by Backend::context)
  void* stream = nullptr;      // CUDA kernels: the cudaStream_t of this call

  ThreadPool& threads() const { return *pool; }
};

}  // namespace finequant
