#include "finequant/device.h"

#include <cstdlib>

#include "finequant/error.h"
#include "finequant/runtime.h"

namespace finequant {

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

Device Device::parse(const std::string& spec) {
  if (spec == "cpu") return cpu();
  if (spec == "auto") return cuda_backend_built() && cuda_device_count() > 0 ? cuda(0) : cpu();
  int index = 0;
  if (spec.rfind("cuda:", 0) == 0) {
    const std::string digits = spec.substr(5);
    FQ_CHECK_ARG(!digits.empty() && digits.size() < 6 && digits.find_first_not_of("0123456789") == std::string::npos,
                 "device '" + spec + "': expected cuda:N with N a device number");
    index = std::atoi(digits.c_str());
  } else {
    FQ_CHECK_ARG(spec == "cuda", "unknown device '" + spec + "' (expected cpu, cuda, cuda:N or auto)");
  }
  FQ_CHECK(cuda_backend_built(), ErrorKind::Unsupported,
           "device '" + spec + "': this build of finequant has no CUDA backend (nvcc or the CUTLASS headers were "
           "not found when it was built; rebuild with FINEQUANT_CUDA=ON)");
  const int count = cuda_device_count();
  FQ_CHECK(count > 0, ErrorKind::Runtime,
           "device '" + spec + "': no CUDA device is available (no NVIDIA driver or GPU found)");
  FQ_CHECK(index < count, ErrorKind::Runtime,
           "device '" + spec + "': only " + std::to_string(count) + " CUDA device(s) present");
  return cuda(index);
}

}  // namespace finequant
