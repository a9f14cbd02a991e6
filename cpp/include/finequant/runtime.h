// What this build of finequant has and what the machine offers.
#pragma once
#include <string>

namespace finequant {

bool cuda_backend_built();  // compiled with the CUDA backend
int cuda_device_count();    // usable CUDA devices; 0 without a driver or device (never throws)
std::string version();

}  // namespace finequant
