#include "finequant/runtime.h"

namespace finequant {

std::string version() { return "0.1.0"; }

#ifndef FINEQUANT_WITH_CUDA
bool cuda_backend_built() { return false; }
int cuda_device_count() { return 0; }
#endif

}  // namespace finequant
