// The execution context of one call (docs/DESIGN.md section 1): which backend runs the kernels,
// on which device, with how many CPU threads or on which CUDA stream. Handed down Model -> Block ->
// Linear -> backend; nothing in the kernels reads process-wide settings instead.
#pragma once
#include "finequant/device.h"

namespace finequant {
namespace kernels {
class Backend;
}

struct ExecContext {
  const kernels::Backend* backend = nullptr;
  Device device;
  int threads = 1;          // CPU kernels: threads of each parallel region (>= 1)
  void* stream = nullptr;   // CUDA kernels: the cudaStream_t of this call
};

// CPU threads for a context when the caller asked for `requested` (0: the default, see
// set_default_threads: the OpenMP default unless set).
int resolve_threads(int requested);
void set_default_threads(int threads);  // 0 restores the OpenMP default

}  // namespace finequant
